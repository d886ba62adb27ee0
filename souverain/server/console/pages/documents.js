// Documents: the document libraries of the Libraries API (/v1/libraries...). Without a
// `library` parameter the page lists the libraries (create, open, delete); with one
// (#/documents?library=<id>) it shows that library: add documents (drag and drop or a file
// button), follow their processing (todo -> in_progress -> done | error), delete them, search
// the passages, and ask questions answered from the library with numbered citations.
//
// Retrieval is reached through chat completions' `document_library` tool: the server puts the
// relevant passages in the prompt and returns them in the message's `references` (a souverain
// extension: id, document_name, page, heading, text, cited), and appends a "Sources:" list to
// the answer text. The page cuts that list off and draws the references itself, as numbered
// citation buttons that open the passage beside the answer.

import * as api from "../api.js";
import { add, date, num, t } from "../i18n.js";
import { bytes, errorBox, errorText, field, fill, h, table, toast } from "../ui.js";

add({
  en: {
    "documents.title": "Documents",
    "documents.intro": "A library is a set of documents that models can answer from. Create a library, add your documents to it, then ask questions: each answer shows the passages it comes from.",
    "documents.off": "Document libraries are turned off on this server (it was started with --no-libraries).",
    "documents.libraries": "Libraries",
    "documents.noLibraries": "No library yet. Create one below to add documents.",
    "documents.description": "Description",
    "documents.count": "Documents",
    "documents.size": "Size",
    "documents.open": "Open",
    "documents.newLibrary": "New library",
    "documents.namePlaceholder": "e.g. HR policies",
    "documents.descriptionHint": "Optional: what is in it, for the people who use it.",
    "documents.nameRequired": "Give the library a name.",
    "documents.created": "Library “{name}” created.",
    "documents.deleteLibraryQ": "Delete “{name}” with its documents ({count})? This cannot be undone.",
    "documents.deleteDocQ": "Delete “{name}”? This cannot be undone.",
    "documents.confirmDelete": "Yes, delete",
    "documents.libraryDeleted": "Library “{name}” deleted.",
    "documents.docDeleted": "“{name}” deleted.",
    "documents.back": "← All libraries",
    "documents.add": "Add documents",
    "documents.drop": "Drop files here",
    "documents.or": "or",
    "documents.choose": "Choose files…",
    "documents.types": "PDF, Word (.docx), Markdown, HTML or text files. Several at once is fine.",
    "documents.waiting": "Waiting to upload",
    "documents.uploading": "Uploading… {pct} %",
    "documents.uploadFailed": "Not added: {message}",
    "documents.inLibrary": "Documents in this library",
    "documents.filter": "Find a document by name",
    "documents.noDocuments": "No document yet. Add some above.",
    "documents.noMatch": "No document name matches.",
    "documents.pages": "Pages",
    "documents.added": "Added",
    "documents.pageOf": "Page {page} of {pages}",
    "documents.previous": "Previous",
    "documents.next": "Next",
    "documents.reprocess": "Process again",
    "documents.status.todo": "Queued",
    "documents.status.in_progress": "Processing…",
    "documents.status.done": "Ready",
    "documents.status.error": "Failed",
    "documents.status.removed": "Removed",
    "documents.ask": "Ask the library",
    "documents.askHint": "The answer is written by the model from the passages of this library that match your question, and cites them.",
    "documents.question": "Your question",
    "documents.questionPlaceholder": "e.g. How long is the notice period?",
    "documents.askButton": "Ask",
    "documents.stop": "Stop",
    "documents.stopped": "Stopped.",
    "documents.thinking": "Looking through the library…",
    "documents.noModel": "No model on this server can answer questions (none is chat-capable).",
    "documents.sources": "Sources",
    "documents.uncited": "The model did not mark its sources in its answer: these are the passages it was given.",
    "documents.showPassage": "Show passage {n}",
    "documents.passage": "Passage [{n}]",
    "documents.document": "Document",
    "documents.page": "Page",
    "documents.section": "Section",
    "documents.pageN": "page {n}",
    "documents.pickCitation": "Click a numbered citation to read the passage here.",
    "documents.search": "Search the passages",
    "documents.searchHint": "Finds the passages of this library closest in meaning to your words.",
    "documents.searchWords": "Words to look for",
    "documents.searchPlaceholder": "e.g. notice period",
    "documents.searchButton": "Search",
    "documents.noHits": "No passage of this library matches.",
  },
  fr: {
    "documents.title": "Documents",
    "documents.intro": "Une bibliothèque est un ensemble de documents à partir desquels les modèles répondent. Créez une bibliothèque, ajoutez-y vos documents, puis posez vos questions : chaque réponse montre les passages d'où elle vient.",
    "documents.off": "Les bibliothèques de documents sont désactivées sur ce serveur (il a été lancé avec --no-libraries).",
    "documents.libraries": "Bibliothèques",
    "documents.noLibraries": "Aucune bibliothèque pour l'instant. Créez-en une ci-dessous pour ajouter des documents.",
    "documents.description": "Description",
    "documents.count": "Documents",
    "documents.size": "Taille",
    "documents.open": "Ouvrir",
    "documents.newLibrary": "Nouvelle bibliothèque",
    "documents.namePlaceholder": "p. ex. Règlement RH",
    "documents.descriptionHint": "Facultatif : ce qu'elle contient, pour ceux qui l'utilisent.",
    "documents.nameRequired": "Donnez un nom à la bibliothèque.",
    "documents.created": "Bibliothèque « {name} » créée.",
    "documents.deleteLibraryQ": "Supprimer « {name} » et ses documents ({count}) ? C'est définitif.",
    "documents.deleteDocQ": "Supprimer « {name} » ? C'est définitif.",
    "documents.confirmDelete": "Oui, supprimer",
    "documents.libraryDeleted": "Bibliothèque « {name} » supprimée.",
    "documents.docDeleted": "« {name} » supprimé.",
    "documents.back": "← Toutes les bibliothèques",
    "documents.add": "Ajouter des documents",
    "documents.drop": "Déposez des fichiers ici",
    "documents.or": "ou",
    "documents.choose": "Choisir des fichiers…",
    "documents.types": "Fichiers PDF, Word (.docx), Markdown, HTML ou texte. Plusieurs à la fois, c'est possible.",
    "documents.waiting": "En attente d'envoi",
    "documents.uploading": "Envoi… {pct} %",
    "documents.uploadFailed": "Non ajouté : {message}",
    "documents.inLibrary": "Documents de cette bibliothèque",
    "documents.filter": "Trouver un document par son nom",
    "documents.noDocuments": "Aucun document pour l'instant. Ajoutez-en ci-dessus.",
    "documents.noMatch": "Aucun nom de document ne correspond.",
    "documents.pages": "Pages",
    "documents.added": "Ajouté",
    "documents.pageOf": "Page {page} sur {pages}",
    "documents.previous": "Précédente",
    "documents.next": "Suivante",
    "documents.reprocess": "Traiter à nouveau",
    "documents.status.todo": "En file d'attente",
    "documents.status.in_progress": "Traitement…",
    "documents.status.done": "Prêt",
    "documents.status.error": "Échec",
    "documents.status.removed": "Supprimé",
    "documents.ask": "Interroger la bibliothèque",
    "documents.askHint": "La réponse est rédigée par le modèle à partir des passages de cette bibliothèque qui correspondent à votre question, et les cite.",
    "documents.question": "Votre question",
    "documents.questionPlaceholder": "p. ex. Quelle est la durée du préavis ?",
    "documents.askButton": "Demander",
    "documents.stop": "Arrêter",
    "documents.stopped": "Arrêté.",
    "documents.thinking": "Recherche dans la bibliothèque…",
    "documents.noModel": "Aucun modèle de ce serveur ne peut répondre à des questions (aucun ne fait de chat).",
    "documents.sources": "Sources",
    "documents.uncited": "Le modèle n'a pas indiqué ses sources dans sa réponse : voici les passages qui lui ont été donnés.",
    "documents.showPassage": "Afficher le passage {n}",
    "documents.passage": "Passage [{n}]",
    "documents.document": "Document",
    "documents.page": "Page",
    "documents.section": "Section",
    "documents.pageN": "page {n}",
    "documents.pickCitation": "Cliquez sur une citation numérotée pour lire le passage ici.",
    "documents.search": "Rechercher dans les passages",
    "documents.searchHint": "Trouve les passages de cette bibliothèque les plus proches par le sens de vos mots.",
    "documents.searchWords": "Mots à rechercher",
    "documents.searchPlaceholder": "p. ex. préavis",
    "documents.searchButton": "Rechercher",
    "documents.noHits": "Aucun passage de cette bibliothèque ne correspond.",
  },
});

