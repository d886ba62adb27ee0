// Models: the model cards of GET /v1/models, and one card in full (GET /v1/models/{id}) at
// #/models?model=<id>. A card shows what a person choosing a model needs: what kind of model
// it is, how much text it reads at once (context length), what it can do (capabilities),
// whether it is in memory, its retirement (deprecation date, replacement) and its latest
// evaluation (passed or failed, with the report: GET /v1/observability/evaluation-runs_v2/
// {id}/report needs the API key, so it is fetched here and opened from a blob: URL).

import * as api from "../api.js";
import { add, date, lang, num, t } from "../i18n.js";
import { bytes, errorBox, errorText, fill, h, toast } from "../ui.js";

add({
  en: {
    "models.title": "Models",
    "models.intro": "The models this server offers. Pick a chat model to try it in the playground.",
    "models.count": "{n} models",
    "models.details": "Details",
    "models.back": "All models",
    "models.playground": "Open in playground",
    "models.kind.chat": "Chat", "models.kind.completion": "Text completion",
    "models.kind.embedding": "Embeddings", "models.kind.moderation": "Moderation",
    "models.kind.classifier": "Classifier",
    "models.type.base": "Base model", "models.type.fine-tuned": "Fine-tuned",
    "models.loaded": "In memory", "models.not_loaded": "Loaded on first use",
    "models.archived": "Archived",
    "models.context": "Context length",
    "models.context_value": "{n} tokens",
    "models.context_hint": "How much text the model reads at once: the conversation and its answer together (a token is about ¾ of a word).",
    "models.capabilities": "Can do",
    "models.cap.completion_chat": "Chat", "models.cap.completion_fim": "Code completion (fill in the middle)",
    "models.cap.function_calling": "Function calling (tools)", "models.cap.fine_tuning": "Can be fine-tuned",
    "models.cap.vision": "Images", "models.cap.classification": "Classification",
    "models.cap.moderation": "Moderation", "models.cap.embeddings": "Embeddings (search)",
    "models.cap.none": "No generation",
    "models.base": "Built on", "models.job": "Made by fine-tuning job", "models.aliases": "Also answers to",
    "models.created": "Added", "models.temperature": "Default temperature",
    "models.quantization": "Weights", "models.memory": "Memory (weights + KV cache)",
    "models.memory_estimate": "about {size} once loaded",
    "models.description": "Description",
    "models.deprecated": "Deprecated: retires on {date}",
    "models.retired": "Retired since {date}",
    "models.replacement": "Use {model} instead",
    "models.deprecated_help": "This model is being retired. It keeps working until its retirement date; move to the replacement before then.",
    "models.retired_help": "This model's retirement date has passed: requests to it may be refused or served by its replacement.",
    "models.evaluation": "Latest evaluation",
    "models.eval.passed": "Evaluation passed", "models.eval.failed": "Evaluation failed",
    "models.eval.unjudged": "Evaluated (no pass/fail policy)",
    "models.eval.on": "on {date}",
    "models.eval.none": "No evaluation recorded for this model.",
    "models.eval.open": "Open report", "models.eval.download": "Download report",
    "models.eval.opening": "Opening the report…",
    "models.eval.blocked": "The browser blocked the new tab: allow pop-ups for this page, or download the report.",
    "models.eval.reasons": "Why",
    "models.eval.metric": "Measure", "models.eval.value": "Score", "models.eval.interval": "95% range",
    "models.eval.goal": "Goal", "models.eval.goal_met": "met", "models.eval.goal_missed": "missed",
    "models.eval.summary_error": "The evaluation's figures could not be read: {message}",
    "models.none": "This server offers no model.",
  },
  fr: {
    "models.title": "Modèles",
    "models.intro": "Les modèles proposés par ce serveur. Choisissez un modèle de conversation pour l'essayer dans le bac à sable.",
    "models.count": "{n} modèles",
    "models.details": "Détails",
    "models.back": "Tous les modèles",
    "models.playground": "Ouvrir dans le bac à sable",
    "models.kind.chat": "Conversation", "models.kind.completion": "Complétion de texte",
    "models.kind.embedding": "Plongements (embeddings)", "models.kind.moderation": "Modération",
    "models.kind.classifier": "Classifieur",
    "models.type.base": "Modèle de base", "models.type.fine-tuned": "Affiné",
    "models.loaded": "En mémoire", "models.not_loaded": "Chargé à la première utilisation",
    "models.archived": "Archivé",
    "models.context": "Longueur de contexte",
    "models.context_value": "{n} jetons",
    "models.context_hint": "La quantité de texte que le modèle lit d'un coup : la conversation et sa réponse ensemble (un jeton vaut environ ¾ de mot).",
    "models.capabilities": "Sait faire",
    "models.cap.completion_chat": "Conversation", "models.cap.completion_fim": "Complétion de code (remplissage au milieu)",
    "models.cap.function_calling": "Appel de fonctions (outils)", "models.cap.fine_tuning": "Peut être affiné",
    "models.cap.vision": "Images", "models.cap.classification": "Classification",
    "models.cap.moderation": "Modération", "models.cap.embeddings": "Plongements (recherche)",
    "models.cap.none": "Pas de génération",
    "models.base": "Repose sur", "models.job": "Créé par la tâche d'affinage", "models.aliases": "Répond aussi à",
    "models.created": "Ajouté le", "models.temperature": "Température par défaut",
    "models.quantization": "Poids", "models.memory": "Mémoire (poids + cache KV)",
    "models.memory_estimate": "environ {size} une fois chargé",
    "models.description": "Description",
    "models.deprecated": "Obsolète : retiré le {date}",
    "models.retired": "Retiré depuis le {date}",
    "models.replacement": "Utilisez {model} à la place",
    "models.deprecated_help": "Ce modèle va être retiré. Il fonctionne jusqu'à sa date de retrait ; passez au modèle de remplacement d'ici là.",
    "models.retired_help": "La date de retrait de ce modèle est passée : ses requêtes peuvent être refusées ou servies par son remplaçant.",
    "models.evaluation": "Dernière évaluation",
    "models.eval.passed": "Évaluation réussie", "models.eval.failed": "Évaluation échouée",
    "models.eval.unjudged": "Évalué (sans critère de réussite)",
    "models.eval.on": "le {date}",
    "models.eval.none": "Aucune évaluation enregistrée pour ce modèle.",
    "models.eval.open": "Ouvrir le rapport", "models.eval.download": "Télécharger le rapport",
    "models.eval.opening": "Ouverture du rapport…",
    "models.eval.blocked": "Le navigateur a bloqué le nouvel onglet : autorisez les fenêtres surgissantes pour cette page, ou téléchargez le rapport.",
    "models.eval.reasons": "Pourquoi",
    "models.eval.metric": "Mesure", "models.eval.value": "Score", "models.eval.interval": "Intervalle à 95 %",
    "models.eval.goal": "Objectif", "models.eval.goal_met": "atteint", "models.eval.goal_missed": "manqué",
    "models.eval.summary_error": "Les chiffres de l'évaluation n'ont pas pu être lus : {message}",
    "models.none": "Ce serveur ne propose aucun modèle.",
  },
});

