"""The `loraplex` command: `loraplex up` runs the whole server on embedded defaults."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import uvicorn
from rich.console import Console

from server.admin_cli import add_commands as add_admin_commands
from server.settings import Settings

console = Console(stderr=True)


def _prepare_model(settings: Settings) -> Path:
    """The base model folder: LORAPLEX_MODEL_PATH, or the default model (built once)."""
    if settings.model_path is not None:
        return settings.model_path
    from adapters.base_model import ensure_default_model

    started = time.monotonic()
    with console.status("[bold]Preparing the default base model[/]") as status:
        model_path = ensure_default_model(
            settings.models_dir, lambda msg: status.update(f"[bold]Base model:[/] {msg}"))
    console.print(f"Base model [cyan]{settings.model_name}[/] at {model_path} "
                  f"({time.monotonic() - started:.1f}s)")
    return model_path


def _print_banner(settings: Settings, serving: str, admin_token: str, ready_when: str) -> None:
    base = f"http://{settings.host}:{settings.port}"
    console.print(f"""[bold green]loraplex[/] {serving}
Data folder: {settings.home}
Admin token: [bold]{admin_token}[/]  (set LORAPLEX_ADMIN_TOKEN to choose it)
GET {base}/healthz answers 200 once {ready_when} (about a minute on a CPU).
""", soft_wrap=True)
    # No markup, no wrapping: the example must survive copy-paste.
    console.print(example_text(base, admin_token, settings.model_name), markup=False,
                  highlight=False, soft_wrap=True)


def _uvicorn_config(app: Any, settings: Settings) -> uvicorn.Config:
    # No proxy-headers middleware: nothing reads the client address, and it parses the
    # peer's IP on every request. The access log is loraplex's own (server.request_log).
    return uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info",
                          timeout_graceful_shutdown=10, access_log=False, proxy_headers=False)


def _up(settings: Settings, units: int = 1) -> int:
    from server.app import create_app
    from server.services import Services

    settings.home.mkdir(parents=True, exist_ok=True)
    if (failed := _db(settings, "upgrade")) != 0:  # a clear error, not a traceback at start
        return failed
    if units != 1:
        return _up_units(settings, units)
    model_path = _prepare_model(settings)
    base = f"http://{settings.host}:{settings.port}"
    engine = settings.engine_url or f"spawned vLLM on loopback (log: {settings.engine_log_path})"
    if settings.gateway_processes > 1:
        from server.gateway_processes import run_gateway_processes
        from server.services import shared_secrets

        _, admin_token = shared_secrets(settings)  # before the processes start: they read it
        _print_banner(settings, f"gateway on {base} ({settings.gateway_processes} processes), "
                      f"engine: {engine}", admin_token, "the engine is ready")

        def serve() -> int:
            return run_gateway_processes(settings, model_path)
    else:
        services = Services.build(settings, model_path=model_path)
        config = _uvicorn_config(create_app(services), settings)
        _print_banner(settings, f"gateway on {base}, engine: {engine}", services.admin_token,
                      "the engine is ready")

        def serve() -> int:
            uvicorn.Server(config).run()
            return 0
    workers = [_spawn_worker(settings, model_path, i) for i in range(settings.workers)]
    stopping = threading.Event()

    def supervise_workers() -> None:
        # A worker that dies (OOM, kill) is started again; its job resumes from a checkpoint.
        while not stopping.wait(2.0):
            for i, proc in enumerate(workers):
                if proc.poll() is not None and not stopping.is_set():
                    console.print(f"Training worker {i} exited ({proc.returncode}); restarting")
                    workers[i] = _spawn_worker(settings, model_path, i)

    threading.Thread(target=supervise_workers, daemon=True).start()
    try:
        return serve()
    finally:
        stopping.set()
        for proc in workers:
            proc.terminate()
        for proc in workers:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


def _up_units(settings: Settings, count: int) -> int:
    """`loraplex up --units N` (N > 1): N units behind Envoy, and the workers
    (server/cluster/units.py)."""
    from server.cluster.units import Cluster, ClusterError
    from server.services import shared_secrets

    try:
        cluster = Cluster.plan(settings, count)
    except ClusterError as exc:
        console.print(f"[bold red]loraplex up --units {count}:[/] {exc}", highlight=False)
        return 1
    model_path = _prepare_model(settings)
    _, admin_token = shared_secrets(settings)  # before the units start: they all read it
    units = ", ".join(u.address for u in cluster.units)
    _print_banner(settings, f"front (Envoy) on {cluster.front_url}, {count} units ({units})",
                  admin_token, "at least one unit is ready")

    def say(message: str) -> None:
        console.print(f"{time.strftime('%H:%M:%S')} {message}", markup=False, highlight=False,
                      soft_wrap=True)

    return cluster.run(model_path, say)


def _unit(settings: Settings) -> int:
    """One serving unit: a gateway and its supervised engine, no workers, no banner (what
    `loraplex up --units N` runs N of, and what a deployment runs per GPU)."""
    from server.services import resolve_model_path

    parent = os.environ.pop("LORAPLEX_PARENT_PID", "")
    if parent and os.getppid() != int(parent):
        return 1  # `up` died before it could ask to take this unit with it
    settings.home.mkdir(parents=True, exist_ok=True)
    if (failed := _db(settings, "upgrade")) != 0:  # a clear error, not a traceback at start
        return failed
    if settings.gateway_processes > 1:
        from server.gateway_processes import run_gateway_processes

        return run_gateway_processes(settings, resolve_model_path(settings))
    return _serve_gateway(settings)


def _serve_gateway(settings: Settings, fd: int | None = None) -> int:
    """This process's gateway, on its own port or on the socket `fd` its unit bound."""
    from server.app import create_app
    from server.services import Services, resolve_model_path

    services = Services.build(settings, model_path=resolve_model_path(settings))
    config = _uvicorn_config(create_app(services), settings)
    config.fd = fd
    uvicorn.Server(config).run()
    return 0