const POLL_MS = 1500;
const ACCEPT = ".pdf,.docx,.md,.markdown,.txt,.text,.html,.htm";
const SOURCES = "\n\nSources:\n"; // what the server appends to a grounded answer
const MODEL_KEY = "souverain.documents.model";
const enc = encodeURIComponent;

// Whether the server serves the Libraries API (/health's features: no call to a route that
// is not there, which the browser would log as an error).
async function hasLibraries() {
  const info = await api.serverInfo();
  return Boolean(info.features && info.features.libraries);
}

/** The page's timers and requests, all stopped by dispose(). */
function lifetime() {
  const ctl = new AbortController();
  const timers = new Set();
  return {
    signal: ctl.signal,
    get over() { return ctl.signal.aborted; },
    later(fn, ms) {
      const id = setTimeout(() => { timers.delete(id); if (!ctl.signal.aborted) fn(); }, ms);
      timers.add(id);
      return id;
    },
    cancel(id) { clearTimeout(id); timers.delete(id); },
    dispose() { for (const id of timers) clearTimeout(id); timers.clear(); ctl.abort(); },
  };
}

const aborted = (e) => e && e.name === "AbortError";
const isoDate = (s) => (s ? date(Date.parse(s) / 1000) : "");

export async function render(root, ctx) {
  const life = lifetime();
  root.append(h("h1", {}, t("documents.title")));
  try {
    if (!(await hasLibraries())) {
      root.append(h("p", { class: "warn", role: "status" }, t("documents.off")));
    } else if (ctx.params.get("library")) {
      await libraryPage(root, ctx, ctx.params.get("library"), life);
    } else {
      await listPage(root, ctx, life);
    }
  } catch (e) {
    if (!aborted(e)) root.append(errorBox(e));
  }
  return () => life.dispose();
}

