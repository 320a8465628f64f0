// Operator: metered usage over time, per tenant (all tenants) or per adapter (one tenant),
// as a chart of one measure per UTC day and a table of totals.

import { get, path } from "./api.js";
import { legend, lineChart } from "./chart.js";
import { attempt, clear, field, h, section, table } from "./dom.js";

const DAY_MS = 86400000;
const MEASURES = ["total_tokens", "prompt_tokens", "completion_tokens", "requests", "errors"];

function isoDay(offsetDays) {
  return new Date(Date.now() + offsetDays * DAY_MS).toISOString().slice(0, 10);
}

export async function render(main, ctx) {
  const tenants = (await get("/admin/tenants")).data;
  const tenant = h("select", { id: "usage-tenant" }, h("option", { value: "", text: "all tenants" }),
    tenants.map((t) => h("option", { value: t.id, text: t.id })));
  if (ctx.arg) tenant.value = ctx.arg;
  const measure = h("select", { id: "usage-measure" },
    MEASURES.map((m) => h("option", { value: m, text: m.replace("_", " ") })));
  const start = h("input", { type: "date", id: "usage-start", value: isoDay(-29) });
  const end = h("input", { type: "date", id: "usage-end", value: isoDay(0) });
  const out = h("p", { class: "notice" });
  const box = h("div", { id: "usage" });

  async function refresh() {
    const one = tenant.value;
    const url = one ? path("admin", "tenants", one, "usage") : "/admin/usage";
    const by = one ? "adapter" : "tenant";
    const query = { start: start.value, end: end.value, group_by: `${by},day` };
    const entries = (await get(url, { query })).data;
    const name = (e) => (one ? e.adapter ?? "base model" : e.tenant);
    const groups = new Map();
    for (const e of entries) {
      if (!groups.has(name(e))) groups.set(name(e), []);
      groups.get(name(e)).push(e);
    }
    // Every day of the range is a point (0 where nothing was metered), so a line spans it.
    const [first, last] = [Date.parse(start.value) / DAY_MS, Date.parse(end.value) / DAY_MS];
    const series = [...groups].map(([n, rows]) => {
      const byDay = new Map(rows.map((e) => [Date.parse(e.day) / DAY_MS, e[measure.value]]));
      const points = [];
      for (let d = first; d <= last; d++) points.push([d, byDay.get(d) ?? 0]);
      return { name: n, points };
    });
    const totals = [...groups].map(([n, rows]) => ({
      name: n, ...Object.fromEntries(MEASURES.map((m) => [m, rows.reduce((s, e) => s + e[m], 0)])) }));
    clear(box).append(
      h("div", { id: "usage-chart" }, lineChart({
        series, title: `${measure.value} per day`,
        xFormat: (x) => new Date(x * DAY_MS).toISOString().slice(5, 10) })),
      legend(series),
      table([{ label: one ? "Adapter" : "Tenant", cell: (t) => t.name },
             ...MEASURES.map((m) => ({ label: m.replace("_", " "), cell: (t) => String(t[m]) }))],
            totals, "No usage in this range."));
  }

  main.append(section("Usage",
    h("form", { on: { submit: (e) => {
      e.preventDefault();
      attempt(out, refresh);
    } } }, field("Tenant", tenant), field("Measure", measure), field("From", start),
      field("To", end), h("button", { type: "submit", class: "primary", text: "Show" })),
    out, box));
  await refresh();
}
