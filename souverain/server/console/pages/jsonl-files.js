// What the fine-tuning and batches pages share (not a page itself): a JSONL file picker that
// uploads the chosen file at once (POST /v1/files, with progress) and lists the API's refusal
// by line, downloads of a stored file (GET /v1/files/{id}/content) through a blob: URL (a
// plain link would not carry the API key), and status badges.

import * as api from "../api.js";
import { add, num, t } from "../i18n.js";
import { errorText, fill, h } from "../ui.js";

add({
  en: {
    "files.choose": "Choose a JSONL file, or drop it here",
    "files.uploading": "Uploading {name}… {pct} %",
    "files.uploaded": "{name} is uploaded: {lines} lines.",
    "files.refused": "The server refused {name}:",
    "files.line": "Line {n}",
    "files.lineText": "What line {n} holds:",
    "files.save": "Save {name}",
    "files.saveAgain": "Downloaded · save again",
    "files.preparing": "Preparing the download…",
    "files.lines": "Lines", "files.kind": "Kind", "files.size": "Size", "files.uploadedAt": "Uploaded",
    "files.deleteConfirm": "Delete {name}? It cannot be undone.",
    "files.deleted": "{name} is deleted.",
    "files.kind.instruct": "Conversations", "files.kind.pretrain": "Plain text",
    "files.kind.preference": "Preferences", "files.kind.classifier": "Labelled examples",
    "files.kind.batch_request": "Requests", "files.kind.batch_result": "Results",
    "files.kind.batch_error": "Errors",
  },
  fr: {
    "files.choose": "Choisissez un fichier JSONL, ou déposez-le ici",
    "files.uploading": "Envoi de {name}… {pct} %",
    "files.uploaded": "{name} est envoyé : {lines} lignes.",
    "files.refused": "Le serveur a refusé {name} :",
    "files.line": "Ligne {n}",
    "files.lineText": "Contenu de la ligne {n} :",
    "files.save": "Enregistrer {name}",
    "files.saveAgain": "Téléchargé · enregistrer à nouveau",
    "files.preparing": "Préparation du téléchargement…",
    "files.lines": "Lignes", "files.kind": "Type", "files.size": "Taille", "files.uploadedAt": "Envoyé le",
    "files.deleteConfirm": "Supprimer {name} ? C'est définitif.",
    "files.deleted": "{name} est supprimé.",
    "files.kind.instruct": "Conversations", "files.kind.pretrain": "Texte brut",
    "files.kind.preference": "Préférences", "files.kind.classifier": "Exemples étiquetés",
    "files.kind.batch_request": "Requêtes", "files.kind.batch_result": "Résultats",
    "files.kind.batch_error": "Erreurs",
  },
});

/** Where an error message of the API points: "train.jsonl line 3 is not valid JSON" and
 *  "train.jsonl line 3: the first message ..." -> {file: "train.jsonl", line: 3, message}. */
export function lineOf(message) {
  const m = /^(.*?)\s*\bline (\d+)\b[:,]?\s*(.*)$/s.exec(message);
  if (!m) return { file: null, line: null, message };
  return { file: m[1] || null, line: Number(m[2]), message: m[3] || message };
}

/** A list of the API's error messages as the API wrote them, one item per message, with its
 *  line number first (data-line) and, when the local file is at hand, what that line holds. */
export function lineErrors(messages, lines = null) {
  return h("ul", { class: "line-errors" }, messages.map((text) => {
    const where = lineOf(text);
    const shown = where.line && lines && lines[where.line - 1] !== undefined ? lines[where.line - 1] : null;
    return h("li", { dataset: where.line ? { line: where.line } : {} },
      where.line ? h("strong", {}, t("files.line", { n: where.line })) : null,
      h("div", {}, text),
      shown !== null ? h("details", {}, h("summary", {}, t("files.lineText", { n: where.line })),
        h("pre", {}, shown.length > 600 ? `${shown.slice(0, 600)}…` : shown)) : null);
  }));
}

/** A file picker (and drop zone) that uploads what is chosen with `purpose`: returns
 *  {el, dispose}; onUploaded(file) gets the API's file object. */
