// Operator: a tenant's adapters with versions, aliases and pins; upload of a PEFT folder
// (adapter_config.json + adapter_model.safetensors) as a new version.

import { call, get, path, upload } from "./api.js";
import { attempt, button, bytes, clear, field, h, say, section, table, time } from "./dom.js";

export async function tenantPicker(ctx, onPick, id = "tenant-pick") {
  const tenants = (await get("/admin/tenants")).data;
  const select = h("select", { id, on: { change: () => onPick(select.value) } },
    h("option", { value: "", text: tenants.length ? "choose a tenant" : "no tenants yet" }),
    tenants.map((t) => h("option", { value: t.id, text: t.id })));
  if (ctx.arg && tenants.some((t) => t.id === ctx.arg)) select.value = ctx.arg;
  else if (tenants.length === 1) select.value = tenants[0].id;
  return select;
}

export async function render(main, ctx) {
  const body = h("div", { id: "adapters" });
  const picker = await tenantPicker(ctx, (t) => {
    ctx.navigate("adapters", t);
  });
  main.append(section("Adapters", field("Tenant", picker)), body);
  if (picker.value) await show(body, picker.value);
}

async function show(box, tenant) {
  const out = h("p", { class: "notice", id: "adapters-out" });
  const list = h("div", { id: "adapter-list" });

  async function refresh() {
    const adapters = (await get(path("admin", "tenants", tenant, "adapters"))).data;
    clear(list);
    if (!adapters.length) list.append(h("p", { class: "muted", text: "No adapters yet." }));
    for (const a of adapters) list.append(adapterBlock(a));
  }

  function act(action) {
    return () => attempt(out, async () => {
      await action();
      await refresh();
    });
  }

  function adapterBlock(a) {
    const base = path("admin", "tenants", tenant, "adapters", a.name);
    const alias = h("input", { placeholder: "prod", class: "alias-name", maxlength: 64 });
    const version = h("input", { type: "number", min: 1, value: a.latest_version ?? "",
                                 class: "alias-version" });
    return h("div", { class: "adapter", "data-adapter": a.name },
      h("h3", {}, h("span", { class: "adapter-name", text: a.name }), " ",
        h("span", { class: "muted", text: `latest v${a.latest_version ?? "-"}` }), " ",
        button("Delete adapter", act(async () => {
          if (confirm(`Delete adapter ${a.name} with every version?`)) await call("DELETE", base);
        }), "danger")),
      h("div", { class: "row" }, "Aliases: ",
        Object.keys(a.aliases).length ? Object.entries(a.aliases).map(([name, v]) =>
          h("span", { class: "badge" }, `${name} → v${v} `,
            button("×", act(() => call("DELETE", `${base}/aliases/${encodeURIComponent(name)}`)))))
          : h("span", { class: "muted", text: "none" })),
      h("form", { class: "alias-form", on: { submit: (e) => {
        e.preventDefault();
        act(() => call("PUT", `${base}/aliases/${encodeURIComponent(alias.value.trim())}`,
                       { body: { version: Number(version.value) } }))();
      } } }, field("Alias", alias), field("Version", version),
        h("button", { type: "submit", text: "Set alias" })),
      table([
        { label: "Version", cell: (v) => `v${v.version}` },
        { label: "Model", cell: (v) => h("code", { text: v.model }) },
        { label: "Rank / alpha", cell: (v) => `${v.rank} / ${v.alpha}` },
        { label: "Targets", cell: (v) => v.target_modules.join(", ") },
        { label: "Size", cell: (v) => bytes(v.size_bytes) },
        { label: "Source", cell: (v) => v.source },
        { label: "Created", cell: (v) => time(v.created_at) },
        { label: "Pinned", cell: (v) => v.pinned ? "yes" : "" },
        { label: "", cell: (v) => [
          button(v.pinned ? "Unpin" : "Pin", act(() => call(v.pinned ? "DELETE" : "PUT",
            `${base}/versions/${v.version}/pin`))),
          button("Delete", act(async () => {
            if (confirm(`Delete ${a.name} v${v.version}?`)) {
              await call("DELETE", `${base}/versions/${v.version}`);
            }
          }), "danger")] },
      ], a.versions));
  }

  clear(box).append(uploadForm(tenant, refresh), section(`Adapters of ${tenant}`, out, list));
  await refresh();
}

function uploadForm(tenant, onDone) {
  const name = h("input", { id: "upload-name", placeholder: "support-bot", required: true,
                            maxlength: 64, autocomplete: "off" });
  const files = h("input", { id: "upload-files", type: "file", multiple: true });
  // A picked folder names the adapter, unless a name was typed.
  const folder = h("input", { id: "upload-folder", type: "file", webkitdirectory: true, on: {
    change: () => {
      const first = folder.files[0]?.webkitRelativePath?.split("/")[0];
      if (first && !name.value.trim()) name.value = first;
    } } });
  const progress = h("progress", { max: 1, value: 0, hidden: true });
  const out = h("p", { class: "notice", id: "upload-out" });
  const submit = h("button", { type: "submit", class: "primary", text: "Upload" });
  return section("Upload a PEFT adapter folder as a new version",
    h("p", { class: "muted", text: "Pick the folder, or its files: adapter_config.json and "
      + "adapter_model.safetensors. The server checks them before anything is stored." }),
    h("form", { id: "upload", on: { submit: async (e) => {
      e.preventDefault();
      const picked = [...folder.files, ...files.files];
      if (!picked.length) return say(out, "Pick the adapter's folder or files first.", "error");
      submit.disabled = true;
      progress.hidden = false;
      progress.value = 0;
      say(out, "Uploading…");
      await attempt(out, async () => {
        const v = await upload(path("admin", "tenants", tenant, "adapters", name.value.trim(),
                                    "versions"), picked, (f) => { progress.value = f; });
        const warn = v.warnings?.length ? ` Warnings: ${v.warnings.join("; ")}` : "";
        say(out, `Registered ${v.model} (${bytes(v.size_bytes)}).${warn}`, "ok");
        files.value = "";
        folder.value = "";
        await onDone();
      });
      submit.disabled = false;
      progress.hidden = true;
    } } }, field("Adapter name", name), field("Folder", folder), field("or files", files),
      submit, progress),
    out);
}