/** A Delete button that asks first, in place: [Delete] -> "question? [Yes, delete] [Cancel]". */
function confirmDelete(question, onYes) {
  const box = h("span", { class: "confirm" });
  const ask = () => {
    const yes = h("button", { type: "button", class: "danger", onclick: async () => {
      yes.disabled = true;
      try {
        await onYes();
      } catch (e) {
        if (!aborted(e)) fill(box, h("span", { class: "error", role: "alert" }, errorText(e)), " ", start());
      }
    } }, t("documents.confirmDelete"));
    const no = h("button", { type: "button", class: "secondary", onclick: () => fill(box, start()) },
      t("common.cancel"));
    fill(box, h("span", { class: "confirm-q" }, question), " ", yes, " ", no);
    no.focus();
  };
  const start = () => h("button", { type: "button", class: "danger", onclick: ask }, t("common.delete"));
  fill(box, start());
  return box;
}

// -- the list of libraries ------------------------------------------------------------------
async function listPage(root, ctx, life) {
  const listBox = h("div", { id: "libraries" }, h("p", { class: "muted" }, t("common.loading")));
  const name = h("input", { id: "library-name", name: "name", maxlength: "200", "aria-required": "true",
    autocomplete: "off", placeholder: t("documents.namePlaceholder") });
  const description = h("input", { id: "library-description", name: "description", autocomplete: "off" });
  const formError = h("div", { "aria-live": "polite" });
  const create = h("button", { type: "submit", id: "library-create" }, t("common.create"));
  const form = h("form", { class: "stack", id: "library-form" },
    field(t("common.name"), name), field(t("documents.description"), description, t("documents.descriptionHint")),
    formError, h("div", { class: "row" }, create));
  root.append(
    h("p", { class: "muted" }, t("documents.intro")),
    h("div", { class: "panel" }, h("h2", {}, t("documents.libraries")), listBox),
    h("div", { class: "panel" }, h("h2", {}, t("documents.newLibrary")), form));

  async function load() {
    const res = await api.get("/v1/libraries", { signal: life.signal });
    const libs = res.data || [];
    fill(listBox, table([
      { label: t("common.name"), cell: (l) => h("a", { href: `#/documents?library=${enc(l.id)}`, class: "library-link" }, l.name) },
      { label: t("documents.description"), cell: (l) => l.description || "" },
      { label: t("documents.count"), cell: (l) => num(l.nb_documents) },
      { label: t("documents.size"), cell: (l) => bytes(l.total_size || 0) },
      { label: t("common.created"), cell: (l) => isoDate(l.created_at) },
      { label: "", cell: (l) => h("span", { class: "row" },
        h("button", { type: "button", class: "secondary", onclick: () => ctx.go("documents", { library: l.id }) }, t("documents.open")),
        confirmDelete(t("documents.deleteLibraryQ", { name: l.name, count: num(l.nb_documents) }), async () => {
          await api.del(`/v1/libraries/${enc(l.id)}`, { signal: life.signal });
          toast(t("documents.libraryDeleted", { name: l.name }), "ok");
          await load();
        })) },
    ], libs, { empty: t("documents.noLibraries") }));
  }

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    fill(formError);
    if (!name.value.trim()) { fill(formError, h("p", { class: "error", role: "alert" }, t("documents.nameRequired"))); return; }
    create.disabled = true;
    try {
      const body = { name: name.value.trim() };
      if (description.value.trim()) body.description = description.value.trim();
      const lib = await api.post("/v1/libraries", body, { signal: life.signal });
      toast(t("documents.created", { name: lib.name }), "ok");
      ctx.go("documents", { library: lib.id }); // straight to it: the next step is adding documents
    } catch (e) {
      if (!aborted(e)) fill(formError, errorBox(e));
    } finally {
      create.disabled = false;
    }
  });

  try {
    await load();
  } catch (e) {
    if (!aborted(e)) fill(listBox, errorBox(e));
  }
}

