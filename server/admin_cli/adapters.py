"""`loraplex adapters push|list|versions|alias|pin|unpin|export|delete`: a tenant's adapters."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, get_args

from server.admin_cli.client import AdminClient, path
from server.admin_cli.command import Subparsers, action, confirm, group, positive
from server.admin_cli.download import download_export
from server.admin_cli.errors import INTERRUPTED, JOB_NOT_SUCCEEDED, OK, UsageError
from server.admin_cli.follow import FINAL_VALUES, follow
from server.admin_cli.output import Output, size, status, when
from server.admin_cli.upload import push_folder
from server.protocol.fine_tuning import ExportDtype

EXPORT_DTYPES = get_args(ExportDtype)


def add(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    adapters = group(sub, "adapters", "admin: a tenant's LoRA adapters (push, list, versions, "
                                      "alias, pin, unpin, export, delete)")
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
    p = action(adapters, "export", "merge a version into the base model (a job of the "
                                   "training worker) and show, or --download, the model folder",
               export, common)
    p.add_argument("tenant")
    p.add_argument("name")
    p.add_argument("version", type=int)
    p.add_argument("--dtype", choices=EXPORT_DTYPES, default="auto",
                   help="the merged weights' type (default auto: the base model's own)")
    p.add_argument("--wait", action="store_true",
                   help="follow the export job until it ends (as `jobs follow` does)")
    p.add_argument("--download", metavar="DIR", type=Path,
                   help="then download the model folder to DIR (a new or empty folder), every "
                        "file checked against its sha256; implies --wait")
    p.add_argument("--interval", type=positive, default=2.0, metavar="S",
                   help="seconds between polls while waiting (default 2)")
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


def export(args: argparse.Namespace, client: AdminClient, out: Output) -> int:
    url = _adapter(args.tenant, args.name, "versions", str(args.version), "export")
    query = {"dtype": args.dtype}
    export_ = client.post(url, json=query)
    if (args.wait or args.download is not None) and export_["status"] not in FINAL_VALUES:
        if out.as_json:  # one JSON document at the end, nothing on the way
            while export_["status"] not in FINAL_VALUES:
                time.sleep(args.interval)
                export_ = client.get(url, params=query)
        else:
            followed = follow(argparse.Namespace(job_id=export_["job_id"],
                                                 interval=args.interval), client, out)
            if followed == INTERRUPTED:  # Ctrl-C: the export goes on; nothing downloaded
                return followed
            export_ = client.get(url, params=query)
    if args.download is not None and export_["status"] == "succeeded":
        download_export(client, export_, args.download, out)
        _show_export(export_, out, args.download)
        return OK
    _show_export(export_, out)
    if (args.wait or args.download is not None) and export_["status"] != "succeeded":
        return JOB_NOT_SUCCEEDED
    return OK


def _show_export(export_: dict[str, Any], out: Output, downloaded: Path | None = None) -> None:
    if out.as_json:
        out.data(export_)
        return
    out.fields([("export", f"{export_['adapter']}@{export_['version']} ({export_['dtype']})"),
                ("job", export_["job_id"]), ("status", status(export_["status"])),
                ("location", export_.get("location")),
                ("downloaded to", str(downloaded) if downloaded is not None else None),
                ("error", (export_.get("error") or {}).get("message"))])
    files = export_.get("files") or {}
    if files:
        out.table(["file", "size", "sha256"], (
            [rel, size(meta["size"]), meta["sha256"]] for rel, meta in sorted(files.items())))


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
