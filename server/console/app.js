// The console's entry: login, navigation (hash routes: no credential in any URL), pages.

import { ApiError, credential, forgetCredential, get, saveCredential } from "./api.js";
import { clear, field, h, say } from "./dom.js";
import * as adapters from "./adapters.js";
import * as engine from "./engine.js";
import * as jobs from "./jobs.js";
import * as models from "./models.js";
import * as playground from "./playground.js";
import * as tenants from "./tenants.js";
import * as usage from "./usage.js";

const PAGES = {
  admin: [["tenants", "Tenants", tenants], ["adapters", "Adapters", adapters],
          ["engine", "Engine", engine], ["jobs", "Fine-tuning", jobs],
          ["usage", "Usage", usage], ["playground", "Playground", playground]],
  tenant: [["models", "Models", models], ["jobs", "Fine-tuning", jobs],
           ["playground", "Playground", playground]],
};

const main = document.getElementById("main");
const nav = document.getElementById("nav");
const who = document.getElementById("who");
const logout = document.getElementById("logout");
let cleanup = null;

function route() {
  const [page = "", ...rest] = location.hash.replace(/^#\/?/, "").split("/");
  return { page, arg: rest.length ? decodeURIComponent(rest.join("/")) : null };
}

export function navigate(page, arg = null) {
  location.hash = arg === null ? `#/${page}` : `#/${page}/${encodeURIComponent(arg)}`;
}

function show() {
  if (cleanup) cleanup();
  cleanup = null;
  const cred = credential();
  clear(nav);
  if (!cred) {
    who.textContent = "";
    logout.hidden = true;
    loginPage();
    return;
  }
  const pages = PAGES[cred.role];
  const { page, arg } = route();
  const current = pages.find(([id]) => id === page) || pages[0];
  for (const [id, label] of pages) {
    nav.append(h("a", { href: `#/${id}`, class: id === current[0] ? "active" : null,
                        "data-page": id, text: label }));
  }
  who.textContent = cred.role === "admin" ? "operator" : `tenant ${cred.tenant}`;
  logout.hidden = false;
  clear(main);
  const ctx = { cred, arg, navigate, role: cred.role };
  const result = current[2].render(main, ctx);
  Promise.resolve(result).then((fn) => { if (typeof fn === "function") cleanup = fn; })
    .catch((err) => {
      if (err instanceof ApiError && err.status === 401) return;  // "console:unauthorized"
      main.append(h("p", { class: "notice error", text: err.message || String(err) }));
    });
}

function endSession(message) {
  forgetCredential();
  show();
  const out = document.getElementById("login-out");
  if (out && message) say(out, message, "error");
}

function loginPage() {
  let role = "admin";
  const out = h("p", { id: "login-out", class: "notice" });
  const token = h("input", { type: "password", id: "login-token", autocomplete: "off",
                             required: true });
  const tenant = h("input", { id: "login-tenant", autocomplete: "off" });
  const tenantField = field("Tenant id", tenant);
  const tokenLabel = h("span", { text: "Admin token" });
  tenantField.hidden = true;
  const tabs = ["admin", "tenant"].map((r) => h("button", {
    type: "button", "data-role": r, class: r === role ? "active" : null,
    text: r === "admin" ? "Operator" : "Tenant",
    on: { click: () => {
      role = r;
      tabs.forEach((t) => t.classList.toggle("active", t.dataset.role === r));
      tenantField.hidden = r !== "tenant";
      tenant.required = r === "tenant";
      tokenLabel.textContent = r === "admin" ? "Admin token" : "Tenant API key";
    } } }));
  const form = h("form", { id: "login", on: { submit: async (e) => {
    e.preventDefault();
    const cred = role === "admin" ? { role, token: token.value.trim() }
      : { role, tenant: tenant.value.trim(), token: token.value.trim() };
    try {
      // A cheap call the credential must pass: it is kept only if the server accepts it.
      await get(role === "admin" ? "/admin/tenants" : "/v1/models", { as: cred });
    } catch (err) {
      say(out, err.status === 401 || err.status === 403
        ? `Not accepted: ${err.message}` : err.message, "error");
      return;
    }
    token.value = "";
    saveCredential(cred);
    show();
  } } },
    tenantField,
    h("label", {}, tokenLabel, token),
    h("button", { type: "submit", class: "primary", id: "login-submit", text: "Log in" }));
  clear(main).append(h("section", { class: "login" },
    h("h2", { text: "Log in to the loraplex console" }),
    h("div", { class: "tabs" }, tabs), form, out,
    h("p", { class: "muted", text: "The credential stays in this tab (session storage) and is "
      + "sent only in the Authorization header." })));
}

logout.addEventListener("click", () => {
  forgetCredential();
  location.hash = "";
  show();
});
window.addEventListener("hashchange", show);
// A page whose call answers 401 (token changed, key revoked) sends the user back to login.
window.addEventListener("console:unauthorized", (e) => endSession(e.detail));
show();
