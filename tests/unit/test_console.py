"""The web console's HTTP surface: the page, its versioned assets, caching and security
headers, and static checks of the JS (no HTML strings, no credential in a URL)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from server.console.assets import ConsoleAssets, console_assets
from tests.unit.conftest import Gw

CONSOLE_DIR = Path(__file__).resolve().parents[2] / "server" / "console"
SCRIPTS = sorted(CONSOLE_DIR.glob("*.js"))


def asset_urls(page: str) -> list[str]:
    return re.findall(r'(?:src|href)="(/console/static/[^"]+)"', page)


async def test_console_page_is_served_uncached_with_a_strict_policy(gw: Gw) -> None:
    resp = await gw.client.get("/console")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/html")
    assert resp.headers["cache-control"] == "no-cache"
    csp = resp.headers["content-security-policy"]
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["default-src"] == "'self'"
    assert directives["script-src"] == "'self'"  # no 'unsafe-inline', no 'unsafe-eval'
    assert directives["frame-ancestors"] == "'none'"
    assert directives["object-src"] == "'none'"
    assert directives["require-trusted-types-for"] == "'script'"
    assert "unsafe" not in csp
    assert resp.headers["x-content-type-options"] == "nosniff"
    assert resp.headers["referrer-policy"] == "no-referrer"
    assert resp.headers["x-frame-options"] == "DENY"
    assert "set-cookie" not in resp.headers
    # Everything the page loads is a versioned asset of this origin; no inline script or style.
    assert "<script>" not in resp.text and "<style" not in resp.text and " style=" not in resp.text
    assert not re.search(r"\son[a-z]+=", resp.text)
    assert "{{version}}" not in resp.text
    version = console_assets().version
    urls = asset_urls(resp.text)
    assert {u.rsplit("/", 1)[1] for u in urls} >= {"app.js", "console.css"}
    assert all(u.startswith(f"/console/static/{version}/") for u in urls)


async def test_every_asset_is_served_immutable_with_its_type(gw: Gw) -> None:
    assets = console_assets()
    types = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
    assert {p.name for p in SCRIPTS} <= set(assets.files)
    for name in assets.files:
        resp = await gw.client.get(f"/console/static/{assets.version}/{name}")
        assert resp.status_code == 200, name
        assert resp.headers["content-type"].startswith(types[Path(name).suffix]), name
        assert resp.headers["cache-control"] == "public, max-age=31536000, immutable"
        assert resp.headers["x-content-type-options"] == "nosniff"
        assert "content-security-policy" in resp.headers
        assert resp.content == (CONSOLE_DIR / name).read_bytes()


@pytest.mark.parametrize("url", [
    "/console/static/{v}/nope.js",
    "/console/static/{v}/index.html",  # the page is not an asset
    "/console/static/{v}/assets.py",  # nor is the Python next to the assets
    "/console/static/0000000000000000/app.js",  # an old (or made-up) version
    "/console/static/{v}/..%2fassets.py",
    "/console/static/{v}/%2e%2e%2f%2e%2e%2fsettings.py",
])
async def test_unknown_assets_are_404_in_openai_shape_and_never_cached(gw: Gw, url: str) -> None:
    resp = await gw.client.get(url.format(v=console_assets().version))
    gw.expect_error(resp, 404)
    assert resp.headers["cache-control"] == "no-store"
    assert resp.headers["x-content-type-options"] == "nosniff"


async def test_the_console_answers_other_methods_in_openai_shape(gw: Gw) -> None:
    gw.expect_error(await gw.client.post("/console", data={"x": "1"}), 405)
    gw.expect_error(await gw.client.delete(f"/console/static/{console_assets().version}/app.js"),
                    405)


def test_the_version_changes_with_any_file(tmp_path: Path) -> None:
    for p in CONSOLE_DIR.iterdir():
        if p.suffix in (".html", ".js", ".css", ".svg"):
            (tmp_path / p.name).write_bytes(p.read_bytes())
    before = ConsoleAssets.from_folder(tmp_path)
    assert before.version == console_assets().version
    (tmp_path / "chart.js").write_text((tmp_path / "chart.js").read_text() + "\n// changed\n")
    after = ConsoleAssets.from_folder(tmp_path)
    assert after.version != before.version
    assert after.get(before.version, "chart.js") is None
    assert after.get(after.version, "chart.js") is not None


def test_scripts_build_no_html_from_strings() -> None:
    # Tenant-controlled text (adapter names, job events, model output) must never be parsed
    # as HTML; the CSP's Trusted Types enforce it in the browser, this keeps it out of the code.
    sinks = re.compile(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|\beval\(|"
                       r"new Function|setAttribute\(\s*[\"']on|createContextualFragment")
    for script in SCRIPTS:
        assert not sinks.search(script.read_text()), script.name


def test_the_credential_travels_only_in_headers() -> None:
    # The credential is read in api.js alone, and only to build the Authorization header;
    # no script puts anything into the location but page names and ids.
    for script in SCRIPTS:
        text = script.read_text()
        if script.name != "api.js":
            assert ".token" not in text.replace("token.value", ""), script.name
            assert "sessionStorage" not in text and "localStorage" not in text, script.name
        assert "document.cookie" not in text, script.name
    api = (CONSOLE_DIR / "api.js").read_text()
    uses = [line.strip() for line in api.splitlines() if "cred.token" in line]
    assert uses == ['const headers = { Authorization: `Bearer ${cred.token}` };'], uses
    assert 'credentials: "omit"' in api
