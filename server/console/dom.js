// DOM building without HTML strings: every piece of data becomes a text node or an attribute
// value, never markup. (The page's CSP also turns on Trusted Types, so assigning an HTML string
// would throw.)

const EVENTS = /^on/i;

// h("tag", {class, text, attrs..., on: {click: fn}}, ...children)
export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "on") {
      for (const [event, fn] of Object.entries(value)) el.addEventListener(event, fn);
    } else if (name === "text") {
      el.textContent = String(value);
    } else if (name === "class") {
      el.className = value;
    } else if (name === "value" || name === "checked" || name === "disabled") {
      el[name] = value;
    } else if (EVENTS.test(name) || name === "style" || name === "srcdoc") {
      throw new Error(`h(): refusing attribute ${name}`);
    } else {
      el.setAttribute(name, value === true ? "" : String(value));
    }
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function clear(el) {
  el.replaceChildren();
  return el;
}

// A table: columns = [{label, cell: row => Node | string}], rows = array.
export function table(columns, rows, empty = "Nothing yet.") {
  if (!rows.length) return h("p", { class: "muted", text: empty });
  return h("table", {},
    h("thead", {}, h("tr", {}, columns.map((c) => h("th", { text: c.label })))),
    h("tbody", {}, rows.map((row) =>
      h("tr", {}, columns.map((c) => h("td", {}, c.cell(row)))))));
}

export function button(label, onClick, cls = "") {
  return h("button", { type: "button", class: cls, text: label, on: { click: onClick } });
}

// A message line that replaces its previous content; kind: "ok" | "error" | "".
export function say(el, message, kind = "") {
  el.className = `notice ${kind}`;
  el.textContent = message;
}

// Run an async action, showing its error (the API's message as is) in `out`.
export async function attempt(out, action) {
  try {
    return await action();
  } catch (err) {
    say(out, err.message || String(err), "error");
    return undefined;
  }
}

export function time(unix) {
  if (unix === null || unix === undefined) return "";
  return new Date(unix * 1000).toISOString().replace("T", " ").slice(0, 19);
}

export function bytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 ** 2) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 ** 2).toFixed(1)} MiB`;
}

export function field(label, input) {
  return h("label", {}, h("span", { text: label }), input);
}

export function section(title, ...children) {
  return h("section", {}, h("h2", { text: title }), ...children);
}