const CAPABILITIES = ["completion_chat", "completion_fim", "function_calling", "fine_tuning", "vision",
  "classification", "moderation", "embeddings"];

/** What a card's model is for (the API's `type` is only base | fine-tuned). */
function kind(card) {
  const c = card.capabilities || {};
  if (c.embeddings) return "embedding";
  if (c.moderation) return "moderation";
  if (c.classification) return "classifier";
  if (c.completion_chat) return "chat";
  return "completion";
}

/** A date-only string of an ISO 8601 time (the card's deprecation: a day, given in UTC, so it
 *  is shown in UTC: midnight UTC is still the day before west of Greenwich). */
function day(iso) {
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? String(iso) : d.toLocaleDateString(lang(), { dateStyle: "long", timeZone: "UTC" });
}

const modelHref = (id) => `#/models?${new URLSearchParams({ model: id })}`;
const playgroundHref = (id) => `#/playground?${new URLSearchParams({ model: id })}`;

/** The deprecation warning: date, replacement (a link to its card), what it means. */
function deprecation(card) {
  if (!card.deprecation) return null;
  const past = new Date(card.deprecation).getTime() <= Date.now();
  const text = t(past ? "models.retired" : "models.deprecated", { date: day(card.deprecation) });
  const replacement = card.deprecation_replacement_model;
  return h("div", { class: `model-deprecation ${past ? "error" : "warn"}`, role: "note" },
    h("span", { class: `badge ${past ? "error" : "warn"} model-deprecated`, "data-date": card.deprecation }, `⚠ ${text}`),
    replacement ? h("span", { class: "model-replacement" }, " ",
      ...splitLink(t("models.replacement", { model: "\u0000" }), h("a", { href: modelHref(replacement) }, replacement)))
      : null,
    h("small", { class: "muted model-deprecation-help" }, t(past ? "models.retired_help" : "models.deprecated_help")));
}

