// Playground: chat with a served model. The answer streams in token by token (POST
// /v1/chat/completions with stream: true), with the time to the first token and the speed
// shown as it arrives; Stop aborts it. The settings on the left are the request's fields
// (temperature, top_p, max_tokens, random_seed, JSON mode / JSON schema, tools, safe_prompt,
// guardrails), and "Show code" writes the very same request as curl, Python (mistralai SDK) and
// JavaScript (fetch). Everything goes through the public API with the tab's key.
//
// The conversation and the settings live in this module (not in the DOM), so they survive a
// language switch or a visit to another page; a stream in flight is aborted by dispose().

import * as api from "../api.js";
import { add, num, t } from "../i18n.js";
import { errorText, field, fill, h, toast } from "../ui.js";

const CHAT = "/v1/chat/completions";
const DEFAULT_SCHEMA = JSON.stringify({
  type: "object",
  properties: { name: { type: "string" }, age: { type: "integer" } },
  required: ["name", "age"],
  additionalProperties: false,
}, null, 2);
const DEFAULT_TOOLS = JSON.stringify([{
  type: "function",
  function: {
    name: "get_weather",
    description: "The current weather in a city",
    parameters: {
      type: "object",
      properties: { city: { type: "string", description: "The city, e.g. Paris" } },
      required: ["city"],
    },
  },
}], null, 2);

// What the user chose, kept between renders. messages: the conversation, each
// {role: "user"|"assistant"|"tool", content, tool_calls?, tool_call_id?, name?} plus, for
// answers, the client's timings {t0, tFirst, tEnd, chunks, usage, finish, status, guardrails}.
const state = {
  model: "", tempTouched: false, system: "", temperature: 0.7, topP: 1, maxTokens: "512",
  seed: "", safePrompt: false, guardrails: false,
  format: "text", schemaName: "answer", schemaStrict: true, schemaText: DEFAULT_SCHEMA,
  toolsOn: false, toolsText: DEFAULT_TOOLS, toolChoice: "auto",
  messages: [], draft: "", toolResults: {},
  codeOpen: false, codeTab: "curl", codeStream: false,
};

