"""`loraplex engine`: the engine's state: resident adapters, loads, hits, evictions."""

from __future__ import annotations

import argparse
from typing import Any

from server.admin_cli.client import AdminClient
from server.admin_cli.command import Subparsers, action
from server.admin_cli.output import Output, size


def add(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    action(sub, "engine", "admin: the engine (resident adapters, loads, hits, evictions)",
           show, common)


def show(args: argparse.Namespace, client: AdminClient, out: Output) -> None:
    engine = client.get("/admin/engine")
    if out.as_json:
        out.data(engine)
        return
    adapters: dict[str, Any] = engine.get("adapters") or {}
    resident = adapters.get("resident") or []
    stats: dict[str, Any] = adapters.get("stats") or {}
    out.fields([("engine", engine["url"]), ("ready", engine["ready"]),
                ("spawned", engine["spawned"]), ("restarts", engine.get("restarts")),
                ("store", engine["store"]),
                ("resident", f"{len(resident)} of {adapters.get('capacity', '?')} slots")])
    out.fields([(name.replace("_", " "), stats[name]) for name in
                ("loads", "hits", "evictions", "load_failures", "unloads") if name in stats])
    out.table(["adapter (engine name)", "state", "in flight", "idle s", "load s", "pinned"], (
        [r.get("engine_name"), r.get("state"), r.get("in_flight"), _seconds(r.get("idle_seconds")),
         _seconds(r.get("load_seconds")), r.get("pinned")] for r in resident),
        title="resident adapters", empty="no adapter is resident")
    cache = engine.get("disk_cache")
    if cache:
        out.fields([("disk cache", ", ".join(
            f"{k}={size(v) if k.endswith('bytes') and isinstance(v, int) else v}"
            for k, v in cache.items()))])


def _seconds(value: Any) -> Any:
    return f"{value:.2f}" if isinstance(value, float) else value
