// Tenant: the models this key can call (the base model, adapters, versions, aliases).

import { get } from "./api.js";
import { h, section, table, time } from "./dom.js";

export async function render(main, ctx) {
  const models = (await get("/v1/models")).data;
  main.append(section(`Models of ${ctx.cred.tenant}`, table([
    { label: "Model", cell: (m) => h("code", { text: m.id }) },
    { label: "Kind", cell: (m) => (m.parent ? "adapter" : "base model") },
    { label: "Created", cell: (m) => time(m.created) },
  ], models), h("p", { class: "muted", text: "Send any of these as `model`; "
    + "name = latest version, name@3 a version, name@prod an alias." })));
}
