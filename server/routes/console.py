"""The web console at /console (issue 13): static assets shipped in the package.

The page and its assets are public (they hold no data); every call the console makes goes to
the admin or tenant API with the credential in the `Authorization` header, which a browser
never attaches on its own: no cookie, so no cross-site request can act for the user.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from server.console.assets import console_assets
from server.errors import error_response

router = APIRouter(include_in_schema=False)

# No inline script or style, nothing from another origin, no framing; Trusted Types make any
# string assignment to innerHTML (and other HTML sinks) throw, so the DOM is built with
# textContent and createElement only.
CONTENT_SECURITY_POLICY = "; ".join((
    "default-src 'self'", "script-src 'self'", "style-src 'self'", "img-src 'self' data:",
    "connect-src 'self'", "font-src 'self'", "object-src 'none'", "base-uri 'none'",
    "form-action 'none'", "frame-ancestors 'none'",
    "require-trusted-types-for 'script'", "trusted-types 'none'",
))
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
# The page names the current asset version, so it is revalidated on every load; assets are
# named by version and never change.
PAGE_CACHE = "no-cache"
ASSET_CACHE = "public, max-age=31536000, immutable"


@router.get("/console")
async def console_page() -> Response:
    return Response(console_assets().page, media_type="text/html; charset=utf-8",
                    headers={**SECURITY_HEADERS, "Cache-Control": PAGE_CACHE})


@router.get("/console/static/{version}/{name:path}")
async def console_asset(version: str, name: str) -> Response:
    asset = console_assets().get(version, name)
    if asset is None:
        response: Response = error_response(404, f"no console asset {name!r} in this version",
                                            code="not_found")
        response.headers.update({**SECURITY_HEADERS, "Cache-Control": "no-store"})
        return response
    return Response(asset.body, media_type=asset.media_type,
                    headers={**SECURITY_HEADERS, "Cache-Control": ASSET_CACHE})