add({
  en: {
    "playground.title": "Playground",
    "playground.intro": "Talk with a model served here. Answers appear as they are written; everything stays on this server.",
    "playground.settings": "Settings",
    "playground.model": "Model",
    "playground.model_missing": "The model “{model}” is not served here (or your key cannot use it); pick another one.",
    "playground.no_models": "No chat model here is open to your API key (an administrator can add models to the key).",
    "playground.deprecated": "This model is deprecated{date}.{replacement}",
    "playground.deprecated_date": " and will be withdrawn on {date}",
    "playground.deprecated_use": " Use {model} instead.",
    "playground.finetuned": "fine-tuned",
    "playground.system": "System prompt",
    "playground.system_hint": "Instructions the model follows for the whole conversation (optional).",
    "playground.system_placeholder": "e.g. Answer briefly, in French.",
    "playground.temperature": "Temperature",
    "playground.temperature_hint": "0 gives the same answer every time; higher is more varied.",
    "playground.top_p": "Top p",
    "playground.top_p_hint": "Only the most likely words that add up to this probability are considered.",
    "playground.max_tokens": "Max tokens",
    "playground.max_tokens_hint": "The longest answer, in tokens (about ¾ of a word each). Empty: no limit.",
    "playground.no_limit": "no limit",
    "playground.seed": "Random seed",
    "playground.seed_hint": "The same seed and settings give the same answer. Empty: random.",
    "playground.random": "random",
    "playground.safe_prompt": "Safety prompt",
    "playground.safe_prompt_hint": "Adds Mistral's safety instructions before the conversation (safe_prompt).",
    "playground.guardrails": "Guardrails",
    "playground.guardrails_hint": "The server's moderation model checks the question and the answer; blocked content is refused (guardrails).",
    "playground.guardrails_none": "This server has no moderation model, so guardrails are not available.",
    "playground.format": "Answer format",
    "playground.format_text": "Text",
    "playground.format_json": "JSON (any object)",
    "playground.format_schema": "JSON following a schema",
    "playground.schema_name": "Schema name",
    "playground.schema": "JSON schema",
    "playground.schema_strict": "Strict (the answer must match the schema)",
    "playground.tools": "Tools (function calling)",
    "playground.tools_on": "Let the model call these tools",
    "playground.tools_hint": "A list of functions, in La Plateforme's format. The model answers with the call; you then give the result.",
    "playground.tool_choice": "Tool choice",
    "playground.choice_auto": "auto: the model decides",
    "playground.choice_none": "none: never call a tool",
    "playground.choice_any": "any: always call a tool",
    "playground.choice_required": "required: always call a tool",
    "playground.choice_function": "always call {name}",
    "playground.invalid_json": "Not valid JSON: {message}",
    "playground.invalid_schema": "The JSON schema must be an object.",
    "playground.invalid_tools": "The tools must be a list ([...]).",
    "playground.invalid_number": "{field}: enter a number between {min} and {max}.",
    "playground.fix_first": "Fix the settings first: {problems}",
    "playground.conversation": "Conversation",
    "playground.empty": "Write a message below to start.",
    "playground.input": "Your message",
    "playground.input_placeholder": "Ask something… (Enter to send, Shift+Enter for a new line)",
    "playground.send": "Send",
    "playground.stop": "Stop",
    "playground.new": "New chat",
    "playground.you": "You",
    "playground.assistant": "Model",
    "playground.tool": "Tool result ({name})",
    "playground.system_msg": "System",
    "playground.waiting": "Waiting for the first token… {seconds} s",
    "playground.ttft": "First token after {seconds} s",
    "playground.tps": "{rate} tokens/s",
    "playground.tokens": "{count} tokens",
    "playground.approx_tokens": "≈ {count} tokens",
    "playground.total": "{seconds} s in all",
    "playground.finish.stop": "finished",
    "playground.finish.length": "stopped at the max tokens",
    "playground.finish.model_length": "stopped: the context is full",
    "playground.finish.tool_calls": "asks for a tool",
    "playground.finish.content_filter": "blocked by the guardrails",
    "playground.finish.error": "ended by an error",
    "playground.stopped": "stopped by you",
    "playground.streaming": "writing…",
    "playground.json_ok": "valid JSON",
    "playground.json_bad": "not valid JSON: {message}",
    "playground.guard_ok": "guardrails: nothing flagged",
    "playground.guard_flagged": "guardrails flagged: {categories}",
    "playground.guard_blocked": "The guardrails blocked this: {message}",
    "playground.tool_call": "Calls {name}",
    "playground.tool_result": "Result of {name}",
    "playground.tool_result_placeholder": "What the tool returned, e.g. {\"temperature\": 18}",
    "playground.send_results": "Send the results",
    "playground.show_code": "Show code",
    "playground.hide_code": "Hide code",
    "playground.code_help": "The same request, to run outside the console. Set MISTRAL_API_KEY to your key first.",
    "playground.code_stream": "Stream the answer",
    "playground.copy": "Copy",
    "playground.copied": "Copied.",
    "playground.copy_failed": "Could not copy: select the text instead.",
  },
  fr: {
    "playground.title": "Bac à sable",
    "playground.intro": "Discutez avec un modèle servi ici. Les réponses s'affichent au fur et à mesure ; tout reste sur ce serveur.",
    "playground.settings": "Réglages",
    "playground.model": "Modèle",
    "playground.model_missing": "Le modèle « {model} » n'est pas servi ici (ou votre clé ne peut pas l'utiliser) ; choisissez-en un autre.",
    "playground.no_models": "Aucun modèle de conversation d'ici n'est ouvert à votre clé d'API (un administrateur peut en ajouter à la clé).",
    "playground.deprecated": "Ce modèle est obsolète{date}.{replacement}",
    "playground.deprecated_date": " et sera retiré le {date}",
    "playground.deprecated_use": " Utilisez plutôt {model}.",
    "playground.finetuned": "affiné",
    "playground.system": "Prompt système",
    "playground.system_hint": "Des consignes que le modèle suit pendant toute la conversation (facultatif).",
    "playground.system_placeholder": "p. ex. Réponds brièvement, en français.",
    "playground.temperature": "Température",
    "playground.temperature_hint": "0 donne toujours la même réponse ; plus haut, des réponses plus variées.",
    "playground.top_p": "Top p",
    "playground.top_p_hint": "Seuls les mots les plus probables, jusqu'à cette probabilité cumulée, sont envisagés.",
    "playground.max_tokens": "Tokens max",
    "playground.max_tokens_hint": "La réponse la plus longue, en tokens (environ ¾ de mot chacun). Vide : sans limite.",
    "playground.no_limit": "sans limite",
    "playground.seed": "Graine aléatoire",
    "playground.seed_hint": "Même graine et mêmes réglages : même réponse. Vide : aléatoire.",
    "playground.random": "aléatoire",
    "playground.safe_prompt": "Prompt de sécurité",
    "playground.safe_prompt_hint": "Ajoute les consignes de sécurité de Mistral avant la conversation (safe_prompt).",
    "playground.guardrails": "Garde-fous",
    "playground.guardrails_hint": "Le modèle de modération du serveur vérifie la question et la réponse ; un contenu bloqué est refusé (guardrails).",
    "playground.guardrails_none": "Ce serveur n'a pas de modèle de modération : les garde-fous ne sont pas disponibles.",
    "playground.format": "Format de la réponse",
    "playground.format_text": "Texte",
    "playground.format_json": "JSON (un objet quelconque)",
    "playground.format_schema": "JSON selon un schéma",
    "playground.schema_name": "Nom du schéma",
    "playground.schema": "Schéma JSON",
    "playground.schema_strict": "Strict (la réponse doit respecter le schéma)",
    "playground.tools": "Outils (appel de fonctions)",
    "playground.tools_on": "Permettre au modèle d'appeler ces outils",
    "playground.tools_hint": "Une liste de fonctions, au format de La Plateforme. Le modèle répond par l'appel ; vous donnez ensuite le résultat.",
    "playground.tool_choice": "Choix de l'outil",
    "playground.choice_auto": "auto : le modèle décide",
    "playground.choice_none": "none : jamais d'outil",
    "playground.choice_any": "any : toujours un outil",
    "playground.choice_required": "required : toujours un outil",
    "playground.choice_function": "toujours appeler {name}",
    "playground.invalid_json": "JSON invalide : {message}",
    "playground.invalid_schema": "Le schéma JSON doit être un objet.",
    "playground.invalid_tools": "Les outils doivent être une liste ([...]).",
    "playground.invalid_number": "{field} : saisissez un nombre entre {min} et {max}.",
    "playground.fix_first": "Corrigez d'abord les réglages : {problems}",
    "playground.conversation": "Conversation",
    "playground.empty": "Écrivez un message ci-dessous pour commencer.",
    "playground.input": "Votre message",
    "playground.input_placeholder": "Posez une question… (Entrée pour envoyer, Maj+Entrée pour aller à la ligne)",
    "playground.send": "Envoyer",
    "playground.stop": "Arrêter",
    "playground.new": "Nouvelle conversation",
    "playground.you": "Vous",
    "playground.assistant": "Modèle",
    "playground.tool": "Résultat d'outil ({name})",
    "playground.system_msg": "Système",
    "playground.waiting": "En attente du premier token… {seconds} s",
    "playground.ttft": "Premier token après {seconds} s",
    "playground.tps": "{rate} tokens/s",
    "playground.tokens": "{count} tokens",
    "playground.approx_tokens": "≈ {count} tokens",
    "playground.total": "{seconds} s en tout",
    "playground.finish.stop": "terminé",
    "playground.finish.length": "arrêté au maximum de tokens",
    "playground.finish.model_length": "arrêté : le contexte est plein",
    "playground.finish.tool_calls": "demande un outil",
    "playground.finish.content_filter": "bloqué par les garde-fous",
    "playground.finish.error": "interrompu par une erreur",
    "playground.stopped": "arrêté par vous",
    "playground.streaming": "en cours d'écriture…",
    "playground.json_ok": "JSON valide",
    "playground.json_bad": "JSON invalide : {message}",
    "playground.guard_ok": "garde-fous : rien de signalé",
    "playground.guard_flagged": "garde-fous, signalé : {categories}",
    "playground.guard_blocked": "Les garde-fous ont bloqué ceci : {message}",
    "playground.tool_call": "Appelle {name}",
    "playground.tool_result": "Résultat de {name}",
    "playground.tool_result_placeholder": "Ce que l'outil a renvoyé, p. ex. {\"temperature\": 18}",
    "playground.send_results": "Envoyer les résultats",
    "playground.show_code": "Voir le code",
    "playground.hide_code": "Masquer le code",
    "playground.code_help": "La même requête, à lancer hors de la console. Mettez d'abord votre clé dans MISTRAL_API_KEY.",
    "playground.code_stream": "Réponse en flux",
    "playground.copy": "Copier",
    "playground.copied": "Copié.",
    "playground.copy_failed": "Copie impossible : sélectionnez le texte.",
  },
});

