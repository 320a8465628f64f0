"""`loraplex keys create|list|revoke`: a tenant's API keys. The secret is printed once."""

from __future__ import annotations

import argparse

from server.admin_cli.client import AdminClient, path
from server.admin_cli.command import Subparsers, action, group
from server.admin_cli.output import Output, when


def add(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    keys = group(sub, "keys", "admin: a tenant's API keys (create, list, revoke)")
    p = action(keys, "create", "create a key; its secret is printed this once", create, common)
    p.add_argument("tenant")
    p.add_argument("--name", help="a label for the key")
    p = action(keys, "list", "list a tenant's keys (never their secrets)", list_, common)
    p.add_argument("tenant")
    p = action(keys, "revoke", "revoke a key (at once, on every unit)", revoke, common)
    p.add_argument("tenant")
    p.add_argument("key_id", help="the key's id (keys list), not its secret")


def create(args: argparse.Namespace, client: AdminClient, out: Output) -> None:
    body = {"name": args.name} if args.name is not None else None
    key = client.request("POST", path("admin", "tenants", args.tenant, "keys"), json=body)
    if out.as_json:
        out.data(key)
        return
    out.note(f"Key {key['id']} for tenant {key['tenant']}; the secret below is shown once, "
             "only its hash is kept:")
    out.line(key["key"])  # alone on stdout: KEY=$(loraplex keys create acme)


def list_(args: argparse.Namespace, client: AdminClient, out: Output) -> None:
    keys = client.get(path("admin", "tenants", args.tenant, "keys"))
    if out.as_json:
        out.data(keys)
        return
    out.table(["id", "name", "prefix", "created", "revoked"],
              ([k["id"], k["name"], k["prefix"], when(k["created_at"]), when(k["revoked_at"])]
               for k in keys["data"]), empty=f"tenant {args.tenant} has no keys")


def revoke(args: argparse.Namespace, client: AdminClient, out: Output) -> None:
    key = client.delete(path("admin", "tenants", args.tenant, "keys", args.key_id))
    if out.as_json:
        out.data(key)
        return
    out.line(f"Revoked key {key['id']} of tenant {key['tenant']}.")
