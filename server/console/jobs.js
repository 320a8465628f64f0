// Fine-tuning jobs: the list (operator: every tenant's, tenant: its own), and one job with its
// events, its training loss over steps as a chart, and the held-out evaluation of the
// adapter against the base model beside it. A running job is refreshed while shown.

import { call, get, getAll, postForm } from "./api.js";
import { legend, lineChart } from "./chart.js";
import { append, attempt, button, clear, field, h, say, section, table, time } from "./dom.js";

const FINAL = new Set(["succeeded", "failed", "cancelled"]);
const STATUSES = ["validating_files", "queued", "running", "succeeded", "failed", "cancelled"];
const EVERY_MS = 3000;
const VALIDATION_KEYS = ["valid_loss", "validation_loss", "eval_loss", "val_loss"];

function base(ctx) {
  return ctx.role === "admin" ? "/admin/fine_tuning/jobs" : "/v1/fine_tuning/jobs";
}

export async function render(main, ctx) {
  return ctx.arg ? detail(main, ctx, ctx.arg) : list(main, ctx);
}

async function list(main, ctx) {
  const box = h("div", { id: "job-list" });
  const tenant = h("input", { id: "jobs-tenant", placeholder: "all tenants", autocomplete: "off" });
  const status = h("select", { id: "jobs-status" }, h("option", { value: "", text: "any" }),
    STATUSES.map((s) => h("option", { value: s, text: s })));
  const out = h("p", { class: "notice" });
  async function refresh() {
    const query = ctx.role === "admin"
      ? { limit: 100, tenant: tenant.value.trim(), status: status.value } : { limit: 100 };
    const jobs = (await get(base(ctx), { query })).data;
    clear(box).append(table([
      { label: "Job", cell: (j) => h("a", { href: `#/jobs/${encodeURIComponent(j.id)}`,
                                            class: "job-link", text: j.id }) },
      ctx.role === "admin" ? { label: "Tenant", cell: (j) => j.organization_id } : null,
      { label: "Status", cell: (j) => h("span", { class: `status-${j.status}`, text: j.status }) },
      { label: "Adapter", cell: (j) => j.fine_tuned_model || j.suffix || "" },
      { label: "Created", cell: (j) => time(j.created_at) },
      { label: "Finished", cell: (j) => time(j.finished_at) },
    ].filter(Boolean), jobs, "No fine-tuning jobs."));
  }
  const filters = ctx.role === "admin" ? h("form", { on: { submit: (e) => {
    e.preventDefault();
    attempt(out, refresh);
  } } }, field("Tenant", tenant), field("Status", status),
    h("button", { type: "submit", text: "Filter" })) : null;
  append(main, [ctx.role === "tenant" ? newJob(ctx) : null,
                section("Fine-tuning jobs", filters, out, box)]);
  await refresh();
}

// Tenant: upload a JSONL dataset and start a job on it (the same calls as the openai SDK's
// files.create and fine_tuning.jobs.create).
function newJob(ctx) {
  const file = h("input", { id: "ft-file", type: "file", accept: ".jsonl,application/jsonl" });
  const suffix = h("input", { id: "ft-suffix", placeholder: "pirate", maxlength: 40,
                              autocomplete: "off" });
  const epochs = h("input", { id: "ft-epochs", type: "number", min: 1, max: 50, value: 3 });
  const out = h("p", { class: "notice", id: "ft-out" });
  const submit = h("button", { type: "submit", class: "primary", text: "Start job" });
  return section("Start a fine-tuning job",
    h("form", { id: "new-job", on: { submit: async (e) => {
      e.preventDefault();
      if (!file.files.length) return say(out, "Pick a JSONL training file first.", "error");
      submit.disabled = true;
      await attempt(out, async () => {
        say(out, "Uploading the training file…");
        const form = new FormData();
        form.append("purpose", "fine-tune");
        form.append("file", file.files[0], file.files[0].name);
        const uploaded = await postForm("/v1/files", form);
        const base = (await get("/v1/models")).data.find((m) => !m.parent);
        const job = await call("POST", "/v1/fine_tuning/jobs", { body: {
          model: base.id, training_file: uploaded.id, suffix: suffix.value.trim() || undefined,
          hyperparameters: { n_epochs: Number(epochs.value) || "auto" } } });
        ctx.navigate("jobs", job.id);
      });
      submit.disabled = false;
    } } }, field("Training file (JSONL)", file), field("Adapter name (suffix)", suffix),
      field("Epochs", epochs), submit),
    out);
}