// -- one library ----------------------------------------------------------------------------
async function libraryPage(root, ctx, libraryId, life) {
  const base = `/v1/libraries/${enc(libraryId)}`;
  root.append(h("p", {}, h("a", { href: "#/documents", id: "libraries-back" }, t("documents.back"))));
  let lib;
  try {
    lib = await api.get(base, { signal: life.signal });
  } catch (e) {
    if (!aborted(e)) root.append(errorBox(e));
    return;
  }
  root.querySelector("h1").textContent = `${t("documents.title")} · ${lib.name}`;
  if (lib.description) root.append(h("p", { class: "muted" }, lib.description));

  const docs = documentsPanel(root, base, life);
  const models = modelPicker(life);
  askPanel(root, libraryId, models, life);
  searchPanel(root, libraryId, life);
  await Promise.all([docs.load(), models.load()]);
}

function statusBadge(status, docName) {
  const kind = { done: "ok", error: "error", removed: "error" }[status] || "warn";
  return h("span", { class: `badge ${kind}`, dataset: { status, doc: docName || "" } },
    t(`documents.status.${status}`));
}

/** The upload area, the per-file upload rows and the table of documents (polled while any
 *  document is still being processed). */
function documentsPanel(root, base, life) {
  const input = h("input", { type: "file", id: "document-files", multiple: true, accept: ACCEPT, hidden: true });
  const choose = h("button", { type: "button", id: "document-choose", onclick: () => input.click() }, t("documents.choose"));
  const drop = h("div", { class: "dropzone", id: "document-drop" },
    h("p", {}, h("strong", {}, t("documents.drop"))), h("p", {}, t("documents.or")), choose, input,
    h("p", { class: "muted" }, t("documents.types")));
  const uploadList = h("ul", { class: "upload-list", id: "uploads", "aria-live": "polite" });
  const filter = h("input", { type: "search", id: "document-filter", autocomplete: "off" });
  const listBox = h("div", { id: "documents" }, h("p", { class: "muted" }, t("common.loading")));
  const pager = h("div", { class: "row" });
  const refresh = h("button", { type: "button", class: "secondary", onclick: () => load() }, t("common.refresh"));
  root.append(
    h("div", { class: "panel" }, h("h2", {}, t("documents.add")), drop, uploadList),
    h("div", { class: "panel" }, h("h2", {}, t("documents.inLibrary")),
      h("div", { class: "row doc-tools" }, field(t("documents.filter"), filter), refresh),
      listBox, pager));

  const rows = []; // upload rows: {file, li, doc (the API's document once uploaded), status}
  let page = 0;
  let timer = null;
  let busy = false;
  let again = false;

  // -- uploads --
  drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", (ev) => { if (!drop.contains(ev.relatedTarget)) drop.classList.remove("over"); });
  drop.addEventListener("drop", (ev) => {
    ev.preventDefault();
    drop.classList.remove("over");
    if (ev.dataTransfer && ev.dataTransfer.files.length) uploadAll([...ev.dataTransfer.files]);
  });
  input.addEventListener("change", () => {
    const files = [...input.files];
    input.value = ""; // the same file can be chosen again
    if (files.length) uploadAll(files);
  });

  function drawRow(r) {
    const parts = [h("span", { class: "upload-name" }, r.file.name), h("span", { class: "muted" }, bytes(r.file.size))];
    if (r.error) {
      parts.push(h("span", { class: "error", role: "alert" }, t("documents.uploadFailed", { message: r.error })));
    } else if (r.doc) {
      parts.push(statusBadge(r.status, r.doc.name));
      if (r.reason) parts.push(h("span", { class: "error" }, r.reason));
    } else if (r.progress === null) {
      parts.push(h("span", { class: "muted" }, t("documents.waiting")));
    } else {
      parts.push(h("progress", { max: "1", value: String(r.progress) }),
        h("span", { class: "muted" }, t("documents.uploading", { pct: Math.round(r.progress * 100) })));
    }
    fill(r.li, parts);
  }

  async function uploadAll(files) {
    const batch = files.map((file) => ({ file, li: h("li", { class: "upload" }), doc: null, progress: null }));
    for (const r of batch) { rows.unshift(r); uploadList.prepend(r.li); drawRow(r); }
    for (const r of batch) { // one after the other: the server processes them in order anyway
      if (life.over) return;
      r.progress = 0;
      drawRow(r);
      const form = new FormData();
      form.append("file", r.file, r.file.name);
      try {
        r.doc = await api.upload(`${base}/documents`, form, (p) => { r.progress = p; drawRow(r); }, { signal: life.signal });
        r.status = r.doc.process_status;
      } catch (e) {
        if (aborted(e)) return;
        r.error = errorText(e);
      }
      drawRow(r);
      if (r.doc) load();
    }
  }

  // -- the list --
  async function load() {
    if (busy) { again = true; return; }
    busy = true;
    if (timer) { life.cancel(timer); timer = null; }
    try {
      const q = new URLSearchParams({ page: String(page), page_size: "50", sort_by: "created_at", sort_order: "desc" });
      if (filter.value.trim()) q.set("search", filter.value.trim());
      const res = await api.get(`${base}/documents?${q}`, { signal: life.signal });
      draw(res);
      await followUploads(res.data);
      const pending = (d) => d.process_status === "todo" || d.process_status === "in_progress";
      if (res.data.some(pending) || rows.some((r) => r.doc && (r.status === "todo" || r.status === "in_progress"))) {
        timer = life.later(load, POLL_MS);
      }
    } catch (e) {
      if (aborted(e)) return;
      fill(listBox, errorBox(e));
      timer = life.later(load, POLL_MS * 4); // try again: the server may be restarting
    } finally {
      busy = false;
    }
    if (again) { again = false; load(); }
  }

  // upload rows show the status of their document: from the list, or asked one by one when
  // the list (filtered, another page) does not show it
  async function followUploads(listed) {
    const byId = new Map(listed.map((d) => [d.id, d]));
    for (const r of rows) {
      if (!r.doc || r.status === "done" || r.status === "error" || r.status === "removed") continue;
      const d = byId.get(r.doc.id);
      if (d) {
        r.status = d.process_status;
        r.reason = d.attributes && d.attributes.error;
      } else {
        try {
          const st = await api.get(`${base}/documents/${enc(r.doc.id)}/status`, { signal: life.signal });
          r.status = st.process_status;
          r.reason = st.error;
        } catch (e) {
          if (aborted(e)) throw e;
          if (e.status === 404) r.status = "removed";
        }
      }
      drawRow(r);
    }
  }

  function draw(res) {
    const docs = res.data || [];
    const empty = filter.value.trim() ? t("documents.noMatch") : t("documents.noDocuments");
    fill(listBox, table([
      { label: t("common.name"), cell: (d) => h("span", { class: "doc-name" }, d.name) },
      { label: t("common.status"), cell: (d) => h("span", { class: "stack" }, statusBadge(d.process_status, d.name),
        d.process_status === "error" && d.attributes && d.attributes.error
          ? h("small", { class: "error doc-error" }, d.attributes.error) : null) },
      { label: t("documents.pages"), cell: (d) => (d.number_of_pages ? num(d.number_of_pages) : "—") },
      { label: t("documents.size"), cell: (d) => bytes(d.size || 0) },
      { label: t("documents.added"), cell: (d) => isoDate(d.created_at) },
      { label: "", cell: (d) => h("span", { class: "row" },
        d.process_status === "error" ? h("button", { type: "button", class: "secondary", onclick: async (ev) => {
          ev.target.disabled = true;
          try {
            await api.post(`${base}/documents/${enc(d.id)}/reprocess`, undefined, { signal: life.signal });
          } catch (e) {
            if (!aborted(e)) toast(errorText(e), "error");
          }
          load();
        } }, t("documents.reprocess")) : null,
        confirmDelete(t("documents.deleteDocQ", { name: d.name }), async () => {
          await api.del(`${base}/documents/${enc(d.id)}`, { signal: life.signal });
          toast(t("documents.docDeleted", { name: d.name }), "ok");
          await load();
        })) },
    ], docs, { empty }));
    const p = res.pagination || {};
    fill(pager);
    if ((p.total_pages || 0) > 1) {
      pager.append(
        h("button", { type: "button", class: "secondary", disabled: page === 0, onclick: () => { page -= 1; load(); } }, t("documents.previous")),
        h("span", { class: "muted" }, t("documents.pageOf", { page: page + 1, pages: p.total_pages })),
        h("button", { type: "button", class: "secondary", disabled: !p.has_more, onclick: () => { page += 1; load(); } }, t("documents.next")));
    }
  }

  let typing = null;
  filter.addEventListener("input", () => { // search as one types, once the typing pauses
    if (typing) life.cancel(typing);
    typing = life.later(() => { page = 0; load(); }, 300);
  });

  return { load };
}

