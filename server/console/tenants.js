// Operator: tenants and their keys. A new key is shown once, in this page only, and is
// gone when the page changes: the console keeps no copy.

import { call, get, path } from "./api.js";
import { attempt, button, clear, field, h, say, section, table, time } from "./dom.js";

export async function render(main, ctx) {
  const out = h("p", { class: "notice", id: "tenants-out" });
  const list = h("div", { id: "tenant-list" });
  const keysBox = h("div", { id: "keys" });
  const id = h("input", { id: "new-tenant", placeholder: "acme", required: true,
                          maxlength: 64, autocomplete: "off" });

  async function refresh() {
    const tenants = (await get("/admin/tenants")).data;
    clear(list).append(table([
      { label: "Tenant", cell: (t) => h("code", { text: t.id }) },
      { label: "Created", cell: (t) => time(t.created_at) },
      { label: "", cell: (t) => [
        button("Keys", () => showKeys(t.id)),
        button("Adapters", () => ctx.navigate("adapters", t.id)),
        button("Delete", () => remove(t.id), "danger")] },
    ], tenants, "No tenants yet."));
  }

  async function remove(tenant) {
    if (!confirm(`Delete tenant ${tenant} with its keys, adapters and their files?`)) return;
    await attempt(out, async () => {
      await call("DELETE", path("admin", "tenants", tenant));
      say(out, `Deleted tenant ${tenant}.`, "ok");
      clear(keysBox);
      await refresh();
    });
  }

  async function showKeys(tenant, created = null) {
    const keys = (await get(path("admin", "tenants", tenant, "keys"))).data;
    const name = h("input", { id: "new-key-name", placeholder: "label (optional)",
                              maxlength: 128, autocomplete: "off" });
    const keyOut = h("p", { class: "notice" });
    clear(keysBox).append(section(`Keys of ${tenant}`,
      created && h("div", { class: "secret", id: "new-key" },
        h("p", { text: "The new key, shown this once: copy it now. Only its hash is kept." }),
        h("code", { id: "new-key-value", text: created.key }), " ",
        button("Copy", () => navigator.clipboard?.writeText(created.key))),
      h("form", { id: "create-key", on: { submit: async (e) => {
        e.preventDefault();
        await attempt(keyOut, async () => {
          const body = name.value.trim() ? { name: name.value.trim() } : undefined;
          const made = await call("POST", path("admin", "tenants", tenant, "keys"), { body });
          await showKeys(tenant, made);
        });
      } } }, field("Label", name),
        h("button", { type: "submit", class: "primary", text: "Create key" })),
      keyOut,
      table([
        { label: "Key id", cell: (k) => h("code", { text: k.id }) },
        { label: "Label", cell: (k) => k.name || "" },
        { label: "Prefix", cell: (k) => h("code", { text: `${k.prefix}…` }) },
        { label: "Created", cell: (k) => time(k.created_at) },
        { label: "Revoked", cell: (k) => time(k.revoked_at) },
        { label: "", cell: (k) => k.revoked_at ? "" : button("Revoke", () => attempt(keyOut,
          async () => {
            if (!confirm(`Revoke key ${k.prefix}…? Calls with it will get 401.`)) return;
            await call("DELETE", path("admin", "tenants", tenant, "keys", k.id));
            await showKeys(tenant);
          }), "danger") },
      ], keys, "No keys yet.")),
    await limitsSection(tenant));
  }

  main.append(
    section("Create a tenant", h("form", { id: "create-tenant", on: { submit: async (e) => {
      e.preventDefault();
      await attempt(out, async () => {
        const t = await call("POST", "/admin/tenants", { body: { id: id.value.trim() } });
        id.value = "";
        say(out, `Created tenant ${t.id}.`, "ok");
        await refresh();
        await showKeys(t.id);
      });
    } } }, field("Tenant id", id), h("button", { type: "submit", class: "primary",
                                                  text: "Create" })), out),
    section("Tenants", list),
    keysBox);
  await refresh();
  if (ctx.arg) await showKeys(ctx.arg);
}

const LIMITS = [["requests_per_minute", "Requests / min"], ["tokens_per_minute", "Tokens / min"],
                ["max_in_flight", "In flight"], ["max_tokens", "Max tokens"], ["weight", "Weight"]];

// A tenant's limits (empty = unlimited; PUT replaces them all) and its fair-share weight.
async function limitsSection(tenant) {
  const url = path("admin", "tenants", tenant, "limits");
  const current = await get(url);
  const out = h("p", { class: "notice", id: "limits-out" });
  const inputs = Object.fromEntries(LIMITS.map(([k]) => [k, h("input", {
    type: "number", min: k === "weight" ? 0.01 : 1, step: k === "weight" ? 0.01 : 1,
    placeholder: k === "weight" ? "1" : "unlimited", value: current[k] ?? "",
    "data-limit": k })]));
  return section(`Limits of ${tenant}`,
    h("form", { id: "limits", on: { submit: async (e) => {
      e.preventDefault();
      const body = Object.fromEntries(LIMITS.map(([k]) => [k, inputs[k].value === "" ? null
        : Number(inputs[k].value)]));
      await attempt(out, async () => {
        await call("PUT", url, { body });
        say(out, "Limits saved.", "ok");
      });
    } } }, LIMITS.map(([k, label]) => field(label, inputs[k])),
      h("button", { type: "submit", text: "Save limits" })),
    out);
}