async function detail(main, ctx, id) {
  const box = h("div", { id: "job" });
  main.append(h("p", {}, h("a", { href: "#/jobs", text: "← all jobs" })), box);
  let timer = null;
  let stopped = false;
  async function tick() {
    const url = `${base(ctx)}/${encodeURIComponent(id)}`;
    const [job, events, checkpoints] = await Promise.all([
      get(url),
      getAll(`${url}/events`, { query: { limit: 1000 } }),
      ctx.role === "tenant" ? get(`${url}/checkpoints`).then((c) => c.data) : [],
    ]);
    draw(box, ctx, job, events.reverse(), checkpoints, tick);
    if (!stopped && !FINAL.has(job.status)) timer = setTimeout(() => tick().catch(() => {}), EVERY_MS);
  }
  await tick();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}

// Loss series from the job's metrics events (and checkpoints, for steps no event has).
export function lossSeries(events, checkpoints) {
  const train = new Map();
  const valid = new Map();
  for (const e of events) {
    const d = e.data || {};
    if (e.type !== "metrics" || typeof d.step !== "number") continue;
    if (typeof d.loss === "number") train.set(d.step, d.loss);
    if (typeof d.train_loss === "number") train.set(d.step, d.train_loss);
    for (const k of VALIDATION_KEYS) if (typeof d[k] === "number") valid.set(d.step, d[k]);
  }
  for (const c of checkpoints) {
    const m = c.metrics || {};
    if (typeof m.train_loss === "number" && !train.has(c.step_number)) {
      train.set(c.step_number, m.train_loss);
    }
    for (const k of VALIDATION_KEYS) if (typeof m[k] === "number") valid.set(c.step_number, m[k]);
  }
  const series = [{ name: "training loss", points: [...train] }];
  if (valid.size) series.push({ name: "validation loss", points: [...valid] });
  return series;
}

const KIND_LABEL = { base: "base model", prompted: "prompted baseline", adapter: "adapter" };
const METRICS = { loss: "loss", exact_match: "exact match", f1: "F1", rouge_l: "ROUGE-L" };

// Held-out losses to draw beside the training loss: from the evaluation report, or from the
// job's `eval` figures (jobs from before the report existed).
function evalLines(job) {
  const lines = [];
  const report = job.evaluation;
  if (report) {
    for (const m of Object.values(report.models || {})) {
      if (typeof m.loss === "number") {
        lines.push({ name: `held-out loss: ${KIND_LABEL[m.kind] || m.kind}`, y: m.loss });
      }
    }
    return lines;
  }
  const ev = job.eval || {};
  for (const [key, label] of [["base_loss", "base model"], ["prompted_loss", "prompted baseline"],
                              ["adapter_loss", "adapter"]]) {
    if (typeof ev[key] === "number") lines.push({ name: `held-out loss: ${label}`, y: ev[key] });
  }
  return lines;
}

function num(v, digits = 4) {
  return typeof v === "number" ? v.toFixed(digits) : "-";
}

function verdict(improved, against) {
  if (improved === null || improved === undefined) return null;
  return h("p", { class: improved ? "notice ok" : "notice error",
                  text: improved ? `The adapter beats ${against} on held-out data.`
                    : `The adapter does not beat ${against} on held-out data.` });
}

function lastUser(messages) {
  const user = [...(messages || [])].reverse().find((m) => m.role === "user");
  return typeof user?.content === "string" ? user.content : JSON.stringify(user?.content ?? "");
}

