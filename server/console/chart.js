// A small SVG line chart: several series over a numeric x axis, optional horizontal
// reference lines, a legend. Built with createElementNS; labels are text nodes.

const NS = "http://www.w3.org/2000/svg";
const W = 640, H = 260, PAD = { left: 56, right: 12, top: 12, bottom: 32 };

function svg(tag, attrs = {}, text) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (text !== undefined) el.textContent = String(text);
  return el;
}

// Round tick values ("nice numbers": steps of 1, 2 or 5 x 10^k) covering [lo, hi].
function niceTicks(lo, hi, n = 5) {
  const raw = (hi - lo) / (n - 1);
  const mag = 10 ** Math.floor(Math.log10(raw));
  const f = raw / mag;
  const step = (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * mag;
  const first = Math.floor(lo / step) * step;
  const count = Math.ceil((hi - first) / step - 1e-9);
  const digits = Math.max(0, -Math.floor(Math.log10(step)));
  const values = Array.from({ length: count + 1 }, (_, i) => first + i * step);
  return { values, digits };
}

function short(v) {
  const a = Math.abs(v);
  if (a >= 1e6) return `${(v / 1e6).toFixed(1)}M`;
  if (a >= 1e3) return `${(v / 1e3).toFixed(1)}k`;
  if (a >= 10 || Number.isInteger(v)) return String(Math.round(v * 10) / 10);
  return v.toFixed(3);
}

// series: [{name, points: [[x, y], ...]}]; lines: [{name, y}]; xFormat: x -> label
export function lineChart({ series, lines = [], title = "", xFormat = short, yFormat = null }) {
  const all = series.flatMap((s) => s.points);
  const ys = [...all.map((p) => p[1]), ...lines.map((l) => l.y)];
  const xs = all.map((p) => p[0]);
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img",
                            "aria-label": title });
  if (!xs.length) {
    root.append(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "axis" },
                    "no data yet"));
    return root;
  }
  let [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { y0 = y0 > 0 ? 0 : y0 - 1; y1 += 1; }
  const yt = niceTicks(y0, y1);
  [y0, y1] = [yt.values[0], yt.values[yt.values.length - 1]];
  const yLabel = yFormat || ((v) => (Math.abs(v) >= 1e4 ? short(v) : v.toFixed(yt.digits)));
  const sx = (x) => PAD.left + ((x - x0) / (x1 - x0)) * (W - PAD.left - PAD.right);
  const sy = (y) => H - PAD.bottom - ((y - y0) / (y1 - y0)) * (H - PAD.top - PAD.bottom);

  const axes = svg("g", { class: "axis" });
  for (const t of yt.values) {
    axes.append(svg("line", { x1: PAD.left, x2: W - PAD.right, y1: sy(t), y2: sy(t),
                              class: "grid" }));
    axes.append(svg("text", { x: PAD.left - 6, y: sy(t) + 4, "text-anchor": "end" }, yLabel(t)));
  }
  const xt = [...new Set(xs)].sort((a, b) => a - b);
  const every = Math.max(1, Math.ceil(xt.length / 6));
  xt.filter((_, i) => i % every === 0).forEach((t) => {
    axes.append(svg("text", { x: sx(t), y: H - PAD.bottom + 18, "text-anchor": "middle" },
                    xFormat(t)));
  });
  root.append(axes);

  lines.forEach((l, i) => {
    root.append(svg("line", { x1: PAD.left, x2: W - PAD.right, y1: sy(l.y), y2: sy(l.y),
                              class: `ref r${i % 4}`, "data-name": l.name }));
  });
  series.forEach((s, i) => {
    const pts = [...s.points].sort((a, b) => a[0] - b[0]);
    const cls = `series s${i % 8}`;
    root.append(svg("polyline", { class: cls, "data-name": s.name, fill: "none",
                                  points: pts.map(([x, y]) => `${sx(x)},${sy(y)}`).join(" ") }));
    for (const [x, y] of pts.length <= 60 ? pts : []) {
      const dot = svg("circle", { cx: sx(x), cy: sy(y), r: 2.5, class: cls });
      dot.append(svg("title", {}, `${s.name}: ${xFormat(x)} → ${yFormat ? yFormat(y) : short(y)}`));
      root.append(dot);
    }
  });
  return root;
}

// The legend beside a chart, as HTML (text nodes only).
export function legend(series, lines = []) {
  const ul = document.createElement("ul");
  ul.className = "legend";
  const item = (name, cls) => {
    const li = document.createElement("li");
    const swatch = document.createElement("span");
    swatch.className = `swatch ${cls}`;
    li.append(swatch, document.createTextNode(name));
    ul.append(li);
  };
  series.forEach((s, i) => item(s.name, `s${i % 8}`));
  lines.forEach((l, i) => item(l.name, `r${i % 4}`));
  return ul;
}