// -- the request ------------------------------------------------------------------------------

/** Parse JSON text: {value} or {error: message}. */
function parseJson(text) {
  try { return { value: JSON.parse(text) }; } catch (e) { return { error: e.message }; }
}

/** A number field's value: {value} (null when empty and allowed) or {error}. */
function numberOf(raw, { label, min, max, integer, optional }) {
  const s = String(raw ?? "").trim();
  if (s === "" && optional) return { value: null };
  const x = Number(s);
  if (s === "" || !Number.isFinite(x) || x < min || x > max || (integer && !Number.isInteger(x))) {
    return { error: t("playground.invalid_number", { field: label, min: num(min), max: num(max) }) };
  }
  return { value: x };
}

/** The settings' problems keyed by field (invalid JSON, numbers out of range). */
function problems() {
  const out = {};
  const checks = {
    temperature: numberOf(state.temperature, { label: t("playground.temperature"), min: 0, max: 2 }),
    topP: numberOf(state.topP, { label: t("playground.top_p"), min: 0.01, max: 1 }),
    maxTokens: numberOf(state.maxTokens, { label: t("playground.max_tokens"), min: 1, max: 2 ** 31 - 1, integer: true, optional: true }),
    seed: numberOf(state.seed, { label: t("playground.seed"), min: 0, max: Number.MAX_SAFE_INTEGER, integer: true, optional: true }),
  };
  for (const [k, r] of Object.entries(checks)) if (r.error) out[k] = r.error;
  if (state.format === "json_schema") {
    const r = parseJson(state.schemaText);
    if (r.error) out.schema = t("playground.invalid_json", { message: r.error });
    else if (!r.value || typeof r.value !== "object" || Array.isArray(r.value)) out.schema = t("playground.invalid_schema");
  }
  if (state.toolsOn) {
    const r = parseJson(state.toolsText);
    if (r.error) out.tools = t("playground.invalid_json", { message: r.error });
    else if (!Array.isArray(r.value)) out.tools = t("playground.invalid_tools");
  }
  return out;
}

/** A message of the conversation as the API takes it. */
function apiMessage(m) {
  if (m.role === "tool") return { role: "tool", name: m.name, tool_call_id: m.tool_call_id, content: m.content };
  if (m.role === "assistant") {
    const out = { role: "assistant", content: m.content || "" };
    if (m.tool_calls && m.tool_calls.length) {
      out.tool_calls = m.tool_calls.map((c) => ({ id: c.id, type: "function",
        function: { name: c.function.name, arguments: c.function.arguments } }));
    }
    return out;
  }
  return { role: m.role, content: m.content };
}

/** The request body from the settings and the conversation `history` (plus `extra` messages,
 *  e.g. the message being typed). Assumes problems() is empty. */
function requestBody(history = state.messages, extra = []) {
  const messages = [];
  if (state.system.trim()) messages.push({ role: "system", content: state.system });
  for (const m of history) {
    // an answer stopped before its first token carries nothing
    if (m.role === "assistant" && !m.content && !(m.tool_calls && m.tool_calls.length)) continue;
    messages.push(apiMessage(m));
  }
  messages.push(...extra);
  const body = { model: state.model, messages, temperature: Number(state.temperature), top_p: Number(state.topP) };
  if (String(state.maxTokens).trim()) body.max_tokens = Number(state.maxTokens);
  if (String(state.seed).trim()) body.random_seed = Number(state.seed);
  if (state.format === "json_object") body.response_format = { type: "json_object" };
  if (state.format === "json_schema") {
    body.response_format = { type: "json_schema", json_schema: {
      name: state.schemaName.trim() || "answer", schema: JSON.parse(state.schemaText), strict: state.schemaStrict } };
  }
  if (state.toolsOn) {
    body.tools = JSON.parse(state.toolsText);
    body.tool_choice = state.toolChoice.startsWith("function:")
      ? { type: "function", function: { name: state.toolChoice.slice(9) } } : state.toolChoice;
  }
  if (state.safePrompt) body.safe_prompt = true;
  // the server's moderation model; action "block": a flagged question or answer is refused
  if (state.guardrails) body.guardrails = [{ moderation_llm_v2: { action: "block" } }];
  return body;
}

// -- "Show code" ------------------------------------------------------------------------------

/** A JSON value as a Python literal (indented like json.dumps(indent=4)). */
function py(v, depth = 0) {
  const pad = "    ".repeat(depth + 1);
  const end = "    ".repeat(depth);
  if (v === null || v === undefined) return "None";
  if (v === true) return "True";
  if (v === false) return "False";
  if (typeof v === "number") return String(v);
  if (typeof v === "string") return JSON.stringify(v);
  if (Array.isArray(v)) {
    if (!v.length) return "[]";
    return `[\n${v.map((x) => `${pad}${py(x, depth + 1)},`).join("\n")}\n${end}]`;
  }
  const keys = Object.keys(v);
  if (!keys.length) return "{}";
  return `{\n${keys.map((k) => `${pad}${JSON.stringify(k)}: ${py(v[k], depth + 1)},`).join("\n")}\n${end}}`;
}

