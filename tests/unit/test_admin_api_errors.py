"""Every bad input of the admin API gets the right status, OpenAI's error shape, and leaves
nothing half-written behind."""

from __future__ import annotations

import numpy as np

Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


def _stored_files(gw):
    store = gw.settings.store_dir
    return sorted(p for p in store.rglob("*") if p.is_file()) if store.exists() else []


def _staging_files(gw):
    tmp = gw.settings.home / "tmp"
    return sorted(p for p in tmp.rglob("*") if p.is_file()) if tmp.exists() else []


async def assert_nothing_stored(gw, tenant, name):
    listed = await gw.admin("GET", f"/admin/tenants/{tenant}/adapters")
    assert listed.status_code == 200, listed.text
    assert listed.json()["data"] == []
    gw.expect_error(await gw.admin("GET", f"/admin/tenants/{tenant}/adapters/{name}"), 404)
    assert _stored_files(gw) == []
    assert _staging_files(gw) == []


# -- admin authentication ------------------------------------------------------------------------

ADMIN_CALLS = [
    ("GET", "/admin/tenants", None),
    ("POST", "/admin/tenants", {"id": "acme"}),
    ("GET", "/admin/engine", None),
    ("POST", "/admin/tenants/acme/keys", None),
    ("DELETE", "/admin/tenants/acme", None),
    ("POST", "/admin/tenants/acme/adapters/x/versions", {"path": "/tmp"}),
    ("PUT", "/admin/tenants/acme/adapters/x/aliases/prod", {"version": 1}),
]
BAD_ADMIN_AUTH = [None, "Bearer wrong-token", "Bearer admin-test-but-longer",
                  "Bearer admin-tes", "Basic YWRtaW46YWRtaW4=", "admin-test", "Bearer ",
                  "Bearer ADMIN-TEST"]


async def test_admin_without_valid_token_is_401(gw, subtests):
    for method, path, body in ADMIN_CALLS:
        for authorization in BAD_ADMIN_AUTH:
            with subtests.test(method=method, path=path, authorization=authorization):
                headers = {} if authorization is None else {"Authorization": authorization}
                resp = await gw.client.request(method, path, json=body, headers=headers)
                err = gw.expect_error(resp, 401)
                assert err["type"] == "authentication_error"
    tenants = (await gw.admin("GET", "/admin/tenants")).json()["data"]
    assert tenants == []


async def test_tenant_key_is_not_an_admin_token(gw):
    key = await gw.new_tenant("acme")
    resp = await gw.client.get("/admin/tenants", headers=gw.headers("acme", key))
    gw.expect_error(resp, 401, contains="invalid admin token")


# -- tenants and keys ----------------------------------------------------------------------------

async def test_duplicate_tenant_is_409(gw):
    assert (await gw.admin("POST", "/admin/tenants", json={"id": "acme"})).status_code == 201
    err = gw.expect_error(await gw.admin("POST", "/admin/tenants", json={"id": "acme"}), 409,
                          code="tenant_exists")
    assert err["type"] == "conflict_error"
    assert [t["id"] for t in (await gw.admin("GET", "/admin/tenants")).json()["data"]] == ["acme"]


async def test_bad_tenant_id_is_400(gw, subtests):
    for tenant_id in ["../x", "", "a/b", "..", ".hidden", "a\\b", "x" * 65, "with space",
                      "-dash-first", "a..b", "ümlaut", "a\x00b", 123, None, ["acme"]]:
        with subtests.test(tenant_id=tenant_id):
            resp = await gw.admin("POST", "/admin/tenants", json={"id": tenant_id})
            err = gw.expect_error(resp, 400)
            assert err["type"] == "invalid_request_error"
    assert (await gw.admin("GET", "/admin/tenants")).json()["data"] == []
    assert not (gw.settings.home / "x").exists()


