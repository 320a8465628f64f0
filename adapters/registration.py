"""Registering an adapter version: validate, store, then commit the registry row.

Order matters for "nothing half-written": the files are validated before anything is
written, stored (staged, verified, renamed) before the row exists, and removed again if
the row cannot be committed. A reader therefore never resolves a version whose files are
missing or unchecked.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from adapters.base_model import BaseModelInfo
from adapters.names import check_name
from adapters.registry import AdapterVersion, Registry, VersionSpec
from adapters.store import AdapterStore, Manifest, version_key
from adapters.validation import AdapterLimits, validate_adapter


async def register_version(registry: Registry, store: AdapterStore, base: BaseModelInfo,
                           limits: AdapterLimits, tenant: str, name: str, folder: Path,
                           source: str, served_model: str) -> AdapterVersion:
    check_name(name, "adapter")
    await registry.get_tenant(tenant)
    checked = await asyncio.to_thread(validate_adapter, folder, base, limits)
    hinted = checked.spec.base_model
    if hinted and hinted != served_model:
        # Compatibility was decided by tensor names and shapes; the name is only a hint.
        checked.warnings.append(
            f"base_model_name_or_path is {hinted!r}, the server's base model is "
            f"{served_model!r}; the tensor shapes fit, so it was accepted")
    version, created = await registry.reserve_version(tenant, name)
    key = version_key(tenant, name, version)
    manifest = Manifest.build(tenant, name, version, folder, checked, source)
    try:
        await store.put(key, folder, manifest)
        try:
            return await registry.add_version(tenant, name, version, VersionSpec(
                store_key=key, source=source, spec=checked.spec,
                meta={"warnings": checked.warnings, "files": manifest.files}))
        except BaseException:
            await store.delete(key)
            raise
    except BaseException:
        if created:
            await registry.abandon_reservation(tenant, name)
        raise
