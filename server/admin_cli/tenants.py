"""`loraplex tenants create|list|delete`."""

from __future__ import annotations

import argparse

from server.admin_cli.client import AdminClient, path
from server.admin_cli.command import Subparsers, action, confirm, group
from server.admin_cli.output import Output, when


def add(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    tenants = group(sub, "tenants", "admin: tenants (create, list, delete)")
    p = action(tenants, "create", "create a tenant", create, common)
    p.add_argument("tenant", help="tenant id: letters, digits, '-', '_'")
    action(tenants, "list", "list the tenants", list_, common)
    p = action(tenants, "delete", "delete a tenant with its keys and adapters", delete, common)
    p.add_argument("tenant")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")


def create(args: argparse.Namespace, client: AdminClient, out: Output) -> None:
    tenant = client.post("/admin/tenants", json={"id": args.tenant})
    if out.as_json:
        out.data(tenant)
        return
    out.line(f"Created tenant {tenant['id']}. Next: loraplex keys create {tenant['id']}")


def list_(args: argparse.Namespace, client: AdminClient, out: Output) -> None:
    tenants = client.get("/admin/tenants")
    if out.as_json:
        out.data(tenants)
        return
    out.table(["tenant", "created"], ([t["id"], when(t["created_at"])] for t in tenants["data"]),
              empty="no tenants")


def delete(args: argparse.Namespace, client: AdminClient, out: Output) -> None:
    confirm(f"Delete tenant {args.tenant!r} with all its keys and adapters?", args.yes)
    deleted = client.delete(path("admin", "tenants", args.tenant))
    if out.as_json:
        out.data(deleted)
        return
    out.line(f"Deleted tenant {args.tenant}, its keys and its adapters.")