async def test_bad_tenant_body_is_400(gw, subtests):
    for raw in [b"{oops", b"[]", b'{"id": "acme", "extra": 1}', b"{}", b"", b"null"]:
        with subtests.test(raw=raw):
            resp = await gw.admin("POST", "/admin/tenants", content=raw,
                                  headers={"Content-Type": "application/json"})
            gw.expect_error(resp, 400)
    assert (await gw.admin("GET", "/admin/tenants")).json()["data"] == []


async def test_unknown_tenant_and_key_are_404(gw):
    gw.expect_error(await gw.admin("GET", "/admin/tenants/nobody"), 404, code="tenant_not_found")
    gw.expect_error(await gw.admin("POST", "/admin/tenants/nobody/keys"), 404)
    gw.expect_error(await gw.admin("GET", "/admin/tenants/nobody/keys"), 404)
    gw.expect_error(await gw.admin("DELETE", "/admin/tenants/nobody"), 404)
    await gw.new_tenant("acme")
    gw.expect_error(await gw.admin("DELETE", "/admin/tenants/acme/keys/deadbeef"), 404)
    gw.expect_error(await gw.admin("GET", "/admin/tenants/acme/adapters/none"), 404,
                    code="adapter_not_found")
    gw.expect_error(await gw.admin("DELETE", "/admin/tenants/acme/adapters/none"), 404)