function indentLines(text, prefix) {
  return text.split("\n").map((l, i) => (i ? prefix + l : l)).join("\n");
}

/** The request as curl, Python or JavaScript; the key is always $MISTRAL_API_KEY. */
function codeFor(tab, body, stream) {
  const base = location.origin;
  const req = stream ? { ...body, stream: true } : body;
  if (tab === "curl") {
    return [
      `curl${stream ? " -N" : ""} ${base}${CHAT} \\`,
      "  -H \"Authorization: Bearer $MISTRAL_API_KEY\" \\",
      "  -H \"Content-Type: application/json\" \\",
      "  --data-binary @- <<'JSON_BODY'",
      JSON.stringify(req, null, 2),
      "JSON_BODY",
    ].join("\n");
  }
  if (tab === "python") {
    const args = Object.entries(body).map(([k, v]) => `    ${k}=${indentLines(py(v, 1), "")},`).join("\n");
    const lines = [
      "import os",
      "",
      "from mistralai.client import Mistral  # mistralai 3.x (1.x: from mistralai import Mistral)",
      "",
      `client = Mistral(api_key=os.environ["MISTRAL_API_KEY"], server_url=${JSON.stringify(base)})`,
      "",
    ];
    if (stream) {
      lines.push("stream = client.chat.stream(", args, ")", "for event in stream:",
        "    delta = event.data.choices[0].delta",
        "    if delta.content:", "        print(delta.content, end=\"\", flush=True)",
        "    if delta.tool_calls:", "        print(delta.tool_calls)", "print()");
    } else {
      lines.push("response = client.chat.complete(", args, ")",
        "message = response.choices[0].message", "print(message.content)",
        "if message.tool_calls:", "    print(message.tool_calls)");
    }
    return lines.join("\n");
  }
  // JavaScript (browser or Node 18+)
  const common = [
    `const response = await fetch(${JSON.stringify(base + CHAT)}, {`,
    "  method: \"POST\",",
    "  headers: {",
    "    \"Authorization\": `Bearer ${process.env.MISTRAL_API_KEY}`,",
    "    \"Content-Type\": \"application/json\",",
    "  },",
    `  body: JSON.stringify(${indentLines(JSON.stringify(req, null, 2), "  ")}),`,
    "});",
    "if (!response.ok) throw new Error(`${response.status}: ${await response.text()}`);",
  ];
  if (stream) {
    common.push(
      "// server-sent events: \"data: {json}\" blocks, the last one \"data: [DONE]\"",
      "const reader = response.body.getReader();",
      "const decoder = new TextDecoder();",
      "let buffer = \"\";",
      "for (;;) {",
      "  const { value, done } = await reader.read();",
      "  if (done) break;",
      "  buffer += decoder.decode(value, { stream: true });",
      "  let cut;",
      "  while ((cut = buffer.indexOf(\"\\n\\n\")) >= 0) {",
      "    const data = buffer.slice(0, cut).replace(/^data: /, \"\");",
      "    buffer = buffer.slice(cut + 2);",
      "    if (data === \"[DONE]\") break;",
      "    const delta = JSON.parse(data).choices[0].delta;",
      "    if (delta.content) process.stdout.write(delta.content);",
      "    if (delta.tool_calls) console.log(delta.tool_calls);",
      "  }",
      "}");
  } else {
    common.push("const data = await response.json();",
      "console.log(data.choices[0].message.content);",
      "if (data.choices[0].message.tool_calls) console.log(data.choices[0].message.tool_calls);");
  }
  return common.join("\n");
}

// -- answers ----------------------------------------------------------------------------------

function seconds(ms) { return num(ms / 1000, ms < 10000 ? 2 : 1); }

/** An answer's timings: {ttft (ms), tps, tokens, exact} from the client's clock and, once the
 *  last chunk came, the server's usage. tokens/s: the tokens after the first one over the time
 *  since the first one (the decoding speed; the wait for the first token is the TTFT). */
function timings(m, now) {
  if (m.tFirst == null) return null;
  const exact = Boolean(m.usage);
  const tokens = exact ? m.usage.completion_tokens : m.chunks;
  const span = ((m.tEnd ?? now) - m.tFirst) / 1000;
  const tps = tokens > 1 && span > 0 ? (tokens - 1) / span : null;
  return { ttft: m.tFirst - m.t0, tps, tokens, exact, total: (m.tEnd ?? now) - m.t0 };
}

/** The flagged categories of a guardrails report ({results: {stage: {rule: {violations}}}} or
 *  a block's {results: {rule: ...}}). */
function flagged(report) {
  const out = new Set();
  const walk = (node) => {
    if (!node || typeof node !== "object") return;
    if (node.violations) { for (const [c, v] of Object.entries(node.violations)) if (v) out.add(c); return; }
    for (const v of Object.values(node)) walk(v);
  };
  walk(report);
  return [...out];
}

function statsLine(m, now = performance.now()) {
  const parts = [];
  const tm = timings(m, now);
  if (m.status === "streaming" && !tm) parts.push(t("playground.waiting", { seconds: num((now - m.t0) / 1000, 1) }));
  if (tm) {
    parts.push(t("playground.ttft", { seconds: seconds(tm.ttft) }));
    if (tm.tps != null) parts.push(t("playground.tps", { rate: num(tm.tps, 1) }));
    parts.push(t(tm.exact ? "playground.tokens" : "playground.approx_tokens", { count: num(tm.tokens) }));
    if (m.status !== "streaming") parts.push(t("playground.total", { seconds: seconds(tm.total) }));
  }
  if (m.status === "streaming" && tm) parts.push(t("playground.streaming"));
  if (m.status === "stopped") parts.push(t("playground.stopped"));
  else if (m.finish) parts.push(t(`playground.finish.${m.finish}`));
  if (m.guardrails && m.finish !== "content_filter") {
    const cats = flagged(m.guardrails);
    parts.push(cats.length ? t("playground.guard_flagged", { categories: cats.join(", ") }) : t("playground.guard_ok"));
  }
  return parts.join(" · ");
}

