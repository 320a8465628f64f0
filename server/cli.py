"""The `loraplex` command: `loraplex up` runs the whole server on embedded defaults."""

from __future__ import annotations

import argparse
import logging
import sys
import time

import uvicorn
from rich.console import Console

from server.settings import Settings

console = Console(stderr=True)


def _up(settings: Settings) -> int:
    from server.app import create_app
    from server.services import Services

    settings.home.mkdir(parents=True, exist_ok=True)
    if settings.model_path is None:
        from adapters.base_model import ensure_default_model

        started = time.monotonic()
        with console.status("[bold]Preparing the default base model[/]") as status:
            model_path = ensure_default_model(
                settings.models_dir, lambda msg: status.update(f"[bold]Base model:[/] {msg}"))
        console.print(f"Base model [cyan]{settings.model_name}[/] at {model_path} "
                      f"({time.monotonic() - started:.1f}s)")
    else:
        model_path = settings.model_path
    services = Services.build(settings, model_path=model_path)
    app = create_app(services)
    base = f"http://{settings.host}:{settings.port}"
    engine = settings.engine_url or "spawned vLLM on loopback (log: "
    if settings.engine_url is None:
        engine += f"{settings.home / 'logs' / 'engine.log'})"
    console.print(f"""[bold green]loraplex[/] gateway on {base}, engine: {engine}
Data folder: {settings.home}
Admin token: [bold]{services.admin_token}[/]  (set LORAPLEX_ADMIN_TOKEN to choose it)
GET {base}/healthz answers 200 once the engine is ready (about 30 s on a CPU).

Try it:
  export ADMIN={services.admin_token}
  curl -s -X POST {base}/admin/tenants -H "Authorization: Bearer $ADMIN" -d '{{"id":"acme"}}'
  KEY=$(curl -s -X POST {base}/admin/tenants/acme/keys -H "Authorization: Bearer $ADMIN" \\
        | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])')
  curl -s {base}/v1/chat/completions -H "X-Tenant-ID: acme" -H "Authorization: Bearer $KEY" \\
       -H 'Content-Type: application/json' \\
       -d '{{"model":"{settings.model_name}",
            "messages":[{{"role":"user","content":"What is the capital of France?"}}]}}'
""")
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info",
                            timeout_graceful_shutdown=10, access_log=False)
    uvicorn.Server(config).run()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loraplex", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="run the gateway and a supervised vLLM engine (LORAPLEX_* settings)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    settings = Settings()
    if args.command == "up":
        return _up(settings)
    return 2


if __name__ == "__main__":
    sys.exit(main())
