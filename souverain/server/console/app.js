// The shell: navigation (#/<page>), the API key dialog, the language switch. Each page is a
// module pages/<name>.js exporting render(root, ctx) -> optional dispose function; ctx gives
// the page {params (URLSearchParams of the hash), go(page, params), refresh()}.

import * as api from "./api.js";
import { LANGUAGES, lang, onLangChange, setLang, t } from "./i18n.js";
import { errorText, fill, h } from "./ui.js";

export const PAGES = ["playground", "documents", "finetuning", "batches", "models", "health"];
const main = document.getElementById("page");
let dispose = null;
let rendering = 0;

function parseHash() {
  const raw = location.hash.replace(/^#\/?/, "");
  const [name, query] = raw.split("?");
  return { name: PAGES.includes(name) ? name : (name ? null : "playground"), params: new URLSearchParams(query || "") };
}

export function go(name, params = {}) {
  const q = new URLSearchParams(params).toString();
  location.hash = `#/${name}${q ? `?${q}` : ""}`;
}

function drawNav(current) {
  const nav = document.getElementById("nav");
  fill(nav, PAGES.map((p) => h("a", { href: `#/${p}`, "aria-current": p === current ? "page" : null,
    id: `nav-${p}` }, t(`nav.${p}`))));
  document.getElementById("key-button").textContent = t(api.getKey() ? "key.button.change" : "key.button.set");
  const sel = document.getElementById("lang");
  fill(sel, Object.entries(LANGUAGES).map(([code, name]) => h("option", { value: code, selected: code === lang() }, name)));
}

async function render() {
  const token = ++rendering;
  const { name, params } = parseHash();
  drawNav(name);
  if (dispose) { try { dispose(); } catch { /* a page's cleanup must not block the next */ } }
  dispose = null;
  document.body.classList.remove("menu-open");
  if (!name) { fill(main, h("p", { class: "muted" }, t("page.missing"))); return; }
  fill(main, h("p", { class: "muted" }, t("common.loading")));
  document.title = `${t(`nav.${name}`)} · souverain`;
  let mod;
  try {
    mod = await import(`./pages/${name}.js`);
  } catch (err) {
    fill(main, h("p", { class: "error", role: "alert" }, errorText(err)));
    return;
  }
  if (token !== rendering) return;
  const root = h("section", { class: `page page-${name}`, id: `page-${name}` });
  fill(main, root);
  const ctx = { params, go, refresh: render, lang: lang() };
  try {
    dispose = (await mod.render(root, ctx)) || null;
  } catch (err) {
    root.append(h("p", { class: "error", role: "alert" }, errorText(err)));
  }
}

// -- the API key --------------------------------------------------------------------------
const dialog = document.getElementById("key-dialog");
let keyWaiters = [];

function openKeyDialog(reason) {
  document.getElementById("key-title").textContent = t("key.title");
  document.getElementById("key-help").textContent = t("key.help");
  document.getElementById("key-label").textContent = t("key.label");
  document.getElementById("key-submit").textContent = t("key.submit");
  const err = document.getElementById("key-error");
  err.hidden = !reason;
  err.textContent = reason || "";
  if (!dialog.open) dialog.showModal();
  document.getElementById("key-input").focus();
}

/** Resolves once a key the server accepts is set (pages await it after a 401). */
export function askForKey(reason) {
  openKeyDialog(reason);
  return new Promise((resolve) => keyWaiters.push(resolve));
}

document.getElementById("key-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const input = document.getElementById("key-input");
  const err = document.getElementById("key-error");
  const previous = api.getKey();
  api.setKey(input.value.trim());
  err.hidden = false;
  err.textContent = t("key.checking");
  try {
    await api.get("/v1/models");
  } catch (e) {
    api.setKey(previous);
    err.textContent = e.status === 401 || e.status === 403 ? t("key.refused", { message: e.message }) : errorText(e);
    return;
  }
  input.value = "";
  dialog.close();
  const waiters = keyWaiters;
  keyWaiters = [];
  for (const w of waiters) w();
  render();
});

api.setUnauthorizedHandler((e) => {
  if (!dialog.open) openKeyDialog(api.getKey() ? t("key.refused", { message: e.message }) : "");
});

document.getElementById("key-button").addEventListener("click", () => openKeyDialog(""));
document.getElementById("lang").addEventListener("change", (ev) => setLang(ev.target.value));
document.getElementById("menu-toggle").addEventListener("click", () => {
  const open = document.body.classList.toggle("menu-open");
  document.getElementById("menu-toggle").setAttribute("aria-expanded", String(open));
});
onLangChange(() => render());
window.addEventListener("hashchange", render);
document.documentElement.lang = lang();

// first visit: /health (no key needed) says whether the API wants a key; without one in this
// tab, ask before drawing a page (so no call is made only to be refused). A stored key the
// server no longer accepts gets the dialog from the first 401.
(async () => {
  let health = null;
  try { health = await api.serverInfo(); } catch { /* the page will say it cannot reach it */ }
  if (health && health.api_keys && !api.getKey()) await askForKey("");
  render();
})();
