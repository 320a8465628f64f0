"""`loraplex adapters push|list|versions|alias|pin|unpin|delete`: a tenant's adapters."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from server.admin_cli.client import AdminClient, path
from server.admin_cli.command import Subparsers, action, confirm, group
from server.admin_cli.errors import UsageError
from server.admin_cli.output import Output, size, when
from server.admin_cli.upload import push_folder


def add(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    adapters = group(sub, "adapters", "admin: a tenant's LoRA adapters (push, list, versions, "
                                      "alias, pin, unpin, delete)")
    p = action(adapters, "push", "register a new version of an adapter (created with its "
                                 "first version)", push, common)
    p.add_argument("tenant")
    p.add_argument("name", help="the adapter's name")
    p.add_argument("source", help="a local PEFT folder (adapter_config.json + "
                                  "adapter_model.safetensors; uploaded), or s3://bucket/prefix/ "
                                  "(read by the server: under LORAPLEX_S3_SOURCE_ALLOWLIST)")
    p.add_argument("--server-path", action="store_true",
                   help="SOURCE is a folder on the server's machine, under "
                        "LORAPLEX_LOCAL_SOURCE_ALLOWLIST, copied by the server (no upload)")
    p = action(adapters, "list", "list a tenant's adapters", list_, common)
    p.add_argument("tenant")
    p = action(adapters, "versions", "show an adapter's versions, aliases and pins",
               versions, common)
    p.add_argument("tenant")
    p.add_argument("name")
    p = action(adapters, "alias", "point an alias (name@alias) at a version, or --delete it",
               alias, common)
    p.add_argument("tenant")
    p.add_argument("name")
    p.add_argument("alias")
    p.add_argument("version", type=int, nargs="?")
    p.add_argument("--delete", action="store_true", help="remove the alias")
    for verb, help_ in (("pin", "keep a version resident in the engine (loaded now and at "
                                "every engine start)"),
                        ("unpin", "let a pinned version be evicted again")):
        p = action(adapters, verb, help_, pin if verb == "pin" else unpin, common)
        p.add_argument("tenant")
        p.add_argument("name")
        p.add_argument("version", type=int)
    p = action(adapters, "delete", "delete an adapter with every version and alias (or one "
                                   "--version)", delete, common)
    p.add_argument("tenant")
    p.add_argument("name")
    p.add_argument("--version", type=int, help="delete only this version")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")


def _adapter(tenant: str, name: str, *rest: str) -> str:
    return path("admin", "tenants", tenant, "adapters", name, *rest)


def push(args: argparse.Namespace, client: AdminClient, out: Output) -> None:
    url = _adapter(args.tenant, args.name, "versions")
    if args.source.startswith("s3://"):
        if args.server_path:
            raise UsageError("--server-path is for a folder on the server, not s3://")
        version = client.post(url, json={"source": args.source})
    elif args.server_path:
        version = client.post(url, json={"path": args.source})
    else:
        version = push_folder(client, url, Path(args.source), out, args.timeout)
    if out.as_json:
        out.data(version)
        return
    out.line(f"Registered {version['tenant']}/{version['model']} (rank {version['rank']}, "
             f"{size(version['size_bytes'])}, sha256 {version['sha256'][:12]}...)")
    for warning in version.get("warnings") or []:
        out.note(f"warning: {warning}", "yellow")


def list_(args: argparse.Namespace, client: AdminClient, out: Output) -> None:
    adapters = client.get(path("admin", "tenants", args.tenant, "adapters"))
    if out.as_json:
        out.data(adapters)
        return
    out.table(["adapter", "latest", "versions", "aliases", "pinned", "created"], (
        [a["name"], a["latest_version"], len(a["versions"]), _aliases(a["aliases"]),
         ", ".join(str(v["version"]) for v in a["versions"] if v["pinned"]) or None,
         when(a["created_at"])] for a in adapters["data"]),
        empty=f"tenant {args.tenant} has no adapters")


def versions(args: argparse.Namespace, client: AdminClient, out: Output) -> None:
    adapter = client.get(_adapter(args.tenant, args.name))
    if out.as_json:
        out.data(adapter)
        return
    by_version: dict[int, list[str]] = {}
    for alias_, version in adapter["aliases"].items():
        by_version.setdefault(version, []).append(alias_)
    out.table(["version", "model", "aliases", "rank", "alpha", "targets", "size", "pinned",
               "source", "created"], (
        [v["version"], v["model"], ", ".join(sorted(by_version.get(v["version"], []))) or None,
         v["rank"], f"{v['alpha']:g}", ",".join(v["target_modules"]), size(v["size_bytes"]),
         v["pinned"], v["source"], when(v["created_at"])] for v in adapter["versions"]),
        title=f"{adapter['tenant']}/{adapter['name']}", empty="no versions")


def alias(args: argparse.Namespace, client: AdminClient, out: Output) -> None:
    url = _adapter(args.tenant, args.name, "aliases", args.alias)
    if args.delete == (args.version is not None):
        raise UsageError("give a VERSION to point the alias at, or --delete (not both)")
    result: Any = client.delete(url) if args.delete else client.put(
        url, json={"version": args.version})
    if out.as_json:
        out.data(result)
    elif args.delete:
        out.line(f"Deleted alias {args.name}@{args.alias}.")
    else:
        out.line(f"{args.name}@{args.alias} -> version {result['version']}")


def pin(args: argparse.Namespace, client: AdminClient, out: Output) -> None:
    version = client.put(_adapter(args.tenant, args.name, "versions", str(args.version), "pin"))
    _pinned(version, out)


def unpin(args: argparse.Namespace, client: AdminClient, out: Output) -> None:
    version = client.delete(_adapter(args.tenant, args.name, "versions", str(args.version),
                                     "pin"))
    _pinned(version, out)


def _pinned(version: dict[str, Any], out: Output) -> None:
    if out.as_json:
        out.data(version)
        return
    state = "pinned (kept resident)" if version["pinned"] else "not pinned"
    out.line(f"{version['tenant']}/{version['model']} is {state}.")


def delete(args: argparse.Namespace, client: AdminClient, out: Output) -> None:
    what = (f"version {args.version} of adapter {args.name!r}" if args.version is not None
            else f"adapter {args.name!r} with every version and alias")
    confirm(f"Delete {what} of tenant {args.tenant!r}?", args.yes)
    url = (_adapter(args.tenant, args.name, "versions", str(args.version))
           if args.version is not None else _adapter(args.tenant, args.name))
    deleted = client.delete(url)
    if out.as_json:
        out.data(deleted)
        return
    out.line(f"Deleted {what}.")


def _aliases(aliases: dict[str, int]) -> str | None:
    return ", ".join(f"{a}->{v}" for a, v in sorted(aliases.items())) or None
