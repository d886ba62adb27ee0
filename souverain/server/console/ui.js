// A small DOM builder: text is always set as text (never parsed as HTML), so model output,
// file names and error messages cannot inject markup.

import { t } from "./i18n.js";
import { ApiError } from "./api.js";

/** h("div", {class: "x", onclick: fn, dataset: {id: 1}}, "text", child, [more]) */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k === "value") el.value = v;
    else if (k === "checked" || k === "disabled" || k === "selected" || k === "hidden") el[k] = Boolean(v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

/** Replace el's children. */
export function fill(el, ...children) { el.replaceChildren(); append(el, children); return el; }

/** The readable message for an error: the API's own, with context for 403 and network errors. */
export function errorText(err) {
  if (err instanceof ApiError) {
    if (err.status === 0) return t("error.unreachable");
    if (err.status === 403) return t("error.forbidden", { message: err.message });
    return err.message;
  }
  return String(err && err.message ? err.message : err);
}

/** An error box (role=alert) for err. */
export function errorBox(err) {
  return h("p", { class: "error", role: "alert" }, errorText(err));
}

/** A transient message at the top of the page. */
export function toast(message, kind = "info") {
  const banner = document.getElementById("banner");
  banner.className = kind;
  banner.textContent = message;
  banner.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { banner.hidden = true; }, kind === "error" ? 8000 : 3000);
}

/** A table: columns [{label, cell: (row) => node|string}], rows. */
export function table(columns, rows, { empty } = {}) {
  if (!rows.length) return h("p", { class: "muted" }, empty || t("common.none"));
  return h("div", { class: "table-wrap" }, h("table", {},
    h("thead", {}, h("tr", {}, columns.map((c) => h("th", { scope: "col" }, c.label)))),
    h("tbody", {}, rows.map((r) => h("tr", {}, columns.map((c) => h("td", { "data-label": c.label }, c.cell(r))))))));
}

export function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

/** A labelled form field: field(label, input) -> <label> with the input inside. */
export function field(label, input, hint) {
  return h("label", { class: "field" }, h("span", {}, label), input, hint ? h("small", { class: "muted" }, hint) : null);
}