/** A translated sentence with one element in place of the \0 placeholder. */
function splitLink(text, el) {
  const [before, after] = text.split("\u0000");
  return [before, el, after ?? ""];
}

/** The weights' format as served: int8 / int4 (--quantization) or the dtype when unquantized. */
function formatText(card) {
  const q = card.quantization && card.quantization !== "none" ? card.quantization : null;
  return [q, card.dtype && card.dtype !== "auto" ? card.dtype : null].filter(Boolean).join(" · ") || null;
}

/** The facts of a card as <dl> rows; full adds the less common ones (detail view). */
function facts(card, full) {
  const rows = [];
  const row = (label, ...value) => rows.push(h("dt", {}, label), h("dd", {}, ...value));
  row(t("models.context"), h("span", { class: "model-context", "data-value": card.max_context_length },
    t("models.context_value", { n: num(card.max_context_length) })),
  full ? h("small", { class: "muted block" }, t("models.context_hint")) : null);
  const caps = CAPABILITIES.filter((c) => card.capabilities && card.capabilities[c]);
  row(t("models.capabilities"), h("span", { class: "model-capabilities row" },
    caps.length ? caps.map((c) => h("span", { class: "badge", "data-capability": c }, t(`models.cap.${c}`)))
      : h("span", { class: "muted" }, t("models.cap.none"))));
  if (card.root) row(t("models.base"), h("a", { href: modelHref(card.root) }, card.root));
  const format = formatText(card);
  if (format) row(t("models.quantization"), h("span", { class: "model-format" }, format));
  if (typeof card.memory_bytes === "number") {
    row(t("models.memory"), h("span", { class: "model-memory", "data-value": card.memory_bytes },
      card.loaded ? bytes(card.memory_bytes) : t("models.memory_estimate", { size: bytes(card.memory_bytes) })));
  }
  if (full) {
    if (card.job) row(t("models.job"), h("code", {}, card.job));
    if (card.aliases && card.aliases.length) row(t("models.aliases"), card.aliases.join(", "));
    if (card.default_model_temperature !== null && card.default_model_temperature !== undefined) {
      row(t("models.temperature"), num(card.default_model_temperature, 2));
    }
    if (card.created) row(t("models.created"), date(card.created));
    if (card.description) row(t("models.description"), card.description);
  }
  return h("dl", { class: "model-facts" }, rows);
}

/** The report's HTML, fetched with the API key (the route needs it: a plain link cannot). */
async function fetchReport(url) {
  if (!/^\/v1\//.test(url)) throw new Error(url); // only this server's API
  const resp = await api.request("GET", url, { raw: true });
  return resp.text();
}

/** Save the report as a file (the HTML as the server sent it). */
async function downloadReport(url, runId) {
  const href = URL.createObjectURL(new Blob([await fetchReport(url)], { type: "text/html" }));
  const a = h("a", { href, download: `evaluation-${runId}.html`, hidden: true });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(href), 60_000);
}

/**
 * Show the report in a new tab. A tab this page opens (blob: or about:blank) inherits the
 * console's Content-Security-Policy, which blocks the report's inline <style>; so the report is
 * parsed here (DOMParser: inert, nothing runs), stripped of anything active (scripts, frames,
 * event attributes), put into the tab, and its styles are applied through the CSSOM (a
 * constructed stylesheet and element.style), which the policy allows. `win` is opened by the
 * click itself, before the fetch, so that pop-up blockers let it through.
 */
