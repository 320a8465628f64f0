// Operator: the engine, live: resident adapters, loads / hits / evictions (polls
// GET /admin/engine while the page is open).

import { get } from "./api.js";
import { append, bytes, clear, h, say, section, table } from "./dom.js";

const EVERY_MS = 2000;

function card(label, value) {
  return h("div", { class: "card" }, h("b", { text: value ?? "-" }), label);
}

export async function render(main) {
  const box = h("div", { id: "engine" });
  const out = h("p", { class: "notice" });
  main.append(box, out);
  let timer = null;
  let stopped = false;

  async function tick() {
    try {
      if (document.hidden) return;  // a background tab asks nothing; the next tick will
      draw(box, await get("/admin/engine"));
      say(out, `Updated ${new Date().toLocaleTimeString()}; every ${EVERY_MS / 1000} s.`);
    } catch (err) {
      say(out, err.message, "error");
    } finally {
      if (!stopped) timer = setTimeout(tick, EVERY_MS);
    }
  }
  await tick();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}

function draw(box, e) {
  const a = e.adapters || {};
  const stats = a.stats || {};
  const resident = a.resident || [];
  append(clear(box), [
    section("Engine",
      h("div", { class: "cards" },
        card("ready", e.ready ? "yes" : "no"),
        card("restarts", e.restarts ?? "-"),
        card("resident", `${resident.length} / ${a.capacity ?? "?"}`),
        // Every residency counter the server reports (hits, loads, load failures,
        // evictions, unloads, and any it adds later).
        Object.entries(stats).map(([k, v]) => card(k.replaceAll("_", " "), String(v)))),
      h("p", { class: "muted" }, "URL ", h("code", { text: e.url }), " · store ",
        h("code", { text: e.store }), e.spawned ? " · spawned and supervised by loraplex" : "")),
    section("Resident adapters", table([
      { label: "Engine name", cell: (r) => h("code", { class: "engine-name", text: r.engine_name }) },
      { label: "State", cell: (r) => r.state },
      { label: "In flight", cell: (r) => String(r.in_flight) },
      { label: "Idle", cell: (r) => `${r.idle_seconds.toFixed(1)} s` },
      { label: "Load time", cell: (r) => r.load_seconds == null ? "" : `${r.load_seconds.toFixed(3)} s` },
      { label: "Pinned", cell: (r) => (r.pinned ? "yes" : "") },
    ], resident, "No adapter is loaded.")),
    e.disk_cache ? section("Disk cache (S3 store)", table([
      { label: "", cell: ([k]) => k },
      { label: "", cell: ([k, v]) => (/bytes/.test(k) && typeof v === "number" ? bytes(v)
                                                                         : JSON.stringify(v)) },
    ], Object.entries(e.disk_cache))) : null]);
}
