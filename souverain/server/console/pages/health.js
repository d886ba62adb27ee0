// Health: is the server up, what it serves, and how busy it is, live. GET /health and
// GET /metrics (Prometheus text, souverain/server/metrics.py) are read every 2 s while the page
// is open; the charts show the last 5 minutes: API requests/s, tokens/s, time to first token
// and inter-token latency (p50/p95 from the histograms' buckets over the last 30 s), queue,
// KV-cache use and prefix-cache hit rate. A chart whose metric the server does not export says
// so. The server's version comes from /health, its uptime from the
// process_start_time_seconds metric and the Date header of the /metrics answer.

import * as api from "../api.js";
import { lineChart } from "../chart.js";
import { add, lang, num, t } from "../i18n.js";
import { bytes, errorText, fill, h } from "../ui.js";

add({
  en: {
    "health.title": "Health",
    "health.intro": "How the server is doing, updated every 2 seconds while this page is open.",
    "health.status": "Status", "health.status.ok": "Running", "health.status.draining": "Shutting down",
    "health.status.down": "Not answering",
    "health.version": "Version", "health.uptime": "Up for", "health.memory": "Memory in use",
    "health.models": "Models", "health.models_loaded": "{loaded} of {total} in memory",
    "health.loaded": "in memory", "health.not_loaded": "not loaded",
    "health.updated": "Last update {time}",
    "health.unknown": "unknown",
    "health.seconds_ago": "seconds ago",
    "health.not_exported": "Not exported by this server.",
    "health.no_traffic": "No request in the last {s} s.",
    "health.metrics_error": "The live figures cannot be read: {message}",
    "health.rps": "API requests per second",
    "health.rps_hint": "Calls to the API (/v1/…). This page's own checks of /health and /metrics are not counted.",
    "health.requests": "requests", "health.errors": "errors",
    "health.tps": "Tokens per second",
    "health.tps_hint": "Generated: the models' answers. Read: the prompts they processed.",
    "health.generated": "generated", "health.prompt": "read",
    "health.ttft": "Time to first token (seconds)",
    "health.ttft_hint": "How long a user waits before the answer starts: median (p50) and slowest 5 % (p95) over the last 30 s.",
    "health.itl": "Time between tokens (seconds)",
    "health.itl_hint": "How fast an answer streams once started: median (p50) and slowest 5 % (p95) over the last 30 s.",
    "health.queue": "Requests in progress",
    "health.queue_hint": "Being generated now, and waiting for their turn.",
    "health.running": "running", "health.waiting": "waiting",
    "health.kv": "Working memory in use (%)",
    "health.kv_hint": "Share of the KV cache (the memory that holds the conversations being generated) in use, per model.",
    "health.hit": "Prefix-cache hit rate (%)",
    "health.hit_hint": "Share of prompt tokens reused from earlier requests instead of being read again (since the server started), per model.",
    "health.now": "now",
    "health.duration.d": "{d} d {h} h", "health.duration.h": "{h} h {m} min", "health.duration.m": "{m} min {s} s",
    "health.duration.s": "{s} s",
  },
  fr: {
    "health.title": "Santé",
    "health.intro": "L'état du serveur, mis à jour toutes les 2 secondes tant que cette page est ouverte.",
    "health.status": "État", "health.status.ok": "En marche", "health.status.draining": "En cours d'arrêt",
    "health.status.down": "Ne répond pas",
    "health.version": "Version", "health.uptime": "En marche depuis", "health.memory": "Mémoire utilisée",
    "health.models": "Modèles", "health.models_loaded": "{loaded} sur {total} en mémoire",
    "health.loaded": "en mémoire", "health.not_loaded": "non chargé",
    "health.updated": "Dernière mise à jour {time}",
    "health.unknown": "inconnue",
    "health.seconds_ago": "il y a (secondes)",
    "health.not_exported": "Non exporté par ce serveur.",
    "health.no_traffic": "Aucune requête dans les {s} dernières secondes.",
    "health.metrics_error": "Les chiffres en direct ne peuvent pas être lus : {message}",
    "health.rps": "Requêtes à l'API par seconde",
    "health.rps_hint": "Appels à l'API (/v1/…). Les vérifications de /health et /metrics faites par cette page ne sont pas comptées.",
    "health.requests": "requêtes", "health.errors": "erreurs",
    "health.tps": "Jetons par seconde",
    "health.tps_hint": "Générés : les réponses des modèles. Lus : les consignes qu'ils ont traitées.",
    "health.generated": "générés", "health.prompt": "lus",
    "health.ttft": "Délai avant le premier jeton (secondes)",
    "health.ttft_hint": "Combien de temps on attend avant que la réponse commence : médiane (p50) et 5 % les plus lents (p95) sur les 30 dernières secondes.",
    "health.itl": "Délai entre deux jetons (secondes)",
    "health.itl_hint": "La vitesse d'affichage d'une réponse commencée : médiane (p50) et 5 % les plus lents (p95) sur les 30 dernières secondes.",
    "health.queue": "Requêtes en cours",
    "health.queue_hint": "En cours de génération, et en attente de leur tour.",
    "health.running": "en cours", "health.waiting": "en attente",
    "health.kv": "Mémoire de travail utilisée (%)",
    "health.kv_hint": "Part du cache KV (la mémoire qui contient les conversations en cours de génération) utilisée, par modèle.",
    "health.hit": "Taux de réutilisation du cache de préfixes (%)",
    "health.hit_hint": "Part des jetons de consigne repris de requêtes précédentes au lieu d'être relus (depuis le démarrage du serveur), par modèle.",
    "health.now": "maintenant",
    "health.duration.d": "{d} j {h} h", "health.duration.h": "{h} h {m} min", "health.duration.m": "{m} min {s} s",
    "health.duration.s": "{s} s",
  },
});