function report(r) {
  const keys = Object.keys(r.models || {});
  return h("div", { id: "job-eval" },
    table([
      { label: "Model", cell: ([key, m]) => [h("code", { text: m.model }), " ",
        h("span", { class: "muted", text: KIND_LABEL[m.kind] || m.kind }),
        key === r.best ? h("span", { class: "badge", text: "best" }) : null] },
      ...Object.entries(METRICS).map(([metric, label]) => ({
        label: metric === r.metric ? `${label} ★` : label, cell: ([, m]) => num(m[metric]) })),
      { label: "Mean output tokens", cell: ([, m]) => num(m.mean_output_tokens, 1) },
      { label: "Failed", cell: ([, m]) => String(m.failed ?? 0) },
    ], Object.entries(r.models || {})),
    verdict(r.improved, "the base model and the prompted baseline"),
    h("p", { class: "muted", text: `${r.examples} held-out examples; ★ ${r.metric} decides.` }),
    (r.errors || []).map((e) => h("p", { class: "notice error", text: e })),
    r.samples?.length ? [h("h3", { text: "Examples side by side" }), table([
      { label: "Prompt", cell: (s) => lastUser(s.prompt) },
      { label: "Reference", cell: (s) => s.reference },
      ...keys.map((k) => ({ label: k, cell: (s) => s.outputs?.[k] ?? "-" })),
    ], r.samples)] : null);
}

function evaluation(job) {
  if (job.evaluation) return report(job.evaluation);
  const ev = job.eval;
  if (!ev) {
    return h("p", { class: "muted", id: "job-eval",
                    text: "The adapter is evaluated against the base model when training ends." });
  }
  const rows = [["base model", ev.base_loss, ev.base_perplexity],
                ["prompted baseline", ev.prompted_loss, null],
                ["adapter", ev.adapter_loss, ev.adapter_perplexity]].filter((r) => r[1] != null);
  return h("div", { id: "job-eval" },
    table([
      { label: "", cell: (r) => r[0] },
      { label: "Held-out loss", cell: (r) => num(r[1]) },
      { label: "Perplexity", cell: (r) => num(r[2], 2) },
    ], rows),
    verdict(ev.improved ?? (ev.adapter_loss < ev.base_loss), "the base model"),
    ev.holdout_examples ? h("p", { class: "muted",
                                   text: `${ev.holdout_examples} held-out examples` }) : null);
}

function draw(box, ctx, job, events, checkpoints, refresh) {
  const series = lossSeries(events, checkpoints);
  const lines = evalLines(job);
  const hp = job.hyperparameters || {};
  const out = h("p", { class: "notice" });
  clear(box).append(
    section(`Job ${job.id}`,
      h("div", { class: "cards" },
        h("div", { class: "card" }, h("b", { class: `status-${job.status}`, id: "job-status",
                                             text: job.status }), "status"),
        h("div", { class: "card" }, h("b", { text: job.organization_id }), "tenant"),
        h("div", { class: "card" }, h("b", { text: job.fine_tuned_model || job.suffix || "-" }),
          job.fine_tuned_model ? "adapter" : "suffix"),
        h("div", { class: "card" }, h("b", { text: job.trained_tokens ?? "-" }), "trained tokens")),
      h("p", { class: "muted" },
        `epochs ${hp.n_epochs ?? "-"} · batch ${hp.batch_size ?? "-"} · lr ×${hp.learning_rate_multiplier ?? "-"}`
        + ` · rank ${job.lora?.r ?? "-"} · created ${time(job.created_at)}`
        + (job.finished_at ? ` · finished ${time(job.finished_at)}` : "")),
      job.error ? h("p", { class: "notice error", id: "job-error",
                           text: `${job.error.code}: ${job.error.message}` }) : null,
      !FINAL.has(job.status) ? button("Cancel job", () => attempt(out,
        async () => {
          await call("POST", `${base(ctx)}/${encodeURIComponent(job.id)}/cancel`);
          await refresh();
        }), "danger") : null,
      out),
    h("div", { class: "side" },
      section("Loss", h("div", { id: "loss-chart" },
        lineChart({ series, lines, title: "loss by step", xFormat: (x) => `${x}` })),
        legend(series, lines)),
      section("Evaluation against the base model", evaluation(job))),
    section("Events", table([
      { label: "Time", cell: (e) => time(e.created_at) },
      { label: "Level", cell: (e) => e.level },
      { label: "Message", cell: (e) => h("span", { class: "event-message", text: e.message }) },
    ], events, "No events yet.")));
}