async def test_revoking_another_tenants_key_is_404(gw):
    key_a = await gw.new_tenant("tenant-a")
    await gw.new_tenant("tenant-b")
    key_id = (await gw.admin("GET", "/admin/tenants/tenant-a/keys")).json()["data"][0]["id"]
    gw.expect_error(await gw.admin("DELETE", f"/admin/tenants/tenant-b/keys/{key_id}"), 404)
    resp = await gw.chat("tenant-a", key_a, "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert resp.status_code == 200, resp.text


async def test_bad_key_body_is_400(gw):
    await gw.new_tenant("acme")
    gw.expect_error(await gw.admin("POST", "/admin/tenants/acme/keys", json={"nme": "typo"}),
                    400, contains="nme")
    gw.expect_error(await gw.admin("POST", "/admin/tenants/acme/keys", json={"name": "x" * 129}),
                    400)


# -- adapter uploads -----------------------------------------------------------------------------

def _bad_shape(tensors):
    tensors[f"{Q0}.lora_B.weight"] = np.zeros((63, 8), np.float32)


def _wrong_rank_tensor(tensors):
    tensors[f"{Q0}.lora_A.weight"] = np.zeros((4, 64), np.float32)


def _absent_layer(tensors):
    tensors["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = np.zeros(
        (8, 64), np.float32)


def _not_lora(tensors):
    tensors["base_model.model.model.layers.0.self_attn.q_proj.weight"] = np.zeros(
        (64, 64), np.float32)


def _empty(tensors):
    tensors.clear()


def _one_d(tensors):
    tensors[f"{Q0}.lora_A.weight"] = np.zeros((8 * 64,), np.float32)


BAD_ADAPTERS = {
    "rank over max_lora_rank": ({"r": 32}, "raise LORAPLEX_MAX_LORA_RANK"),
    "target module absent": ({"targets": ("q_proj", "w_proj")}, "do not exist in the base model"),
    "target regex matches nothing": ({"targets": r".*\.w_proj"}, "matches no module"),
    "tensor with wrong shape": ({"tensors_hook": _bad_shape}, "has shape (63, 8)"),
    "tensor rank disagrees with r": ({"tensors_hook": _wrong_rank_tensor}, "has shape (4, 64)"),
    "tensor for an absent layer": ({"tensors_hook": _absent_layer}, "does not have"),
    "tensor that is not LoRA": ({"tensors_hook": _not_lora}, "not a LoRA A/B weight"),
    "no tensors": ({"tensors_hook": _empty}, "holds no tensors"),
    "1-D tensor": ({"tensors_hook": _one_d}, "has shape"),
    "truncated safetensors": ({"truncate_bytes": 100}, "safetensors"),
    "use_dora": ({"config_overrides": {"use_dora": True}}, "DoRA"),
    "modules_to_save": ({"config_overrides": {"modules_to_save": ["lm_head"]}},
                        "modules_to_save"),
    "lora bias": ({"config_overrides": {"bias": "all"}}, "bias"),
    "not LORA": ({"config_overrides": {"peft_type": "IA3"}}, "not LORA"),
    "r not an int": ({"config_overrides": {"r": "8"}}, "r must be a positive integer"),
    "negative alpha": ({"config_overrides": {"lora_alpha": -1}}, "lora_alpha"),
    "no target_modules": ({"config_overrides": {"target_modules": []}}, "target_modules"),
    "bad JSON config": ({"config_text": "{not json"}, "not valid JSON"),
    "config not an object": ({"config_text": "[1, 2]"}, "must be a JSON object"),
    "config not utf-8": ({"config_text": "\udcff"}, None),
}


async def test_bad_adapter_upload_is_400_and_stores_nothing(gw, make_adapter, subtests):
    await gw.new_tenant("acme")
    for case, (knobs, phrase) in BAD_ADAPTERS.items():
        with subtests.test(case=case):
            if knobs.get("config_text") == "\udcff":
                folder = make_adapter()
                (folder / "adapter_config.json").write_bytes(b'{"r": 8, "x": "\xff\xfe"}')
                phrase = "not valid JSON"
            else:
                folder = make_adapter(**knobs)
            resp = await gw.upload("acme", "support", folder)
            err = gw.expect_error(resp, 400, contains=phrase, code="invalid_adapter")
            assert err["type"] == "invalid_request_error"
            assert err["message"].startswith("adapter refused: ")
            await assert_nothing_stored(gw, "acme", "support")
    assert gw.engine.load_calls == []


def _files(folder, *names, rename=None):
    rename = rename or {}
    return [(rename.get(n, n), (rename.get(n, n), (folder / n).read_bytes(),
                                "application/octet-stream")) for n in names]


async def test_pickle_weights_are_refused(gw, make_adapter):
    folder = make_adapter()
    await gw.new_tenant("acme")
    files = _files(folder, "adapter_config.json", "adapter_model.safetensors",
                   rename={"adapter_model.safetensors": "adapter_model.bin"})
    err = gw.expect_error(await gw.upload("acme", "support", files=files), 400,
                          contains="adapter_model.bin: pickle weights are refused")
    assert "missing adapter_model.safetensors" in err["message"]
    await assert_nothing_stored(gw, "acme", "support")


async def test_pickle_beside_safetensors_is_refused(gw, make_adapter):
    folder = make_adapter()
    await gw.new_tenant("acme")
    files = _files(folder, "adapter_config.json", "adapter_model.safetensors")
    files.append(("adapter_model.bin", ("adapter_model.bin", b"\x80\x04pickle", "x/y")))
    gw.expect_error(await gw.upload("acme", "support", files=files), 400, contains="pickle")
    await assert_nothing_stored(gw, "acme", "support")


async def test_missing_safetensors_is_refused(gw, make_adapter):
    folder = make_adapter(weights=False)
    await gw.new_tenant("acme")
    gw.expect_error(await gw.upload("acme", "support", folder), 400,
                    contains="missing adapter_model.safetensors", code="invalid_adapter")
    await assert_nothing_stored(gw, "acme", "support")


async def test_missing_config_is_refused(gw, make_adapter):
    folder = make_adapter()
    await gw.new_tenant("acme")
    files = _files(folder, "adapter_model.safetensors")
    gw.expect_error(await gw.upload("acme", "support", files=files), 400,
                    contains="missing adapter_config.json")
    await assert_nothing_stored(gw, "acme", "support")


async def test_path_traversal_file_name_is_refused(gw, make_adapter, subtests):
    folder = make_adapter()
    await gw.new_tenant("acme")
    for filename in ["../adapter_model.safetensors", "../../etc/adapter_config.json",
                     "sub/adapter_config.json", "..\\adapter_model.safetensors",
                     ".adapter_config.json", "/abs/adapter_model.safetensors"]:
        with subtests.test(filename=filename):
            files = [("adapter_config.json",
                      ("adapter_config.json", (folder / "adapter_config.json").read_bytes(),
                       "a/b")),
                     ("file", (filename, (folder / "adapter_model.safetensors").read_bytes(),
                               "a/b"))]
            gw.expect_error(await gw.upload("acme", "support", files=files), 400,
                            contains="is not a plain file name")
            await assert_nothing_stored(gw, "acme", "support")
            assert not (gw.settings.home / "adapter_model.safetensors").exists()
            assert not (gw.settings.home.parent / "adapter_model.safetensors").exists()


async def test_unexpected_and_duplicate_files_are_refused(gw, make_adapter):
    folder = make_adapter()
    await gw.new_tenant("acme")
    files = _files(folder, "adapter_config.json", "adapter_model.safetensors")
    extra = files + [("notes.txt", ("notes.txt", b"hello", "text/plain"))]
    gw.expect_error(await gw.upload("acme", "support", files=extra), 400,
                    contains="unexpected file 'notes.txt'")
    twice = files + files[:1]
    gw.expect_error(await gw.upload("acme", "support", files=twice), 400, contains="sent twice")
    await assert_nothing_stored(gw, "acme", "support")


async def test_form_field_that_is_not_a_file_is_refused(gw, make_adapter):
    folder = make_adapter()
    await gw.new_tenant("acme")
    resp = await gw.admin("POST", "/admin/tenants/acme/adapters/support/versions",
                          files=_files(folder, "adapter_config.json",
                                       "adapter_model.safetensors"),
                          data={"comment": "hello"})
    gw.expect_error(resp, 400, contains="not a file")
    await assert_nothing_stored(gw, "acme", "support")


async def test_readme_is_accepted_and_dropped(gw, make_adapter):
    folder = make_adapter()
    (folder / "README.md").write_text("# my adapter")
    await gw.new_tenant("acme")
    version = await gw.register("acme", "support", folder)
    stored = {p.name for p in _stored_files(gw)}
    assert stored == {"adapter_config.json", "adapter_model.safetensors", "manifest.json"}
    assert version["version"] == 1


async def test_bad_adapter_name_is_400(gw, make_adapter, subtests):
    from urllib.parse import quote

    await gw.new_tenant("acme")
    folder = make_adapter()
    for name in ["..x", "a..b", ".hidden", "x" * 65, "with space", "-x", "a@b"]:
        with subtests.test(name=name):
            resp = await gw.upload("acme", quote(name, safe=""), folder)
            gw.expect_error(resp, 400, contains="invalid adapter")
            assert _stored_files(gw) == [] and _staging_files(gw) == []
    assert (await gw.admin("GET", "/admin/tenants/acme/adapters")).json()["data"] == []


async def test_slash_in_adapter_name_matches_no_route(gw, make_adapter):
    await gw.new_tenant("acme")
    resp = await gw.upload("acme", "..%2Fx", make_adapter())
    gw.expect_error(resp, 404)
    assert _stored_files(gw) == [] and _staging_files(gw) == []


async def test_upload_for_unknown_tenant_is_404(gw, make_adapter):
    gw.expect_error(await gw.upload("nobody", "support", make_adapter()), 404)
    assert _stored_files(gw) == [] and _staging_files(gw) == []


async def test_refused_second_version_keeps_the_first(gw, make_adapter):
    key = await gw.new_tenant("acme")
    v1 = await gw.register("acme", "support", make_adapter())
    before = _stored_files(gw)
    gw.expect_error(await gw.upload("acme", "support", make_adapter(r=32)), 400)
    assert _stored_files(gw) == before and _staging_files(gw) == []
    adapter = (await gw.admin("GET", "/admin/tenants/acme/adapters/support")).json()
    assert [v["version"] for v in adapter["versions"]] == [1]
    resp = await gw.chat("acme", key, "support")
    assert resp.status_code == 200
    assert gw.engine.bodies[-1]["model"] == v1["engine_name"]


async def test_rank_pattern_not_a_dict_is_400(gw, make_adapter):
    await gw.new_tenant("acme")
    folder = make_adapter(config_overrides={"rank_pattern": [8, 8]})
    gw.expect_error(await gw.upload("acme", "support", folder), 400, contains="rank_pattern")
    await assert_nothing_stored(gw, "acme", "support")


async def test_target_modules_bad_regex_is_400(gw, make_adapter):
    await gw.new_tenant("acme")
    folder = make_adapter(targets="model.layers.(.*")
    gw.expect_error(await gw.upload("acme", "support", folder), 400, contains="target_modules")
    await assert_nothing_stored(gw, "acme", "support")


# -- failures after validation leave nothing behind ---------------------------------------------

async def test_store_failure_leaves_nothing(gw, make_adapter, monkeypatch):
    await gw.new_tenant("acme")
    import adapters.store as store_module

    monkeypatch.setattr(store_module, "verify_folder",
                        lambda folder, manifest: ["adapter_model.safetensors"])
    resp = await gw.upload("acme", "support", make_adapter())
    gw.expect_error(resp, 400, contains="changed while it was being stored")
    await assert_nothing_stored(gw, "acme", "support")
    assert [p for p in gw.settings.store_dir.rglob("*") if p.is_dir()
            and p.parent.name == ".staging"] == []


async def test_registry_failure_removes_stored_files(gw, make_adapter, monkeypatch):
    await gw.new_tenant("acme")
    registry = gw.services.registry

    async def broken_add_version(*args, **kwargs):
        raise OSError("database went away")

    monkeypatch.setattr(registry, "add_version", broken_add_version)
    resp = await gw.upload("acme", "support", make_adapter())
    gw.expect_error(resp, 500)
    await assert_nothing_stored(gw, "acme", "support")


# -- registering from a local path ---------------------------------------------------------------

async def test_local_path_outside_allowlist_is_403(gw, make_adapter, tmp_path):
    await gw.new_tenant("acme")
    outside = make_adapter()
    allowed = gw.settings.local_source_allowlist[0]
    for path in (str(outside), str(allowed / ".." / outside.relative_to(tmp_path)), "/etc",
                 "relative/dir"):
        resp = await gw.admin("POST", "/admin/tenants/acme/adapters/support/versions",
                              json={"path": path})
        err = gw.expect_error(resp, 403, code="source_not_allowed")
        assert err["type"] == "permission_error" and err["param"] == "path"
    await assert_nothing_stored(gw, "acme", "support")


async def test_local_path_symlinked_folder_out_of_allowlist_is_403(gw, make_adapter):
    await gw.new_tenant("acme")
    outside = make_adapter()
    link = gw.settings.local_source_allowlist[0] / "sneaky"
    link.symlink_to(outside, target_is_directory=True)
    resp = await gw.admin("POST", "/admin/tenants/acme/adapters/support/versions",
                          json={"path": str(link)})
    gw.expect_error(resp, 403, code="source_not_allowed")
    await assert_nothing_stored(gw, "acme", "support")


async def test_local_path_problems_are_400(gw, make_adapter):
    await gw.new_tenant("acme")
    allowed = gw.settings.local_source_allowlist[0]
    (allowed / "file.txt").write_text("x")
    make_adapter(at=allowed / "no-weights", weights=False)
    pickled = make_adapter(at=allowed / "pickled")
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    make_adapter(at=allowed / "too-big-rank", r=32)
    cases = [
        ({"path": str(allowed / "file.txt")}, "is not a folder"),
        ({"path": str(allowed / "missing")}, "is not a folder"),
        ({"path": str(allowed / "no-weights")}, "missing adapter_model.safetensors"),
        ({"path": str(allowed / "pickled")}, "pickle weights are refused"),
        ({"path": str(allowed / "too-big-rank")}, "max_lora_rank"),
        ({"source": "s3://bucket/adapter"}, "S3"),
        ({}, "multipart/form-data"),
        ({"path": str(allowed), "extra": 1}, "extra"),
    ]
    for body, phrase in cases:
        resp = await gw.admin("POST", "/admin/tenants/acme/adapters/support/versions",
                              json=body)
        gw.expect_error(resp, 400, contains=phrase)
    await assert_nothing_stored(gw, "acme", "support")


async def test_local_path_inside_allowlist_registers(gw, make_adapter):
    key = await gw.new_tenant("acme")
    folder = make_adapter(at=gw.settings.local_source_allowlist[0] / "good")
    resp = await gw.admin("POST", "/admin/tenants/acme/adapters/support/versions",
                          json={"path": str(folder)})
    assert resp.status_code == 201, resp.text
    assert resp.json()["source"] == f"file://{folder.resolve()}"
    assert (await gw.chat("acme", key, "support")).status_code == 200


# -- aliases and versions ------------------------------------------------------------------------

async def test_deleting_a_version_targeted_by_an_alias_is_409(gw, make_adapter):
    key = await gw.new_tenant("acme")
    await gw.register("acme", "support", make_adapter(seed=1))
    await gw.register("acme", "support", make_adapter(seed=2))
    resp = await gw.admin("PUT", "/admin/tenants/acme/adapters/support/aliases/prod",
                          json={"version": 1})
    assert resp.status_code == 200, resp.text
    err = gw.expect_error(await gw.admin("DELETE", "/admin/tenants/acme/adapters/support/"
                                                   "versions/1"), 409, code="version_in_use")
    assert err["type"] == "conflict_error" and "prod" in err["message"]
    assert (await gw.chat("acme", key, "support@prod")).status_code == 200
    assert (await gw.chat("acme", key, "support@1")).status_code == 200
    # Move the alias away, then the version can go.
    resp = await gw.admin("PUT", "/admin/tenants/acme/adapters/support/aliases/prod",
                          json={"version": 2})
    assert resp.status_code == 200
    resp = await gw.admin("DELETE", "/admin/tenants/acme/adapters/support/versions/1")
    assert resp.status_code == 200, resp.text
    gw.expect_error(await gw.chat("acme", key, "support@1"), 404)


BAD_ALIASES = [
    ("3", {"version": 1}, 400),
    ("a..b", {"version": 1}, 400),
    ("-x", {"version": 1}, 400),
    ("prod", {"version": 0}, 400),
    ("prod", {"version": "one"}, 400),
    ("prod", {}, 400),
    ("prod", {"version": 1, "extra": True}, 400),
    ("prod", {"version": 9}, 404),
]


async def test_bad_alias_is_refused(gw, make_adapter, subtests):
    await gw.new_tenant("acme")
    await gw.register("acme", "support", make_adapter())
    for alias, body, status in BAD_ALIASES:
        with subtests.test(alias=alias, body=body):
            resp = await gw.admin("PUT", f"/admin/tenants/acme/adapters/support/aliases/{alias}",
                                  json=body)
            gw.expect_error(resp, status)
            adapter = (await gw.admin("GET", "/admin/tenants/acme/adapters/support")).json()
            assert adapter["aliases"] == {}


async def test_alias_and_version_of_unknown_things_are_404(gw, make_adapter):
    await gw.new_tenant("acme")
    resp = await gw.admin("PUT", "/admin/tenants/acme/adapters/none/aliases/prod",
                          json={"version": 1})
    gw.expect_error(resp, 404)
    await gw.register("acme", "support", make_adapter())
    gw.expect_error(await gw.admin("DELETE", "/admin/tenants/acme/adapters/support/aliases/x"),
                    404)
    gw.expect_error(await gw.admin("GET", "/admin/tenants/acme/adapters/support/versions/5"),
                    404)
    gw.expect_error(await gw.admin("DELETE", "/admin/tenants/acme/adapters/support/versions/5"),
                    404)
    gw.expect_error(await gw.admin("GET", "/admin/tenants/acme/adapters/support/versions/x"),
                    400)
