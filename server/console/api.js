// Every call the console makes. The credential lives in sessionStorage (this tab only, gone
// when it closes) and travels only in the Authorization header: never in a URL, never in a
// cookie. So no other site can make a call for the user (a browser attaches no such header
// cross-site), and no URL the page builds leaks it.

const STORE = "loraplex.console.credential";

// {role: "admin", token} or {role: "tenant", tenant, token}
export function credential() {
  try {
    return JSON.parse(sessionStorage.getItem(STORE) || "null");
  } catch {
    return null;
  }
}

export function saveCredential(cred) {
  sessionStorage.setItem(STORE, JSON.stringify(cred));
}

export function forgetCredential() {
  sessionStorage.removeItem(STORE);
}

export class ApiError extends Error {
  constructor(status, error) {
    super(error?.message || `HTTP ${status}`);
    this.status = status;
    this.error = error || {};
  }
}

// "/admin/tenants/{t}/adapters" from segments, each one encoded.
export function path(...segments) {
  return "/" + segments.map((s) => encodeURIComponent(String(s))).join("/");
}

export function withQuery(url, query = {}) {
  const params = new URLSearchParams();
  for (const [k, v] of Object.entries(query)) {
    if (v !== null && v !== undefined && v !== "") params.set(k, v);
  }
  const text = params.toString();
  return text ? `${url}?${text}` : url;
}

export function authHeaders(cred) {
  const headers = { Authorization: `Bearer ${cred.token}` };
  if (cred.role === "tenant") headers["X-Tenant-ID"] = cred.tenant;
  return headers;
}

async function errorOf(resp) {
  try {
    const body = await resp.json();
    return new ApiError(resp.status, body.error);
  } catch {
    return new ApiError(resp.status, { message: `HTTP ${resp.status} ${resp.statusText}` });
  }
}

// A JSON call; `as` is the credential to use (default: the logged-in one).
export async function call(method, url, { body, query, as, signal } = {}) {
  const cred = as || credential();
  if (!cred) throw new ApiError(401, { message: "not logged in" });
  const headers = authHeaders(cred);
  const init = { method, headers, signal, credentials: "omit", cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(withQuery(url, query), init);
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, { message: "the server cannot be reached" });
  }
  if (!resp.ok) {
    const err = await errorOf(resp);
    // The logged-in credential no longer works (token changed, key revoked): back to login.
    if (resp.status === 401 && !as) {
      window.dispatchEvent(new CustomEvent("console:unauthorized", { detail: err.message }));
    }
    throw err;
  }
  return resp.status === 204 ? null : resp.json();
}

export const get = (url, opts) => call("GET", url, opts);

// Every page of a list answer ({data, has_more}), following `after` = the last item's id.
export async function getAll(url, { query = {}, as, pages = 20 } = {}) {
  const items = [];
  let after;
  for (let i = 0; i < pages; i++) {
    const page = await get(url, { query: { ...query, after }, as });
    items.push(...page.data);
    if (!page.has_more || !page.data.length) break;
    after = page.data[page.data.length - 1].id;
  }
  return items;
}

// A multipart form (e.g. a dataset for /v1/files), answered with JSON.
export async function postForm(url, form) {
  let resp;
  try {
    resp = await fetch(url, { method: "POST", headers: authHeaders(credential()), body: form,
                              credentials: "omit", cache: "no-store" });
  } catch {
    throw new ApiError(0, { message: "the server cannot be reached" });
  }
  if (!resp.ok) throw await errorOf(resp);
  return resp.json();
}

// Multipart upload with progress (fetch reports none for uploads): files sent as one part
// each, named after the file, as the README's curl does.
export function upload(url, files, onProgress) {
  const cred = credential();
  const form = new FormData();
  for (const file of files) form.append(file.name, file, file.name);
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", url);
    for (const [k, v] of Object.entries(authHeaders(cred))) xhr.setRequestHeader(k, v);
    xhr.upload.onprogress = (e) => e.lengthComputable && onProgress(e.loaded / e.total);
    xhr.onerror = () => reject(new ApiError(0, { message: "the server cannot be reached" }));
    xhr.onload = () => {
      let body = null;
      try {
        body = JSON.parse(xhr.responseText);
      } catch {
        /* not JSON: reported below */
      }
      if (xhr.status >= 200 && xhr.status < 300) resolve(body);
      else reject(new ApiError(xhr.status, body?.error || { message: `HTTP ${xhr.status}` }));
    };
    xhr.send(form);
  });
}

// Server-sent events of a streamed chat completion, read with fetch + ReadableStream.
// Calls onText(piece) for each content delta; resolves with the usage (or null).
export async function streamChat(body, { as, onText, signal }) {
  const cred = as || credential();
  const headers = { ...authHeaders(cred), "Content-Type": "application/json",
                    Accept: "text/event-stream" };
  let resp;
  try {
    resp = await fetch("/v1/chat/completions", {
      method: "POST", headers, signal, credentials: "omit", cache: "no-store",
      body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
    });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, { message: "the server cannot be reached" });
  }
  if (!resp.ok) throw await errorOf(resp);
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let usage = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value.replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).trimStart()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return usage;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(0, chunk.error);
      if (chunk.usage) usage = chunk.usage;
      const piece = chunk.choices?.[0]?.delta?.content;
      if (piece) onText(piece);
    }
  }
  return usage;
}