/** Arguments of a tool call, pretty-printed when they are JSON. */
function prettyArgs(args) {
  if (typeof args !== "string") return JSON.stringify(args, null, 2);
  const r = parseJson(args);
  return r.error ? args : JSON.stringify(r.value, null, 2);
}

// -- the page ---------------------------------------------------------------------------------

export async function render(root, ctx) {
  let controller = null; // the stream in flight
  let ticker = null; // redraws the "waiting" line while no token came yet
  const views = new Map(); // answer message -> its DOM parts

  root.append(h("h1", {}, t("playground.title")), h("p", { class: "muted" }, t("playground.intro")));
  const loading = h("p", { class: "muted" }, t("common.loading"));
  root.append(loading);

  let cards;
  try {
    cards = (await api.get("/v1/models")).data || [];
  } catch (err) {
    loading.replaceWith(h("p", { class: "error", role: "alert", id: "pg-error" }, errorText(err)));
    return null;
  }
  loading.remove();
  const chatModels = cards.filter((c) => c.capabilities && c.capabilities.completion_chat);
  const moderation = cards.some((c) => c.capabilities && c.capabilities.moderation);
  const wanted = ctx.params.get("model");
  if (!chatModels.length) {
    root.append(h("p", { class: "warn", id: "pg-error" }, t("playground.no_models")),
      wanted ? h("p", { class: "warn", id: "pg-model-warning" }, t("playground.model_missing", { model: wanted })) : null);
    return null;
  }
  let missing = null;
  if (wanted) {
    if (chatModels.some((c) => c.id === wanted)) state.model = wanted;
    else missing = wanted;
  }
  if (!chatModels.some((c) => c.id === state.model)) {
    state.model = chatModels[0].id;
    state.tempTouched = false;
  }
  const card = () => chatModels.find((c) => c.id === state.model);
  if (!state.tempTouched) state.temperature = card().default_model_temperature ?? 0.7;
  if (!moderation) state.guardrails = false;

  // ---- settings (left) ----
  const errs = {}; // field -> <small class="error"> under it
  const errEl = (key) => (errs[key] = h("small", { class: "error", hidden: true, id: `pg-${key}-error` }));
  const modelWarn = h("p", { class: "warn", id: "pg-model-warning", hidden: !missing }, missing ? t("playground.model_missing", { model: missing }) : "");
  const deprecation = h("p", { class: "warn", id: "pg-deprecation", hidden: true });

  const modelSel = h("select", { id: "pg-model", onchange: () => {
    state.model = modelSel.value;
    if (!state.tempTouched) { state.temperature = card().default_model_temperature ?? 0.7; syncTemp(); }
    modelWarn.hidden = true;
    // keep the address shareable without re-rendering the page
    history.replaceState(null, "", `#/playground?model=${encodeURIComponent(state.model)}`);
    showDeprecation();
    changed();
  } }, chatModels.map((c) => h("option", { value: c.id, selected: c.id === state.model },
    c.job || c.id.startsWith("ft:") ? `${c.id} (${t("playground.finetuned")})` : c.id)));

  function showDeprecation() {
    const c = card();
    const dep = c.deprecation;
    deprecation.hidden = !dep;
    if (!dep) return;
    const d = new Date(dep); // ISO 8601
    const when = Number.isNaN(d.getTime()) ? String(dep) : d.toLocaleDateString(ctx.lang);
    deprecation.textContent = t("playground.deprecated", {
      date: t("playground.deprecated_date", { date: when }),
      replacement: c.deprecation_replacement_model ? t("playground.deprecated_use", { model: c.deprecation_replacement_model }) : "",
    });
  }
  showDeprecation();

  const system = h("textarea", { id: "pg-system", rows: 3, placeholder: t("playground.system_placeholder"),
    value: state.system, oninput: () => { state.system = system.value; changed(); } });

  /** A slider with a number box beside it, both bound to state[key]. */
  function slider(key, id, label, min, max, step, onTouch) {
    const range = h("input", { type: "range", min, max, step, value: state[key], "aria-label": label });
    const box = h("input", { type: "number", id, min, max, step, value: state[key], class: "pg-num" });
    range.addEventListener("input", () => { box.value = range.value; state[key] = range.value; onTouch && onTouch(); changed(); });
    box.addEventListener("input", () => { range.value = box.value; state[key] = box.value; onTouch && onTouch(); changed(); });
    return { el: h("div", { class: "pg-slider" }, range, box), range, box };
  }
  const temp = slider("temperature", "pg-temperature", t("playground.temperature"), 0, 2, 0.05, () => { state.tempTouched = true; });
  function syncTemp() { temp.range.value = state.temperature; temp.box.value = state.temperature; }
  const topP = slider("topP", "pg-top-p", t("playground.top_p"), 0.01, 1, 0.01);
  const maxTokens = h("input", { type: "number", id: "pg-max-tokens", min: 1, step: 1, value: state.maxTokens,
    placeholder: t("playground.no_limit"), oninput: () => { state.maxTokens = maxTokens.value; changed(); } });
  const seed = h("input", { type: "number", id: "pg-seed", min: 0, step: 1, value: state.seed,
    placeholder: t("playground.random"), oninput: () => { state.seed = seed.value; changed(); } });
  const safe = h("input", { type: "checkbox", id: "pg-safe-prompt", checked: state.safePrompt,
    onchange: () => { state.safePrompt = safe.checked; changed(); } });
  const guard = h("input", { type: "checkbox", id: "pg-guardrails", checked: state.guardrails, disabled: !moderation,
    onchange: () => { state.guardrails = guard.checked; changed(); } });

  const format = h("select", { id: "pg-format", onchange: () => { state.format = format.value; showFormat(); changed(); } },
    [["text", "playground.format_text"], ["json_object", "playground.format_json"], ["json_schema", "playground.format_schema"]]
      .map(([v, k]) => h("option", { value: v, selected: state.format === v }, t(k))));
  const schemaName = h("input", { id: "pg-schema-name", value: state.schemaName, spellcheck: "false",
    oninput: () => { state.schemaName = schemaName.value; changed(); } });
  const schemaStrict = h("input", { type: "checkbox", id: "pg-schema-strict", checked: state.schemaStrict,
    onchange: () => { state.schemaStrict = schemaStrict.checked; changed(); } });
  const schema = h("textarea", { id: "pg-schema", class: "code", rows: 8, spellcheck: "false", value: state.schemaText,
    oninput: () => { state.schemaText = schema.value; changed(); } });
  const schemaBox = h("div", { class: "stack", id: "pg-schema-box" },
    field(t("playground.schema_name"), schemaName),
    h("label", { class: "row pg-check" }, schemaStrict, h("span", {}, t("playground.schema_strict"))),
    h("label", { class: "field" }, h("span", {}, t("playground.schema")), schema, errEl("schema")));
  function showFormat() { schemaBox.hidden = state.format !== "json_schema"; }
  showFormat();

  const toolsOn = h("input", { type: "checkbox", id: "pg-tools-on", checked: state.toolsOn,
    onchange: () => { state.toolsOn = toolsOn.checked; showTools(); changed(); } });
  const tools = h("textarea", { id: "pg-tools", class: "code", rows: 10, spellcheck: "false", value: state.toolsText,
    oninput: () => { state.toolsText = tools.value; toolChoiceOptions(); changed(); } });
  const toolChoice = h("select", { id: "pg-tool-choice", onchange: () => { state.toolChoice = toolChoice.value; changed(); } });
  function toolChoiceOptions() {
    const r = parseJson(state.toolsText);
    const names = Array.isArray(r.value) ? r.value.map((x) => x && x.function && x.function.name).filter(Boolean) : [];
    const opts = [["auto", t("playground.choice_auto")], ["none", t("playground.choice_none")],
      ["any", t("playground.choice_any")], ["required", t("playground.choice_required")],
      ...names.map((n) => [`function:${n}`, t("playground.choice_function", { name: n })])];
    if (!opts.some(([v]) => v === state.toolChoice)) state.toolChoice = "auto";
    fill(toolChoice, opts.map(([v, label]) => h("option", { value: v, selected: v === state.toolChoice }, label)));
  }
  toolChoiceOptions();
  const toolsBox = h("div", { class: "stack", id: "pg-tools-box" },
    h("label", { class: "field" }, h("span", {}, t("playground.tools")), tools, errEl("tools")),
    field(t("playground.tool_choice"), toolChoice));
  function showTools() { toolsBox.hidden = !state.toolsOn; }
  showTools();

  const settings = h("aside", { class: "panel pg-settings", "aria-label": t("playground.settings") },
    h("h2", {}, t("playground.settings")),
    field(t("playground.model"), modelSel), modelWarn, deprecation,
    field(t("playground.system"), system, t("playground.system_hint")),
    h("label", { class: "field" }, h("span", {}, t("playground.temperature")), temp.el,
      h("small", { class: "muted" }, t("playground.temperature_hint")), errEl("temperature")),
    h("label", { class: "field" }, h("span", {}, t("playground.top_p")), topP.el,
      h("small", { class: "muted" }, t("playground.top_p_hint")), errEl("topP")),
    h("label", { class: "field" }, h("span", {}, t("playground.max_tokens")), maxTokens,
      h("small", { class: "muted" }, t("playground.max_tokens_hint")), errEl("maxTokens")),
    h("label", { class: "field" }, h("span", {}, t("playground.seed")), seed,
      h("small", { class: "muted" }, t("playground.seed_hint")), errEl("seed")),
    field(t("playground.format"), format), schemaBox,
    h("label", { class: "row pg-check pg-toggle" }, toolsOn, h("span", {}, t("playground.tools_on"))),
    h("small", { class: "muted" }, t("playground.tools_hint")), toolsBox,
    h("label", { class: "row pg-check pg-toggle" }, safe, h("span", {}, t("playground.safe_prompt"))),
    h("small", { class: "muted" }, t("playground.safe_prompt_hint")),
    h("label", { class: "row pg-check pg-toggle" }, guard, h("span", {}, t("playground.guardrails"))),
    h("small", { class: "muted" }, t(moderation ? "playground.guardrails_hint" : "playground.guardrails_none")));

  // ---- conversation (right) ----
  const log = h("div", { class: "chat-log pg-log", id: "pg-log", "aria-live": "polite" });
  const errorBoxEl = h("p", { class: "error", role: "alert", id: "pg-error", hidden: true });
  const input = h("textarea", { id: "pg-input", rows: 3, placeholder: t("playground.input_placeholder"),
    "aria-label": t("playground.input"), value: state.draft,
    oninput: () => { state.draft = input.value; changed(); },
    onkeydown: (ev) => {
      if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); sendDraft(); }
    } });
  const sendBtn = h("button", { type: "button", id: "pg-send", onclick: () => sendDraft() }, t("playground.send"));
  const stopBtn = h("button", { type: "button", id: "pg-stop", class: "danger", disabled: true,
    onclick: () => controller && controller.abort() }, t("playground.stop"));
  const newBtn = h("button", { type: "button", id: "pg-new", class: "secondary", onclick: () => {
    if (controller) controller.abort();
    state.messages = [];
    state.toolResults = {};
    hideError();
    drawLog();
    changed();
    input.focus();
  } }, t("playground.new"));
  const codeBtn = h("button", { type: "button", id: "pg-code-toggle", class: "secondary", "aria-expanded": String(state.codeOpen),
    onclick: () => { state.codeOpen = !state.codeOpen; drawCode(); } });

  // ---- show code ----
  const codeTabs = h("div", { class: "tabs", role: "tablist" });
  const codeText = h("pre", { id: "pg-code" });
  const codeStream = h("input", { type: "checkbox", id: "pg-code-stream", checked: state.codeStream,
    onchange: () => { state.codeStream = codeStream.checked; drawCode(); } });
  const copyBtn = h("button", { type: "button", class: "secondary", id: "pg-copy", onclick: async () => {
    try {
      await navigator.clipboard.writeText(codeText.textContent);
      toast(t("playground.copied"), "ok");
    } catch {
      toast(t("playground.copy_failed"), "error");
      const range = document.createRange();
      range.selectNodeContents(codeText);
      const sel = getSelection();
      sel.removeAllRanges();
      sel.addRange(range);
    }
  } }, t("playground.copy"));
  const codePanel = h("div", { class: "panel", id: "pg-code-panel", hidden: true },
    h("p", { class: "muted" }, t("playground.code_help")), codeTabs,
    h("div", { class: "row" }, h("label", { class: "row pg-check" }, codeStream, h("span", {}, t("playground.code_stream"))),
      h("span", { class: "pg-grow" }), copyBtn),
    codeText);

  function drawCode() {
    codeBtn.textContent = t(state.codeOpen ? "playground.hide_code" : "playground.show_code");
    codeBtn.setAttribute("aria-expanded", String(state.codeOpen));
    codePanel.hidden = !state.codeOpen;
    if (!state.codeOpen) return;
    fill(codeTabs, [["curl", "curl"], ["python", "Python"], ["javascript", "JavaScript"]].map(([id, label]) =>
      h("button", { type: "button", role: "tab", id: `pg-code-${id}`, "aria-selected": String(state.codeTab === id),
        onclick: () => { state.codeTab = id; drawCode(); } }, label)));
    const p = problems();
    if (Object.keys(p).length) {
      codeText.textContent = t("playground.fix_first", { problems: Object.values(p).join(" ") });
      return;
    }
    codeText.textContent = codeFor(state.codeTab, codeBody(), state.codeStream);
  }

  /** The request the code shows: the next one (with the message being typed), or, when the
   *  box is empty after an answer, the one that produced that answer. */
  function codeBody() {
    if (state.draft.trim() || !state.messages.length) return requestBody(state.messages, [{ role: "user", content: state.draft }]);
    const last = state.messages[state.messages.length - 1];
    return requestBody(last.role === "assistant" ? state.messages.slice(0, -1) : state.messages);
  }

  const chat = h("section", { class: "pg-chat", "aria-label": t("playground.conversation") },
    h("div", { class: "panel" }, log, errorBoxEl,
      h("div", { class: "pg-composer" }, input,
        h("div", { class: "row" }, sendBtn, stopBtn, newBtn, h("span", { class: "pg-grow" }), codeBtn))),
    codePanel);
  root.append(h("div", { class: "split pg-split" }, settings, chat));

  // ---- drawing ----
  function showProblems() {
    const p = problems();
    for (const [k, el] of Object.entries(errs)) {
      el.textContent = p[k] || "";
      el.hidden = !p[k];
    }
    return p;
  }

  /** Called after any change of a setting or of the draft. */
  function changed() {
    showProblems();
    if (state.codeOpen) drawCode();
  }

  function hideError() { errorBoxEl.hidden = true; errorBoxEl.textContent = ""; }
  function showError(err) {
    errorBoxEl.textContent = err && err.code === "guardrail_blocked"
      ? t("playground.guard_blocked", { message: err.message }) : errorText(err);
    errorBoxEl.hidden = false;
  }

  function busy(on) {
    sendBtn.disabled = on;
    stopBtn.disabled = !on;
    for (const b of log.querySelectorAll(".pg-send-results")) b.disabled = on;
  }

  function atBottom() { return log.scrollHeight - log.scrollTop - log.clientHeight < 40; }

  function drawMessage(m, i) {
    if (m.role === "user") return h("div", { class: "msg user", "aria-label": t("playground.you") }, m.content);
    if (m.role === "tool") {
      return h("div", { class: "msg user pg-tool-msg" }, h("div", { class: "pg-who" }, t("playground.tool", { name: m.name })),
        h("pre", {}, m.content));
    }
    const text = h("div", { class: "pg-text" });
    const calls = h("div", { class: "pg-calls" });
    const note = h("div", { class: "pg-note" });
    const box = h("div", { class: "msg assistant", "aria-label": t("playground.assistant") }, text, calls, note);
    const stats = h("div", { class: "stats pg-stats" });
    const view = { box, text, calls, note, stats, index: i };
    views.set(m, view);
    updateAnswer(m);
    return [box, stats];
  }

  /** Refresh one answer's text, tool calls and stats (on every chunk while it streams). */
  function updateAnswer(m) {
    const v = views.get(m);
    if (!v) return;
    v.box.dataset.state = m.status || "done";
    if (v.text.textContent !== m.content) v.text.textContent = m.content; // text only: never HTML
    const calls = m.tool_calls || [];
    if (v.calls.childElementCount !== calls.length || m.status !== "streaming") {
      fill(v.calls, calls.map((c) => h("div", { class: "pg-call" },
        h("div", { class: "pg-who" }, t("playground.tool_call", { name: c.function.name })),
        h("pre", {}, prettyArgs(c.function.arguments)))));
    }
    // JSON modes: say whether the answer parses
    fill(v.note);
    if (m.status !== "streaming" && m.json && m.content) {
      const r = parseJson(m.content);
      v.note.append(h("span", { class: `badge ${r.error ? "warn" : "ok"}`, id: `pg-json-${v.index}` },
        r.error ? t("playground.json_bad", { message: r.error }) : t("playground.json_ok")));
    }
    const line = statsLine(m);
    v.stats.textContent = line;
    v.stats.hidden = !line;
    const tm = timings(m, performance.now());
    v.stats.dataset.ttftMs = tm ? String(Math.round(tm.ttft)) : "";
    v.stats.dataset.tps = tm && tm.tps != null ? tm.tps.toFixed(2) : "";
  }

  /** The form for giving the results of the last answer's tool calls. */
  function toolResultsForm(m) {
    const fields = m.tool_calls.map((c) => {
      const area = h("textarea", { class: "code pg-tool-result", rows: 2, spellcheck: "false",
        placeholder: t("playground.tool_result_placeholder"), value: state.toolResults[c.id] || "",
        oninput: () => { state.toolResults[c.id] = area.value; } });
      return field(t("playground.tool_result", { name: c.function.name }), area);
    });
    const btn = h("button", { type: "button", class: "pg-send-results", disabled: Boolean(controller), onclick: () => {
      for (const c of m.tool_calls) {
        state.messages.push({ role: "tool", name: c.function.name, tool_call_id: c.id, content: state.toolResults[c.id] || "" });
      }
      state.toolResults = {};
      run();
    } }, t("playground.send_results"));
    return h("div", { class: "panel pg-results", id: "pg-tool-results" }, fields, btn);
  }

  function drawLog() {
    views.clear();
    const items = [];
    if (state.system.trim() && state.messages.length) {
      items.push(h("div", { class: "msg pg-system-msg" }, h("div", { class: "pg-who" }, t("playground.system_msg")), state.system));
    }
    state.messages.forEach((m, i) => items.push(drawMessage(m, i)));
    const last = state.messages[state.messages.length - 1];
    if (last && last.role === "assistant" && last.status !== "streaming" && last.tool_calls && last.tool_calls.length) {
      items.push(toolResultsForm(last));
    }
    if (!items.length) items.push(h("p", { class: "muted pg-empty" }, t("playground.empty")));
    fill(log, items);
    log.scrollTop = log.scrollHeight;
  }

  // ---- sending ----
  function sendDraft() {
    if (controller) return;
    const text = input.value;
    if (!text.trim()) { input.focus(); return; }
    state.messages.push({ role: "user", content: text });
    state.draft = "";
    input.value = "";
    if (!run()) { // settings to fix first: give the message back
      state.messages.pop();
      state.draft = text;
      input.value = text;
    }
  }

  /** Stream an answer to the conversation as it stands. False when the settings need fixing. */
  function run() {
    hideError();
    const p = showProblems();
    if (Object.keys(p).length) {
      showError(new Error(t("playground.fix_first", { problems: Object.values(p).join(" ") })));
      return false;
    }
    const body = { ...requestBody(), stream: true };
    const answer = { role: "assistant", content: "", tool_calls: null, status: "streaming",
      t0: performance.now(), tFirst: null, tEnd: null, chunks: 0, usage: null, finish: null,
      json: state.format !== "text", guardrails: null };
    const asked = state.messages.length; // the conversation before this answer
    state.messages.push(answer);
    drawLog();
    changed();
    controller = new AbortController();
    const mine = controller;
    busy(true);
    ticker = setInterval(() => updateAnswer(answer), 100);

    api.stream(CHAT, body, (ev) => {
      const ch = ev.choices && ev.choices[0];
      if (ch) {
        const d = ch.delta || {};
        if (d.content) {
          answer.content += d.content;
          answer.chunks += 1;
          if (answer.tFirst == null) answer.tFirst = performance.now();
        }
        if (d.tool_calls) {
          if (answer.tFirst == null) answer.tFirst = performance.now();
          answer.tool_calls = mergeCalls(answer.tool_calls || [], d.tool_calls);
        }
        if (ch.finish_reason) answer.finish = ch.finish_reason;
      }
      if (ev.usage) answer.usage = ev.usage;
      if (ev.guardrails) answer.guardrails = ev.guardrails;
      const follow = atBottom();
      updateAnswer(answer);
      if (follow) log.scrollTop = log.scrollHeight;
    }, { signal: mine.signal }).then(() => {
      answer.status = "done";
    }, (err) => {
      if (err && err.name === "AbortError") { answer.status = "stopped"; return; }
      answer.status = "error";
      answer.finish = null;
      if (!answer.content && !(answer.tool_calls && answer.tool_calls.length)) {
        // nothing came: take the question back into the box, to send again once fixed
        const question = state.messages[asked - 1];
        state.messages.length = asked;
        if (question && question.role === "user") {
          state.messages.pop();
          state.draft = question.content;
          if (!mine.signal.aborted) input.value = question.content;
        }
      }
      showError(err);
    }).finally(() => {
      answer.tEnd = answer.tEnd ?? performance.now();
      clearInterval(ticker);
      ticker = null;
      if (controller === mine) controller = null;
      busy(false);
      drawLog();
      changed();
      if (mine.signal.aborted || answer.status !== "error") input.focus({ preventScroll: true });
    });
    return true;
  }

  /** Merge streamed tool-call deltas: whole calls, or pieces of one by index (OpenAI style). */
  function mergeCalls(calls, deltas) {
    const out = calls.map((c) => ({ ...c, function: { ...c.function } }));
    for (const d of deltas) {
      const at = d.index != null ? out.findIndex((c) => c.index === d.index) : -1;
      if (at >= 0) {
        const c = out[at];
        if (d.id) c.id = d.id;
        if (d.function && d.function.name) c.function.name = d.function.name;
        if (d.function && d.function.arguments) c.function.arguments = (c.function.arguments || "") + d.function.arguments;
      } else {
        out.push({ id: d.id, index: d.index, type: "function",
          function: { name: (d.function && d.function.name) || "", arguments: (d.function && d.function.arguments) || "" } });
      }
    }
    return out;
  }

  // an answer left streaming by a previous render was aborted by its dispose
  for (const m of state.messages) if (m.status === "streaming") { m.status = "stopped"; m.tEnd = m.tEnd ?? performance.now(); }
  drawLog();
  drawCode();
  showProblems();
  busy(false);

  return () => {
    if (ticker) clearInterval(ticker);
    ticker = null;
    if (controller) controller.abort();
    controller = null;
  };
}
