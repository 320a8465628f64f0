// The playground: one prompt, streamed from a tenant's adapter and from the base model side
// by side ("does the adapter beat the base model?", answered by looking).
//
// A tenant calls with its own key. The operator has no tenant key, and the console never
// keeps one: for each prompt it creates a temporary key for the chosen tenant (labelled
// "console-playground"), streams both answers with it, and revokes it when both are done
// (also on error or stop). The calls count as that tenant's usage, under that key id.

import { call, credential, get, path, streamChat } from "./api.js";
import { tenantPicker } from "./adapters.js";
import { append, attempt, button, clear, field, h, say, section } from "./dom.js";

const TEMP_KEY_LABEL = "console-playground";

function adapterModels(adapters) {
  const ids = [];
  for (const a of adapters) {
    ids.push(a.name);
    for (const alias of Object.keys(a.aliases)) ids.push(`${a.name}@${alias}`);
    for (const v of a.versions) ids.push(`${a.name}@${v.version}`);
  }
  return ids;
}

// Runs `use(as)` with a tenant credential: the tenant's own, or a temporary key of `tenant`.
async function asTenant(ctx, tenant, use) {
  if (ctx.role === "tenant") return use(credential());
  const keys = path("admin", "tenants", tenant, "keys");
  const made = await call("POST", keys, { body: { name: TEMP_KEY_LABEL } });
  try {
    return await use({ role: "tenant", tenant, token: made.key });
  } finally {
    await call("DELETE", `${keys}/${encodeURIComponent(made.id)}`);
  }
}

export async function render(main, ctx) {
  const model = h("select", { id: "pg-model" });
  const out = h("p", { class: "notice", id: "pg-out" });
  let tenant = ctx.role === "tenant" ? ctx.cred.tenant : null;

  function fill(ids) {
    append(clear(model), ids.length ? ids.map((id) => h("option", { value: id, text: id }))
      : [h("option", { value: "", text: "no adapters" })]);
  }

  let picker = null;
  if (ctx.role === "admin") {
    picker = await tenantPicker(ctx, async (t) => {
      tenant = t;
      clear(model);
      if (t) await attempt(out, async () =>
        fill(adapterModels((await get(path("admin", "tenants", t, "adapters"))).data)));
    }, "pg-tenant");
    if (picker.value) {
      tenant = picker.value;
      fill(adapterModels((await get(path("admin", "tenants", tenant, "adapters"))).data));
    }
  } else {
    fill((await get("/v1/models")).data.filter((m) => m.parent).map((m) => m.id));
  }

  const system = h("input", { id: "pg-system", placeholder: "system prompt (optional)" });
  const prompt = h("textarea", { id: "pg-prompt", placeholder: "Ask something…", required: true });
  const maxTokens = h("input", { id: "pg-max-tokens", type: "number", min: 1, value: 128 });
  const temperature = h("input", { id: "pg-temperature", type: "number", min: 0, max: 2,
                                   step: 0.1, value: 0 });
  const send = h("button", { type: "submit", class: "primary", id: "pg-send", text: "Send" });
  let controller = null;
  const stop = button("Stop", () => controller?.abort());
  stop.disabled = true;
  const panes = {
    adapter: pane("adapter", "Adapter"),
    base: pane("base", "Base model"),
  };

  async function run(e) {
    e.preventDefault();
    if (!tenant || !model.value) return say(out, "Choose a tenant's adapter first.", "error");
    const messages = [];
    if (system.value.trim()) messages.push({ role: "system", content: system.value.trim() });
    messages.push({ role: "user", content: prompt.value });
    const params = { messages, max_tokens: Number(maxTokens.value) || 128,
                     temperature: Number(temperature.value) };
    controller = new AbortController();
    send.disabled = true;
    stop.disabled = false;
    say(out, "Streaming…");
    await attempt(out, () => asTenant(ctx, tenant, async (as) => {
      const baseId = (await get("/v1/models", { as })).data.find((m) => !m.parent)?.id;
      await Promise.all([
        panes.adapter.stream(model.value, params, as, controller.signal),
        panes.base.stream(baseId, params, as, controller.signal),
      ]);
      say(out, "Done.", "ok");
    }));
    send.disabled = false;
    stop.disabled = true;
  }

  main.append(
    section("Playground",
      h("form", { id: "playground", on: { submit: run } },
        picker ? field("Tenant", picker) : null, field("Adapter", model),
        field("Max tokens", maxTokens), field("Temperature", temperature),
        h("label", { class: "wide" }, h("span", { text: "System" }), system),
        h("label", { class: "wide" }, h("span", { text: "Prompt" }), prompt), send, stop),
      out,
      ctx.role === "admin" ? h("p", { class: "muted", text: "Each prompt uses a temporary key "
        + "of the tenant, revoked when the answers end; it counts as the tenant's usage." })
        : null),
    h("div", { class: "side" }, panes.adapter.el, panes.base.el));
}

function pane(id, title) {
  const heading = h("h2", { text: title });
  const text = h("div", { class: "answer", id: `answer-${id}`, "aria-live": "polite" });
  const status = h("p", { class: "notice", id: `status-${id}` });
  return {
    el: h("section", {}, heading, text, status),
    async stream(modelId, params, as, signal) {
      heading.textContent = `${title}: ${modelId}`;
      text.textContent = "";
      say(status, "…");
      text.dataset.done = "false";
      try {
        const usage = await streamChat({ model: modelId, ...params }, {
          as, signal, onText: (piece) => { text.textContent += piece; } });
        say(status, usage ? `${usage.completion_tokens} tokens` : "done", "ok");
      } catch (err) {
        say(status, err.name === "AbortError" ? "stopped" : err.message, "error");
      } finally {
        text.dataset.done = "true";
      }
    },
  };
}