export function uploader({ purpose, id, onUploaded }) {
  const input = h("input", { type: "file", id, accept: ".jsonl,.json,.txt,application/jsonl,application/json,text/plain" });
  const bar = h("progress", { max: 1, value: 0, hidden: true });
  const status = h("div", { class: "upload-status", "aria-live": "polite" });
  const zone = h("div", { class: "dropzone" }, h("label", { for: id }, t("files.choose")), input, bar, status);
  let ac = null;

  async function send(file) {
    if (ac) ac.abort();
    ac = new AbortController();
    const fd = new FormData();
    fd.append("purpose", purpose);
    fd.append("file", file, file.name);
    bar.hidden = false;
    bar.value = 0;
    fill(status, h("span", { class: "muted" }, t("files.uploading", { name: file.name, pct: 0 })));
    try {
      const made = await api.upload("/v1/files", fd, (f) => {
        bar.value = f;
        fill(status, h("span", { class: "muted" }, t("files.uploading", { name: file.name, pct: Math.round(f * 100) })));
      }, { signal: ac.signal });
      fill(status, h("p", { class: "ok", role: "status" }, t("files.uploaded", { name: made.filename, lines: num(made.num_lines ?? 0) })));
      if (onUploaded) await onUploaded(made);
    } catch (err) {
      if (err.name === "AbortError") return;
      // a refusal names the line: show it with what the line holds (the file is right here)
      let lines = null;
      if (lineOf(errorText(err)).line && file.size < 8 * 1024 * 1024) {
        try { lines = (await file.text()).split("\n"); } catch { lines = null; }
      }
      fill(status, h("div", { class: "error upload-error", role: "alert" },
        h("p", {}, t("files.refused", { name: file.name })), lineErrors([errorText(err)], lines)));
    } finally {
      bar.hidden = true;
      input.value = "";  // the same file, fixed, can be chosen again
    }
  }

  input.addEventListener("change", () => { if (input.files && input.files[0]) send(input.files[0]); });
  zone.addEventListener("dragover", (ev) => { ev.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (ev) => {
    ev.preventDefault();
    zone.classList.remove("over");
    const file = ev.dataTransfer && ev.dataTransfer.files[0];
    if (file) send(file);
  });
  return { el: zone, dispose: () => { if (ac) ac.abort(); } };
}

function dispositionName(header) {
  if (!header) return null;
  const star = /filename\*=(?:UTF-8|utf-8)''([^;]+)/.exec(header);
  if (star) { try { return decodeURIComponent(star[1]); } catch { /* the plain name then */ } }
  const plain = /filename="?([^";]+)"?/.exec(header);
  return plain ? plain[1] : null;
}

/** Fetch a stored file with the API key, then offer it as a blob: link (<a download>) placed
 *  in `where` and clicked once. Returns the blob: URL (revoke it when the page goes). */
export async function downloadFile(fileId, where, fallbackName) {
  fill(where, h("span", { class: "muted" }, t("files.preparing")));
  try {
    const resp = await api.get(`/v1/files/${encodeURIComponent(fileId)}/content`, { raw: true });
    const name = dispositionName(resp.headers.get("content-disposition")) || fallbackName || `${fileId}.jsonl`;
    const url = URL.createObjectURL(await resp.blob());
    // the download starts at once; the link stays for a second copy
    const link = h("a", { href: url, download: name, title: name, class: "download-link", dataset: { fileId } },
      t("files.saveAgain"));
    fill(where, link);
    link.click();
    return url;
  } catch (err) {
    fill(where, h("span", { class: "error", role: "alert" }, errorText(err)));
    return null;
  }
}

/** A status badge: its words from `${prefix}.status.${status}`, the raw status in data-status. */
export function statusBadge(prefix, status, kinds) {
  const kind = kinds.ok.includes(status) ? "ok" : kinds.error.includes(status) ? "error"
    : kinds.warn.includes(status) ? "warn" : "";
  return h("span", { class: `badge ${kind}`.trim(), dataset: { status }, title: status }, t(`${prefix}.status.${status}`));
}

/** A file's kind in words (the API's sample_type). */
export function kindText(sampleType) {
  if (!sampleType) return "—";
  const key = `files.kind.${sampleType}`;
  const s = t(key);
  return s === key ? sampleType : s;
}
