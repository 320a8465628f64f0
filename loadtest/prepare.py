"""Create tenants, keys and adapters on a running loraplex for the k6 / locust scenarios.

    .venv/bin/python loadtest/prepare.py --url http://127.0.0.1:8000 --admin-token $ADMIN \
        --tenants 3 --adapters 4 --out loadtest/targets.json

Writes {"base_url", "base_model", "tenants": [{"id", "key", "models": [...]}]} for the
load scripts. Adapters are random PEFT adapters for the default base model.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from adapters.base_model import ensure_default_model  # noqa: E402
from adapters.synthetic import make_random_adapters  # noqa: E402
from server.settings import DEFAULT_MODEL_NAME  # noqa: E402


def prepare(url: str, admin_token: str, tenants: int, adapters: int, prefix: str) -> dict:
    admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin_token}"},
                         timeout=120)
    model = ensure_default_model(REPO / ".cache" / "models")
    folders = make_random_adapters(model, Path(tempfile.mkdtemp()), adapters, rank=8,
                                   base_model_name=DEFAULT_MODEL_NAME)
    out = {"base_url": url, "base_model": DEFAULT_MODEL_NAME, "tenants": []}
    for t in range(tenants):
        tenant = f"{prefix}{t}"
        r = admin.post("/admin/tenants", json={"id": tenant})
        if r.status_code not in (201, 409):
            r.raise_for_status()
        key = admin.post(f"/admin/tenants/{tenant}/keys", json={"name": "load"}).json()["key"]
        models = []
        for i, folder in enumerate(folders):
            files = {n: (n, (folder / n).read_bytes())
                     for n in ("adapter_config.json", "adapter_model.safetensors")}
            admin.post(f"/admin/tenants/{tenant}/adapters/bot{i}/versions",
                       files=files).raise_for_status()
            models.append(f"bot{i}")
        out["tenants"].append({"id": tenant, "key": key, "models": models})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--admin-token", required=True)
    p.add_argument("--tenants", type=int, default=3)
    p.add_argument("--adapters", type=int, default=4, help="adapters per tenant")
    p.add_argument("--prefix", default="load")
    p.add_argument("--out", type=Path, default=REPO / "loadtest" / "targets.json")
    args = p.parse_args()
    targets = prepare(args.url, args.admin_token, args.tenants, args.adapters, args.prefix)
    args.out.write_text(json.dumps(targets, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