/** The chat-capable models of GET /v1/models in a <select> (shared by Ask and Search). */
function modelPicker(life) {
  const select = h("select", { id: "documents-model" });
  const picker = {
    select,
    models: null,
    error: null,
    async load() {
      try {
        const res = await api.get("/v1/models", { signal: life.signal });
        picker.models = (res.data || []).filter((m) => m.capabilities && m.capabilities.completion_chat && !m.archived);
      } catch (e) {
        if (aborted(e)) return;
        picker.error = e;
        picker.models = [];
      }
      const saved = localStorage.getItem(MODEL_KEY);
      // the remembered one, else one already in memory (no loading wait), else the first
      const pick = picker.models.find((m) => m.id === saved) || picker.models.find((m) => m.loaded) || picker.models[0];
      fill(select, picker.models.map((m) => h("option", { value: m.id, selected: pick && m.id === pick.id }, m.id)));
      for (const fn of picker.listeners) fn();
    },
    listeners: [],
    value() { return select.value; },
  };
  select.addEventListener("change", () => localStorage.setItem(MODEL_KEY, select.value));
  return picker;
}

/** "[n] handbook.pdf, page 3, § Leave" as text parts. */
function where(ref) {
  const parts = [ref.document_name];
  if (ref.page) parts.push(t("documents.pageN", { n: ref.page }));
  if (ref.heading) parts.push(`§ ${ref.heading}`);
  return parts.join(", ");
}