def _gateway_process(settings: Settings) -> int:
    """One gateway process of a unit with several (server/gateway_processes.py), on the
    socket its unit bound."""
    from server.gateway_processes import listen_fd

    fd = listen_fd()
    if fd is None:
        console.print("[bold red]gateway-process[/] is started by `loraplex unit` or "
                      "`loraplex up` when LORAPLEX_GATEWAY_PROCESSES > 1")
        return 2
    return _serve_gateway(settings, fd)


EXAMPLE_TENANT = "acme"
EXAMPLE_QUESTION = "What is the capital of France?"


def example_chat_request(model_name: str) -> dict[str, Any]:
    """The body of the chat request that `loraplex up`'s example sends. It sets no sampling
    parameters, so the model's generation defaults apply; an integration test sends exactly
    this body and checks the answer."""
    return {"model": model_name, "messages": [{"role": "user", "content": EXAMPLE_QUESTION}]}


def example_text(base: str, admin_token: str, model_name: str) -> str:
    """The copy-paste example `loraplex up` prints: a tenant, a key, then one chat request."""
    body = json.dumps(example_chat_request(model_name), separators=(",", ":"))
    t = EXAMPLE_TENANT
    return f"""Try it:
  export ADMIN={admin_token}
  curl -s -X POST {base}/admin/tenants -H "Authorization: Bearer $ADMIN" -d '{{"id":"{t}"}}'
  KEY=$(curl -s -X POST {base}/admin/tenants/{t}/keys -H "Authorization: Bearer $ADMIN" \\
        | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])')
  curl -s {base}/v1/chat/completions -H "X-Tenant-ID: {t}" -H "Authorization: Bearer $KEY" \\
       -H 'Content-Type: application/json' \\
       -d '{body}'
"""