async function openReport(url, win) {
  // the <style> blocks are cut out of the text first: DOMParser's document inherits this page's
  // policy too, and would report each one as a violation. (A <style> element's content is
  // raw text up to the first "</style", which is exactly what the pattern takes.)
  const css = [];
  const html = (await fetchReport(url)).replace(/<style\b[^>]*>([\s\S]*?)<\/style\s*>/gi, (m, text) => {
    css.push(text);
    return "";
  });
  const doc = new DOMParser().parseFromString(html, "text/html");
  doc.querySelectorAll("script, style, link, iframe, frame, object, embed, base, meta, form").forEach((el) => el.remove());
  const inline = [];
  for (const el of doc.querySelectorAll("*")) {
    for (const a of [...el.attributes]) {
      if (/^on/i.test(a.name) || /^\s*javascript:/i.test(a.value)) el.removeAttribute(a.name);
    }
    if (el.hasAttribute("style")) {
      el.dataset.reportStyle = String(inline.length);
      inline.push(el.getAttribute("style"));
      el.removeAttribute("style");
    }
  }
  const target = win.document;
  target.replaceChild(target.importNode(doc.documentElement, true), target.documentElement);
  target.title = doc.title || target.title;
  const sheet = new win.CSSStyleSheet();
  sheet.replaceSync(css.join("\n"));
  target.adoptedStyleSheets = [sheet];
  for (const el of target.querySelectorAll("[data-report-style]")) {
    el.style.cssText = inline[Number(el.dataset.reportStyle)];
    el.removeAttribute("data-report-style");
  }
}

function evaluation(card) {
  const ev = card.evaluation;
  if (!ev) return null;
  const state = ev.passed === true ? "passed" : ev.passed === false ? "failed" : "unjudged";
  const cls = state === "passed" ? "ok" : state === "failed" ? "error" : "";
  const open = async (e) => {
    const btn = e.currentTarget;
    const win = window.open("", "_blank");
    if (!win) { toast(t("models.eval.blocked"), "error"); return; }
    win.document.title = t("models.eval.opening");
    win.document.body.textContent = t("models.eval.opening");
    btn.disabled = true;
    try {
      await openReport(ev.report_url, win);
    } catch (err) {
      win.close();
      toast(errorText(err), "error");
    } finally {
      btn.disabled = false;
    }
  };
  const download = async (e) => {
    const btn = e.currentTarget;
    btn.disabled = true;
    try { await downloadReport(ev.report_url, ev.latest_run_id); } catch (err) { toast(errorText(err), "error"); }
    finally { btn.disabled = false; }
  };
  return h("div", { class: "model-evaluation", "data-passed": String(ev.passed), "data-run": ev.latest_run_id },
    h("div", { class: "row" },
      h("span", { class: "muted" }, `${t("models.evaluation")}:`),
      h("span", { class: `badge ${cls} model-eval-verdict` },
        `${state === "passed" ? "✓" : state === "failed" ? "✗" : "•"} ${t(`models.eval.${state}`)}`),
      ev.created_at ? h("span", { class: "muted" }, t("models.eval.on", { date: date(ev.created_at) })) : null),
    h("div", { class: "row" },
      h("button", { type: "button", class: "secondary small model-report-open", onclick: open }, t("models.eval.open")),
      h("button", { type: "button", class: "secondary small model-report-download", onclick: download }, t("models.eval.download"))));
}

/** One card: title and badges, warnings, facts, evaluation, actions. */
function cardView(card, full) {
  const k = kind(card);
  // the detail view's page title is the id (h1); the list's cards link to it
  const title = full ? null : h("h2", { class: "model-id" }, h("a", { href: modelHref(card.id) }, card.id));
  return h("article", { class: "panel model-card", "data-model": card.id, "data-kind": k },
    h("div", { class: "model-head" }, title,
      h("div", { class: "row model-badges" },
        h("span", { class: "badge model-kind" }, t(`models.kind.${k}`)),
        h("span", { class: "badge model-type" }, t(`models.type.${card.type || "base"}`)),
        h("span", { class: `badge ${card.loaded ? "ok" : ""} model-loaded` }, t(card.loaded ? "models.loaded" : "models.not_loaded")),
        card.archived ? h("span", { class: "badge warn" }, t("models.archived")) : null)),
    !full && card.name && card.name !== card.id ? h("p", { class: "muted" }, card.name) : null,
    deprecation(card),
    facts(card, full),
    evaluation(card),
    h("div", { class: "row model-actions" },
      card.capabilities && card.capabilities.completion_chat
        ? h("a", { class: "button model-playground", href: playgroundHref(card.id) }, t("models.playground")) : null,
      full ? null : h("a", { class: "model-details", href: modelHref(card.id) }, t("models.details"))));
}