/** The Ask panel: a question -> a streamed grounded answer with citation buttons; a clicked
 *  citation opens its passage beside the answer. */
function askPanel(root, libraryId, models, life) {
  const question = h("textarea", { id: "ask-question", rows: "2", placeholder: t("documents.questionPlaceholder") });
  const ask = h("button", { type: "submit", id: "ask-button" }, t("documents.askButton"));
  const stop = h("button", { type: "button", class: "secondary", id: "ask-stop", hidden: true }, t("documents.stop"));
  const notice = h("div", { "aria-live": "polite" });
  const answerBox = h("div", { class: "doc-answer-main", id: "answer", "aria-live": "polite" });
  const passage = h("aside", { class: "doc-passage", id: "passage", "aria-live": "polite" },
    h("p", { class: "muted" }, t("documents.pickCitation")));
  const layout = h("div", { class: "doc-answer", hidden: true }, answerBox, passage);
  const form = h("form", { class: "stack", id: "ask-form" },
    field(t("common.model"), models.select), field(t("documents.question"), question),
    h("div", { class: "row" }, ask, stop));
  root.append(h("div", { class: "panel", id: "ask-panel" }, h("h2", {}, t("documents.ask")),
    h("p", { class: "muted" }, t("documents.askHint")), notice, form, layout));

  models.listeners.push(() => {
    if (models.error) fill(notice, errorBox(models.error));
    else if (!models.models.length) fill(notice, h("p", { class: "warn" }, t("documents.noModel")));
    ask.disabled = !models.models.length;
  });

  let running = null; // the AbortController of the answer being written
  life.signal.addEventListener("abort", () => { if (running) running.abort(); });
  stop.addEventListener("click", () => { if (running) running.abort(); });
  question.addEventListener("keydown", (ev) => { // Enter asks, Shift+Enter is a new line
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); form.requestSubmit(); }
  });

  function openPassage(ref, button) {
    for (const b of answerBox.querySelectorAll(".citation")) b.setAttribute("aria-pressed", String(b.dataset.n === String(ref.id) && b === button));
    const rows = [[t("documents.document"), ref.document_name, "passage-doc"]];
    if (ref.page) rows.push([t("documents.page"), String(ref.page), "passage-page"]);
    if (ref.heading) rows.push([t("documents.section"), ref.heading, "passage-heading"]);
    fill(passage,
      h("div", { class: "row doc-passage-head" }, h("h3", {}, t("documents.passage", { n: ref.id })),
        h("button", { type: "button", class: "secondary", id: "passage-close", onclick: () => {
          fill(passage, h("p", { class: "muted" }, t("documents.pickCitation")));
          for (const b of answerBox.querySelectorAll(".citation")) b.setAttribute("aria-pressed", "false");
          button.focus();
        } }, t("common.close"))),
      h("dl", {}, rows.map(([k, v, cls]) => [h("dt", {}, k), h("dd", { class: cls }, v)])),
      h("blockquote", { class: "passage-text" }, ref.text));
    passage.dataset.n = String(ref.id);
    if (window.matchMedia("(max-width: 720px)").matches) passage.scrollIntoView({ block: "nearest" });
  }

  const cite = (ref) => h("button", { type: "button", class: "citation", "aria-pressed": "false",
    "aria-label": t("documents.showPassage", { n: ref.id }), dataset: { n: String(ref.id) },
    onclick: (ev) => openPassage(ref, ev.currentTarget) }, `[${ref.id}]`);

  // the answer's text with its [n] markers as citation buttons
  function withCitations(text, byId) {
    const out = [];
    let last = 0;
    for (const m of text.matchAll(/\[(\d{1,3})\]/g)) {
      const ref = byId.get(Number(m[1]));
      if (!ref) continue;
      out.push(text.slice(last, m.index), cite(ref));
      last = m.index + m[0].length;
    }
    out.push(text.slice(last));
    return out;
  }

  function drawAnswer(q, text, refs, done) {
    let body = text;
    if (refs && refs.length) { // the server's "Sources:" list is drawn below as buttons
      const cut = text.lastIndexOf(SOURCES);
      if (cut >= 0) body = text.slice(0, cut);
    }
    const byId = new Map((refs || []).map((r) => [r.id, r]));
    const parts = [h("div", { class: "msg user" }, q),
      h("div", { class: "msg assistant", id: "answer-text" }, body ? withCitations(body, byId) : h("span", { class: "muted" }, t("documents.thinking")))];
    if (done && refs && refs.length) {
      const cited = refs.filter((r) => r.cited);
      const shown = cited.length ? cited : refs;
      parts.push(h("div", { class: "doc-sources", id: "sources" }, h("h3", {}, t("documents.sources")),
        cited.length ? null : h("p", { class: "muted" }, t("documents.uncited")),
        h("ol", {}, shown.map((r) => h("li", {}, cite(r), " ", where(r))))));
    }
    fill(answerBox, parts);
  }

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const q = question.value.trim();
    if (!q || running || !models.value()) return;
    running = new AbortController();
    const signal = running.signal;
    ask.disabled = true;
    stop.hidden = false;
    fill(notice);
    layout.hidden = false;
    fill(passage, h("p", { class: "muted" }, t("documents.pickCitation")));
    delete passage.dataset.n;
    let text = "";
    let refs = null;
    drawAnswer(q, text, null, false);
    const body = { model: models.value(), stream: true, temperature: 0.2, max_tokens: 400,
      messages: [{ role: "user", content: q }],
      tools: [{ type: "document_library", library_ids: [libraryId] }] };
    try {
      await api.stream("/v1/chat/completions", body, (chunk) => {
        for (const c of chunk.choices || []) {
          if (c.index !== 0 || !c.delta) continue;
          if (typeof c.delta.content === "string") text += c.delta.content;
          if (Array.isArray(c.delta.references)) refs = c.delta.references;
        }
        drawAnswer(q, text, refs, false);
      }, { signal });
      drawAnswer(q, text, refs || [], true);
    } catch (e) {
      if (aborted(e)) {
        if (!life.over) { drawAnswer(q, text, refs, false); fill(notice, h("p", { class: "muted" }, t("documents.stopped"))); }
      } else {
        drawAnswer(q, text, refs, false);
        fill(notice, errorBox(e));
      }
    } finally {
      running = null;
      if (!life.over) { ask.disabled = false; stop.hidden = true; }
    }
  });
}