def _spawn_worker(settings: Settings, model_path: Path, index: int) -> subprocess.Popen[bytes]:
    """A `loraplex worker` child (own process: training must not stall the gateway)."""
    from server.engine.process import _die_with_parent

    log_path = settings.home / "logs" / f"worker-{index}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "LORAPLEX_HOME": str(settings.home),
           "LORAPLEX_MODEL_PATH": str(model_path), "HF_HUB_OFFLINE": "1"}
    with log_path.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "server.cli", "worker"], env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_die_with_parent)
    console.print(f"Training worker {index} started (pid {proc.pid}, log: {log_path})")
    return proc


def _worker(settings: Settings) -> int:
    """Run one training worker until SIGTERM/SIGINT."""
    import asyncio
    import signal

    from adapters.registry import Registry
    from server.services import build_worker, resolve_model_path

    if (failed := _db(settings, "upgrade")) != 0:  # a clear error, not a traceback at start
        return failed

    async def run() -> None:
        registry = Registry(settings.registry_url)
        worker = build_worker(settings, registry, resolve_model_path(settings))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await worker.run_forever(stop)
        finally:
            await registry.close()

    asyncio.run(run())
    return 0


def _db(settings: Settings, action: str) -> int:
    """`db upgrade`: bring the registry schema to the newest revision (idempotent; safe while
    units and workers start, which run the same upgrade); `db current`: where it stands."""
    import asyncio

    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from adapters.registry import Registry, SchemaError, SchemaState

    async def run() -> SchemaState:
        registry = Registry(settings.registry_url)
        try:
            if action == "upgrade":
                return await registry.create_schema()
            return await registry.schema_state()
        finally:
            await registry.close()

    where = make_url(settings.registry_url).render_as_string(hide_password=True)
    if settings.database_url is None:
        settings.home.mkdir(parents=True, exist_ok=True)
    try:
        state = asyncio.run(run())
    except SchemaError as exc:
        console.print(f"[bold red]Registry schema of {where}:[/] {exc}", soft_wrap=True)
        return 1
    except (OSError, SQLAlchemyError) as exc:
        console.print(f"[bold red]Registry database {where} unreachable:[/] {exc}",
                      soft_wrap=True)
        return 1
    print(f"{where}: {state.describe()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="loraplex", description=__doc__,
        epilog="Admin commands (tenants, keys, adapters, jobs, engine) talk to a running server "
               "(--url / LORAPLEX_URL, --admin-token / LORAPLEX_ADMIN_TOKEN) and exit 0 done, "
               "1 refused (the API's 4xx, or the local adapter check), 2 usage, 3 server "
               "unreachable or 5xx, 4 `jobs follow`: the job failed or was cancelled, "
               "130 interrupted.")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="run the gateway, a supervised vLLM engine and training workers")
    up.add_argument("--units", type=int, default=1, metavar="N",
                    help="serving units (gateway + engine each, one GPU each when there are "
                         "GPUs) behind Envoy on LORAPLEX_PORT; 1 (default): no Envoy")
    sub.add_parser("unit", help="run one serving unit: a gateway and its vLLM engine, no workers")
    sub.add_parser("worker", help="run one training worker (claims fine-tuning jobs)")
    sub.add_parser("gateway-process", help="(internal) one of a unit's gateway processes, "
                   "started by `unit` / `up` when LORAPLEX_GATEWAY_PROCESSES > 1")
    db = sub.add_parser("db", help="the registry database schema (Alembic migrations)")
    db.add_argument("action", choices=["upgrade", "current"],
                    help="upgrade: to the newest revision (idempotent, safe concurrently); "
                         "current: show the revision")
    add_admin_commands(sub)
    args = parser.parse_args(argv)
    if getattr(args, "admin_handler", None) is not None:
        # Admin commands talk to a running server over HTTP; they start nothing here.
        return int(args.admin_handler(args))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # Alembic logs each migration step at INFO; `_db` prints the outcome in one line.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    settings = Settings()
    if args.command == "up":
        return _up(settings, args.units)
    if args.command == "unit":
        return _unit(settings)
    if args.command == "worker":
        return _worker(settings)
    if args.command == "gateway-process":
        return _gateway_process(settings)
    if args.command == "db":
        return _db(settings, args.action)
    return 2


if __name__ == "__main__":
    sys.exit(main())
