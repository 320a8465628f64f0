"""The console's static files, read once from this package and served from memory.

Every asset lives under one versioned folder, `/console/static/<version>/<name>`, where the
version is a hash of all the files together. A changed file changes every URL, so assets can be
cached forever (`immutable`) while the page itself (`/console`, never cached) names the current
version. JS modules import each other by relative path (`./api.js`), which stays inside the
same versioned folder: no import map (it would be an inline script) and no rewriting.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

_MEDIA_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
_PAGE = "index.html"
_VERSION_MARK = "{{version}}"


@dataclass(frozen=True)
class Asset:
    body: bytes
    media_type: str


@dataclass(frozen=True)
class ConsoleAssets:
    version: str
    page: bytes
    files: dict[str, Asset]

    @classmethod
    def from_folder(cls, folder: Path) -> ConsoleAssets:
        """Every asset of `folder` (flat: no subfolders), and the page with its version."""
        files = {p.name: Asset(p.read_bytes(), _MEDIA_TYPES[p.suffix])
                 for p in sorted(folder.iterdir()) if p.suffix in _MEDIA_TYPES}
        digest = hashlib.sha256()
        for name, asset in files.items():
            digest.update(name.encode() + b"\0" + hashlib.sha256(asset.body).digest())
        page_text = (folder / _PAGE).read_text(encoding="utf-8")
        digest.update(page_text.encode())
        version = digest.hexdigest()[:16]
        return cls(version=version, page=page_text.replace(_VERSION_MARK, version).encode(),
                   files=files)

    def get(self, version: str, name: str) -> Asset | None:
        """The asset `name` of this version; None for another version or an unknown name
        (names are looked up, never joined to a path)."""
        return self.files.get(name) if version == self.version else None


@cache
def console_assets() -> ConsoleAssets:
    return ConsoleAssets.from_folder(Path(__file__).parent)