/** Passage search: souverain's POST /v1/libraries/{id}/search (La Plateforme reaches a
 *  library only through chat's document_library tool; this route returns the passages that
 *  tool would retrieve, best first, with no model involved). */
function searchPanel(root, libraryId, life) {
  const input = h("input", { type: "search", id: "search-query", autocomplete: "off", placeholder: t("documents.searchPlaceholder") });
  const go = h("button", { type: "submit", id: "search-button" }, t("documents.searchButton"));
  const results = h("div", { id: "search-results", "aria-live": "polite" });
  const form = h("form", { class: "row doc-search", id: "search-form" }, field(t("documents.searchWords"), input), go);
  root.append(h("div", { class: "panel", id: "search-panel" }, h("h2", {}, t("documents.search")),
    h("p", { class: "muted" }, t("documents.searchHint")), form, results));

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const q = input.value.trim();
    if (!q) return;
    go.disabled = true;
    fill(results, h("p", { class: "muted" }, t("common.loading")));
    try {
      const res = await api.post(`/v1/libraries/${encodeURIComponent(libraryId)}/search`,
        { query: q, top_k: 5 }, { signal: life.signal });
      const hits = res.data || [];
      fill(results, hits.length ? h("ol", { class: "search-hits" }, hits.map((r) => h("li", { class: "search-hit" },
        h("div", { class: "row" }, h("strong", { class: "hit-doc" }, r.document_name),
          r.page ? h("span", { class: "muted hit-page" }, t("documents.pageN", { n: r.page })) : null,
          r.heading ? h("span", { class: "muted hit-heading" }, `§ ${r.heading}`) : null),
        h("blockquote", { class: "passage-text" }, r.text))))
        : h("p", { class: "muted" }, t("documents.noHits")));
    } catch (e) {
      if (!aborted(e)) fill(results, errorBox(e));
    } finally {
      if (!life.over) go.disabled = false;
    }
  });
}