const POLL_MS = 2000;
const KEEP_S = 300; // the charts' history: 5 minutes
const WINDOW_S = 30; // the latency percentiles' window

/**
 * The q-quantile (0 < q < 1) of the observations a Prometheus histogram received between two
 * scrapes, as Prometheus' histogram_quantile() estimates it.
 *
 * `before` and `after` are the histogram's cumulative bucket counts at the two scrapes,
 * [[upperBound, count], ...] sorted by bound and ending with +Infinity (the `_bucket{le=...}`
 * samples); `before` is null for "since the server started". The window's own cumulative
 * counts are after - before, bucket by bucket. The quantile's rank, q × (the window's total),
 * falls in the first bucket whose cumulative count reaches it; inside that bucket the
 * observations are assumed spread evenly, so the value is interpolated linearly between the
 * bucket's lower bound (the previous bound; 0 for the first bucket) and its upper bound. A rank
 * in the +Inf bucket gives the highest finite bound (nothing better is known). Returns null when
 * the window holds no observation. A count that went down (the server restarted in between)
 * means the window starts at the restart: `after` is used alone.
 */
export function histogramQuantile(q, before, after) {
  const prev = new Map((before || []).map(([le, c]) => [le, c]));
  let cum = after.map(([le, c]) => [le, c - (prev.get(le) ?? 0)]);
  if (cum.some(([, c]) => c < 0)) cum = after;
  const total = cum.length ? cum[cum.length - 1][1] : 0;
  if (!(total > 0)) return null;
  const rank = q * total;
  let lower = 0;
  let below = 0;
  for (const [le, c] of cum) {
    if (c >= rank && c > below) {
      if (le === Infinity) return lower;
      return lower + ((le - lower) * (rank - below)) / (c - below);
    }
    lower = le === Infinity ? lower : le;
    below = c;
  }
  return lower;
}

/** The metric families a scrape declares (`# TYPE name kind` lines): what the server exports,
 *  with or without samples yet (a histogram has none before its first observation). */
