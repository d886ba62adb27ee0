// English and French (more: add a dictionary). The language comes from the browser
// (navigator.languages) unless the user picked one (kept in localStorage); each page adds its
// own strings with add({en: {...}, fr: {...}}) when its module loads.

export const LANGUAGES = { en: "English", fr: "Français" };
const STORE = "souverain.lang";
const dict = { en: {}, fr: {} };
let current = pick();
const listeners = [];

function pick() {
  const saved = localStorage.getItem(STORE);
  if (saved && saved in LANGUAGES) return saved;
  for (const tag of navigator.languages || [navigator.language || "en"]) {
    const base = String(tag).toLowerCase().split("-")[0];
    if (base in LANGUAGES) return base;
  }
  return "en";
}

export function lang() { return current; }

export function setLang(code) {
  if (!(code in LANGUAGES) || code === current) return;
  current = code;
  localStorage.setItem(STORE, code);
  document.documentElement.lang = code;
  for (const fn of listeners) fn(code);
}

export function onLangChange(fn) { listeners.push(fn); }

export function add(strings) {
  for (const [code, table] of Object.entries(strings)) Object.assign(dict[code] ||= {}, table);
}

/** The string for key in the current language ({name} placeholders filled from vars);
 *  English when the current language lacks it, the key itself when both do. */
export function t(key, vars = {}) {
  const s = (dict[current] && dict[current][key]) ?? dict.en[key] ?? key;
  return s.replace(/\{(\w+)\}/g, (m, k) => (k in vars ? String(vars[k]) : m));
}

/** Numbers and dates in the current language. */
export function num(x, digits = 0) {
  return Number(x).toLocaleString(current, { maximumFractionDigits: digits, minimumFractionDigits: digits });
}
export function date(seconds) {
  return new Date(seconds * 1000).toLocaleString(current);
}

add({
  en: {
    "nav.playground": "Playground", "nav.documents": "Documents", "nav.finetuning": "Fine-tuning",
    "nav.batches": "Batches", "nav.models": "Models", "nav.health": "Health",
    "key.button.set": "API key", "key.button.change": "Change key",
    "key.title": "API key", "key.label": "Your API key",
    "key.help": "This server asks for an API key. It is kept in this tab only and sent to this server only.",
    "key.submit": "Use this key", "key.refused": "This key was refused: {message}",
    "key.checking": "Checking…",
    "error.forbidden": "Your API key cannot use this page: {message}",
    "error.server": "The server answered with an error: {message}",
    "error.unreachable": "The server cannot be reached.",
    "page.missing": "This page does not exist. Pick one above.",
    "common.loading": "Loading…", "common.refresh": "Refresh", "common.cancel": "Cancel",
    "common.delete": "Delete", "common.create": "Create", "common.close": "Close",
    "common.none": "Nothing here yet.", "common.download": "Download", "common.status": "Status",
    "common.name": "Name", "common.created": "Created", "common.model": "Model",
  },
  fr: {
    "nav.playground": "Bac à sable", "nav.documents": "Documents", "nav.finetuning": "Affinage",
    "nav.batches": "Lots", "nav.models": "Modèles", "nav.health": "Santé",
    "key.button.set": "Clé d'API", "key.button.change": "Changer de clé",
    "key.title": "Clé d'API", "key.label": "Votre clé d'API",
    "key.help": "Ce serveur demande une clé d'API. Elle reste dans cet onglet et n'est envoyée qu'à ce serveur.",
    "key.submit": "Utiliser cette clé", "key.refused": "Cette clé a été refusée : {message}",
    "key.checking": "Vérification…",
    "error.forbidden": "Votre clé d'API ne permet pas d'utiliser cette page : {message}",
    "error.server": "Le serveur a répondu par une erreur : {message}",
    "error.unreachable": "Le serveur est injoignable.",
    "page.missing": "Cette page n'existe pas. Choisissez-en une ci-dessus.",
    "common.loading": "Chargement…", "common.refresh": "Actualiser", "common.cancel": "Annuler",
    "common.delete": "Supprimer", "common.create": "Créer", "common.close": "Fermer",
    "common.none": "Rien pour l'instant.", "common.download": "Télécharger", "common.status": "État",
    "common.name": "Nom", "common.created": "Créé", "common.model": "Modèle",
  },
});
