// k6 scenario: several tenants, streaming and not, Zipf-skewed adapter popularity.
//
//   .venv/bin/k6 run -e TARGETS=loadtest/targets.json -e VUS=8 -e DURATION=60s loadtest/k6/chat.js
//
// TARGETS comes from loadtest/prepare.py. Reports TTFT (time to first byte of a streamed
// answer, which the gateway sends with the first token), latency, tokens/s and errors.
// Loopback only; bounded by DURATION.
import http from 'k6/http';
import { check } from 'k6';
import { Counter, Rate, Trend } from 'k6/metrics';

const targets = JSON.parse(open(__ENV.TARGETS || 'targets.json'));
const baseUrl = __ENV.BASE_URL || targets.base_url;
const maxTokens = parseInt(__ENV.MAX_TOKENS || '16');
const zipfS = parseFloat(__ENV.ZIPF_S || '1.1');
const streamShare = parseFloat(__ENV.STREAM_SHARE || '0.5');

const ttft = new Trend('lpx_ttft', true);
const latency = new Trend('lpx_latency', true);
const completionTokens = new Counter('lpx_completion_tokens');
const errors = new Rate('lpx_errors');

export const options = {
  scenarios: {
    chat: { executor: 'constant-vus', vus: parseInt(__ENV.VUS || '4'),
            duration: __ENV.DURATION || '30s', gracefulStop: '30s' },
  },
};

// Every tenant's models (base model first) ranked once; rank r is drawn with weight 1/r^s.
const choices = [];
for (const t of targets.tenants) {
  for (const m of [targets.base_model, ...t.models]) choices.push({ tenant: t, model: m });
}
const weights = choices.map((_, i) => 1 / Math.pow(i + 1, zipfS));
const total = weights.reduce((a, b) => a + b, 0);

function pick() {
  let x = Math.random() * total;
  for (let i = 0; i < choices.length; i++) {
    x -= weights[i];
    if (x <= 0) return choices[i];
  }
  return choices[choices.length - 1];
}

export default function () {
  const { tenant, model } = pick();
  const stream = Math.random() < streamShare;
  const body = {
    model, max_tokens: maxTokens, temperature: 0.7, stream,
    messages: [{ role: 'user', content: 'Tell me one fact about the sea.' }],
  };
  if (stream) body.stream_options = { include_usage: true };
  const res = http.post(`${baseUrl}/v1/chat/completions`, JSON.stringify(body), {
    headers: { 'Content-Type': 'application/json', 'X-Tenant-ID': tenant.id,
               Authorization: `Bearer ${tenant.key}` },
    timeout: '300s',
  });
  const ok = check(res, { 'status 200': (r) => r.status === 200 });
  errors.add(!ok);
  if (!ok) return;
  latency.add(res.timings.duration);
  let usage = null;
  if (stream) {
    ttft.add(res.timings.waiting);
    for (const line of res.body.split('\n')) {
      if (line.startsWith('data: {') && line.includes('"usage":{')) usage = JSON.parse(line.slice(6)).usage;
    }
  } else {
    usage = res.json().usage;
  }
  if (usage) completionTokens.add(usage.completion_tokens);
}

export function handleSummary(data) {
  const m = data.metrics;
  const secs = data.state.testRunDurationMs / 1000;
  const tok = m.lpx_completion_tokens ? m.lpx_completion_tokens.values.count : 0;
  const fmt = (t, p) => (t && t.values[p] !== undefined ? t.values[p].toFixed(1) : 'n/a');
  const lines = [
    `loraplex k6: ${m.http_reqs ? m.http_reqs.values.count : 0} requests in ${secs.toFixed(1)} s`,
    `  errors: ${((m.lpx_errors ? m.lpx_errors.values.rate : 0) * 100).toFixed(2)}%`,
    `  completion tokens/s: ${(tok / secs).toFixed(1)}`,
    `  TTFT ms p50 ${fmt(m.lpx_ttft, 'med')} p90 ${fmt(m.lpx_ttft, 'p(90)')} p95 ${fmt(m.lpx_ttft, 'p(95)')}`,
    `  latency ms p50 ${fmt(m.lpx_latency, 'med')} p90 ${fmt(m.lpx_latency, 'p(90)')} p95 ${fmt(m.lpx_latency, 'p(95)')}`,
  ];
  const out = { stdout: lines.join('\n') + '\n' };
  if (__ENV.SUMMARY) out[__ENV.SUMMARY] = JSON.stringify(data);
  return out;
}