/** The latest evaluation's verdict and figures (GET /v1/observability/evaluation-runs_v2/{id}). */
async function evaluationSummary(card, box, signal) {
  const ev = card.evaluation;
  if (!ev) { fill(box, h("p", { class: "muted" }, t("models.eval.none"))); return; }
  fill(box, h("p", { class: "muted" }, t("common.loading")));
  let run;
  try {
    run = await api.get(`/v1/observability/evaluation-runs_v2/${encodeURIComponent(ev.latest_run_id)}`, { signal });
  } catch (err) {
    if (err.name === "AbortError") return;
    fill(box, h("p", { class: "error", role: "alert" }, t("models.eval.summary_error", { message: errorText(err) })));
    return;
  }
  const verdict = (run.metadata && run.metadata.verdict) || null;
  const goals = run.goal_results || {};
  const rows = Object.entries(run.statistics || {}).map(([name, s]) => {
    const v = Object.fromEntries((s.values || []).map((x) => [x.id, x.value]));
    const goal = goals[name];
    return h("tr", {},
      h("td", { "data-label": t("models.eval.metric") }, name),
      h("td", { "data-label": t("models.eval.value") }, s.avg === null || s.avg === undefined ? "—" : num(s.avg, 3)),
      h("td", { "data-label": t("models.eval.interval") },
        v.ci95_low !== undefined && v.ci95_low !== null ? `${num(v.ci95_low, 3)} – ${num(v.ci95_high, 3)}` : "—"),
      h("td", { "data-label": t("models.eval.goal") }, goal && goal.results && goal.results[0]
        ? h("span", { class: goal.passed ? "ok" : "error" },
          `${goal.results[0].operator} ${num(goal.results[0].target, 3)} · ${t(goal.passed ? "models.eval.goal_met" : "models.eval.goal_missed")}`)
        : "—"));
  });
  fill(box,
    verdict && verdict.reasons && verdict.reasons.length
      ? h("div", {}, h("strong", {}, `${t("models.eval.reasons")}:`), h("ul", { class: "model-eval-reasons" },
        verdict.reasons.map((r) => h("li", {}, r)))) : null,
    rows.length ? h("div", { class: "table-wrap" }, h("table", { class: "model-eval-table" },
      h("thead", {}, h("tr", {}, ["models.eval.metric", "models.eval.value", "models.eval.interval", "models.eval.goal"]
        .map((k) => h("th", { scope: "col" }, t(k))))),
      h("tbody", {}, rows))) : null);
}

async function renderOne(root, ctx, id, signal) {
  const back = h("p", {}, h("a", { href: "#/models", class: "model-back" }, `← ${t("models.back")}`));
  let card;
  try {
    card = await api.get(`/v1/models/${encodeURIComponent(id)}`, { signal });
  } catch (err) {
    if (err.name === "AbortError") return;
    fill(root, back, h("h1", {}, id), errorBox(err));
    return;
  }
  const summary = h("div", { class: "model-eval-summary" });
  fill(root, back, h("h1", { class: "model-id" }, card.id), cardView(card, true),
    card.evaluation ? h("section", { class: "panel" }, h("h2", {}, t("models.evaluation")), summary) : null);
  if (card.evaluation) await evaluationSummary(card, summary, signal);
}

async function renderList(root, ctx, signal) {
  const list = h("div", { class: "grid model-list" }, h("p", { class: "muted" }, t("common.loading")));
  const count = h("span", { class: "muted model-count" });
  const refresh = h("button", { type: "button", class: "secondary", onclick: () => load() }, t("common.refresh"));
  fill(root,
    h("div", { class: "row model-title" }, h("h1", {}, t("models.title")), count, h("span", { class: "grow" }), refresh),
    h("p", { class: "muted" }, t("models.intro")),
    list);
  async function load() {
    refresh.disabled = true;
    try {
      const models = await api.get("/v1/models", { signal });
      const cards = models.data || [];
      count.textContent = t("models.count", { n: cards.length });
      fill(list, cards.length ? cards.map((c) => cardView(c, false)) : h("p", { class: "muted" }, t("models.none")));
    } catch (err) {
      if (err.name !== "AbortError") fill(list, errorBox(err));
    } finally {
      refresh.disabled = false;
    }
  }
  await load();
}

export async function render(root, ctx) {
  const ctrl = new AbortController();
  const id = ctx.params.get("model");
  // not awaited: the page can be left (dispose) while it loads
  if (id) renderOne(root, ctx, id, ctrl.signal);
  else renderList(root, ctx, ctrl.signal);
  return () => ctrl.abort();
}