export function exportedFamilies(text) {
  const out = new Set();
  for (const m of text.matchAll(/^# TYPE ([a-zA-Z_:][a-zA-Z0-9_:]*) /gm)) out.add(m[1]);
  return out;
}

/** Whether a scrape declares the family of samples `name` (a counter's TYPE line names it
 *  with _total in the classic text format, without it in OpenMetrics). */
function declares(families, name) {
  return families.has(name) || families.has(name.replace(/_total$/, ""));
}

/** Sum of the samples named `name` whose labels pass `keep`; null when there is none. */
function total(samples, name, keep = () => true) {
  let s = null;
  for (const x of samples) if (x.name === name && keep(x.labels) && Number.isFinite(x.value)) s = (s ?? 0) + x.value;
  return s;
}

/** Per-model values of a gauge: {model: value}. */
function byModel(samples, name) {
  const out = {};
  for (const x of samples) if (x.name === name && Number.isFinite(x.value)) out[x.labels.model || ""] = (out[x.labels.model || ""] ?? 0) + x.value;
  return out;
}

/** A histogram's cumulative buckets summed over its other labels: [[le, count]] by le. */
function buckets(samples, family) {
  const by = new Map();
  for (const x of samples) {
    if (x.name !== `${family}_bucket`) continue;
    const le = x.labels.le === "+Inf" ? Infinity : Number(x.labels.le);
    by.set(le, (by.get(le) ?? 0) + x.value);
  }
  return [...by.entries()].sort((a, b) => a[0] - b[0]);
}

const isApi = (labels) => (labels.route || "").startsWith("/v1/");
const isApiError = (labels) => isApi(labels) && Number(labels.status) >= 400;

/** The per-second rate of a counter between two scrapes. A counter without samples yet is 0
 *  (a labelled counter has none before its first increment); one that went down was reset
 *  (the server restarted), so it counts from zero. */
function rate(cur, prev, dt) {
  if (!(dt > 0)) return null;
  const c = cur ?? 0;
  const p = prev ?? 0;
  return (c >= p ? c - p : c) / dt;
}

/** What one scrape adds to the charts, given the previous scrape and the one ~30 s before. */
function point(scrape, prev, windowStart) {
  const s = scrape.samples;
  const v = {};
  const dt = prev ? scrape.t - prev.t : 0;
  const counter = (name, keep) => (prev ? rate(total(s, name, keep), total(prev.samples, name, keep), dt) : null);
  v.rps = counter("souverain_requests_total", isApi);
  v.errps = counter("souverain_requests_total", isApiError);
  v.gen = counter("souverain_completion_tokens_total");
  v.prompt = counter("souverain_prompt_tokens_total");
  for (const [key, family] of [["ttft", "souverain_time_to_first_token_seconds"], ["itl", "souverain_inter_token_latency_seconds"]]) {
    const after = buckets(s, family);
    // no window before the second scrape (the counts since start would not be "the last 30 s")
    const before = windowStart ? buckets(windowStart.samples, family) : null;
    v[`${key}50`] = windowStart && after.length ? histogramQuantile(0.5, before, after) : null;
    v[`${key}95`] = windowStart && after.length ? histogramQuantile(0.95, before, after) : null;
  }
  v.running = total(s, "souverain_running_sequences");
  v.waiting = total(s, "souverain_queue_depth");
  const used = byModel(s, "souverain_kv_blocks_used");
  const free = byModel(s, "souverain_kv_blocks_free");
  for (const [model, u] of Object.entries(used)) {
    const all = u + (free[model] ?? 0);
    v[`kv:${model}`] = all > 0 ? (100 * u) / all : 0;
  }
  for (const [model, r] of Object.entries(byModel(s, "souverain_prefix_cache_hit_rate"))) v[`hit:${model}`] = 100 * r;
  return { t: scrape.t, v };
}

const fixed = (digits) => (x) => num(x, digits);
const secs = (x) => (x < 0.1 ? num(x, 3) : x < 10 ? num(x, 2) : num(x, 1));

// The charts: which families they need (else "not exported"), their series (a key of point().v,
// or a prefix for one series per model), how their numbers read.
const CHARTS = [
  { id: "rps", title: "health.rps", hint: "health.rps_hint", families: ["souverain_requests_total"],
    series: [["rps", "health.requests"], ["errps", "health.errors"]], format: fixed(2) },
  { id: "tps", title: "health.tps", hint: "health.tps_hint", families: ["souverain_completion_tokens_total"],
    series: [["gen", "health.generated"], ["prompt", "health.prompt"]], format: fixed(1) },
  { id: "ttft", title: "health.ttft", hint: "health.ttft_hint", families: ["souverain_time_to_first_token_seconds"],
    series: [["ttft50", "p50"], ["ttft95", "p95"]], format: secs, window: true },
  { id: "itl", title: "health.itl", hint: "health.itl_hint", families: ["souverain_inter_token_latency_seconds"],
    series: [["itl50", "p50"], ["itl95", "p95"]], format: secs, window: true },
  { id: "queue", title: "health.queue", hint: "health.queue_hint", families: ["souverain_running_sequences", "souverain_queue_depth"],
    series: [["running", "health.running"], ["waiting", "health.waiting"]], format: fixed(0) },
  { id: "kv", title: "health.kv", hint: "health.kv_hint", families: ["souverain_kv_blocks_used", "souverain_kv_blocks_free"],
    perModel: "kv:", format: fixed(1), max100: true },
  { id: "hit", title: "health.hit", hint: "health.hit_hint", families: ["souverain_prefix_cache_hit_rate"],
    perModel: "hit:", format: fixed(1), max100: true },
];

function duration(seconds) {
  const s = Math.max(0, Math.floor(seconds));
  const d = Math.floor(s / 86400), hr = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
  if (d) return t("health.duration.d", { d, h: hr });
  if (hr) return t("health.duration.h", { h: hr, m });
  if (m) return t("health.duration.m", { m, s: s % 60 });
  return t("health.duration.s", { s });
}

export async function render(root) {
  let stopped = false;
  let timer = null;
  let inflight = null;
  let denied = null; // the ApiError of a /metrics refused to this key
  const scrapes = []; // the scrapes of the last WINDOW_S seconds (+ one), for rates and percentiles
  const points = []; // the charts' data: {t, v} of the last KEEP_S seconds
  let version = null;

  // -- layout: the header (status, version, uptime, models), then one panel per chart ----
  const facts = {
    status: h("dd", { id: "health-status" }, "…"), version: h("dd", { id: "health-version" }, "…"),
    uptime: h("dd", { id: "health-uptime" }, "…"), memory: h("dd", { id: "health-memory" }, "…"),
    models: h("dd", { id: "health-models" }, "…"),
  };
  const updated = h("span", { class: "muted", id: "health-updated" });
  const problem = h("div", { id: "health-problem" });
  const panels = {};
  for (const c of CHARTS) {
    panels[c.id] = {
      el: h("section", { class: "panel health-chart", id: `health-${c.id}` }),
      readout: h("p", { class: "stats health-readout" }),
      box: h("div", { class: "health-plot" }),
    };
    const p = panels[c.id];
    p.el.append(h("h2", {}, t(c.title)), p.readout, p.box, h("small", { class: "muted" }, t(c.hint)));
  }
  fill(root,
    h("div", { class: "row" }, h("h1", {}, t("health.title")), h("span", { class: "grow" }), updated),
    h("p", { class: "muted" }, t("health.intro")),
    h("section", { class: "panel health-header" }, h("dl", { class: "health-facts" },
      h("div", {}, h("dt", {}, t("health.status")), facts.status),
      h("div", {}, h("dt", {}, t("health.version")), facts.version),
      h("div", {}, h("dt", {}, t("health.uptime")), facts.uptime),
      h("div", {}, h("dt", {}, t("health.memory")), facts.memory),
      h("div", { class: "health-models-fact" }, h("dt", {}, t("health.models")), facts.models))),
    problem,
    h("div", { class: "grid health-charts" }, CHARTS.map((c) => panels[c.id].el)));


  function drawHealth(health) {
    if (!health) {
      fill(facts.status, h("span", { class: "badge error" }, t("health.status.down")));
      return;
    }
    version = health.version || version;
    facts.version.textContent = version || t("health.unknown");
    fill(facts.status, h("span", { class: `badge ${health.status === "ok" ? "ok" : "warn"}`, "data-status": health.status },
      t(`health.status.${health.status}`)));
    const models = Object.entries(health.models || {});
    const loaded = models.filter(([, s]) => s === "loaded").length;
    fill(facts.models, h("span", { "data-loaded": loaded, "data-total": models.length },
      t("health.models_loaded", { loaded, total: models.length })),
    h("span", { class: "row health-model-list" }, models.map(([name, s]) =>
      h("span", { class: `badge ${s === "loaded" ? "ok" : ""}` }, `${name} · ${t(s === "loaded" ? "health.loaded" : "health.not_loaded")}`))));
  }

  function drawCharts(last) {
    const now = last.t;
    for (const c of CHARTS) {
      const p = panels[c.id];
      const exported = c.families.every((f) => declares(last.families, f));
      p.el.dataset.exported = String(exported);
      if (!exported) {
        p.readout.textContent = "";
        fill(p.box, h("p", { class: "muted health-not-exported" }, t("health.not_exported")));
        continue;
      }
      const keys = c.perModel
        ? [...new Set(points.flatMap((pt) => Object.keys(pt.v).filter((k) => k.startsWith(c.perModel))))].map((k) => [k, null])
        : c.series;
      const series = keys.map(([key, label]) => ({
        key,
        name: label ? (label.includes(".") ? t(label) : label) : key.slice(c.perModel.length),
        points: points.map((pt) => [pt.t - now, pt.v[key]]).filter(([, y]) => y !== null && y !== undefined && Number.isFinite(y)),
      }));
      const latest = {};
      const max = {};
      for (const se of series) {
        const lastPt = points.length ? points[points.length - 1].v[se.key] : null;
        latest[se.key] = lastPt ?? null;
        max[se.key] = se.points.length ? Math.max(...se.points.map((x) => x[1])) : null;
      }
      p.el.dataset.latest = JSON.stringify(latest);
      p.el.dataset.max = JSON.stringify(max);
      p.readout.textContent = c.window && series.every((se) => latest[se.key] === null)
        ? t("health.no_traffic", { s: WINDOW_S })
        : `${t("health.now")}: ${series.map((se) => `${se.name} ${latest[se.key] === null ? "—" : c.format(latest[se.key])}`).join(" · ")}`;
      fill(p.box, lineChart({
        series: series.map(({ name, points: pts }) => ({ name, points: pts })),
        xLabel: t("health.seconds_ago"), xFormat: (x) => Math.abs(x).toLocaleString(lang(), { maximumFractionDigits: 1 }),
        yMin: 0,
      }));
    }
  }

  function drawProcess(scrape) {
    const start = total(scrape.samples, "process_start_time_seconds");
    facts.uptime.textContent = start !== null && scrape.serverNow ? duration(scrape.serverNow - start) : t("health.unknown");
    const rss = total(scrape.samples, "process_resident_memory_bytes");
    facts.memory.textContent = rss !== null ? bytes(rss) : t("health.unknown");
  }

  async function tick() {
    inflight = new AbortController();
    const signal = inflight.signal;
    const [health, metrics] = await Promise.allSettled([
      api.get("/health", { signal }),
      // after a 401/403 /metrics is not asked again (the key dialog would reopen every 2 s);
      // a new key re-renders the page
      denied ? Promise.reject(denied) : api.request("GET", "/metrics", { raw: true, signal }).then(async (resp) => ({
        text: await resp.text(), date: Date.parse(resp.headers.get("date") || "") / 1000,
      })),
    ]);
    if (stopped) return;
    drawHealth(health.status === "fulfilled" ? health.value : null);
    if (metrics.status === "fulfilled") {
      fill(problem);
      const scrape = {
        t: performance.now() / 1000,
        serverNow: Number.isFinite(metrics.value.date) ? metrics.value.date : null,
        samples: api.parseMetrics(metrics.value.text),
        families: exportedFamilies(metrics.value.text),
      };
      const prev = scrapes.length ? scrapes[scrapes.length - 1] : null;
      // the window's start: the newest scrape at least WINDOW_S old, else the oldest kept
      const windowStart = [...scrapes].reverse().find((x) => scrape.t - x.t >= WINDOW_S) || scrapes[0] || null;
      scrapes.push(scrape);
      while (scrapes.length > 2 && scrape.t - scrapes[1].t >= WINDOW_S) scrapes.shift();
      points.push(point(scrape, prev, windowStart));
      while (points.length && scrape.t - points[0].t > KEEP_S) points.shift();
      drawProcess(scrape);
      drawCharts(scrape);
      updated.textContent = t("health.updated", { time: new Date().toLocaleTimeString() });
    } else if (metrics.reason.name !== "AbortError") {
      if (metrics.reason.status === 401 || metrics.reason.status === 403) denied = metrics.reason;
      fill(problem, h("p", { class: "error", role: "alert" }, t("health.metrics_error", { message: errorText(metrics.reason) })));
    }
    if (!stopped) timer = setTimeout(tick, POLL_MS);
  }
  tick();

  return () => {
    stopped = true;
    clearTimeout(timer);
    if (inflight) inflight.abort();
  };
}
