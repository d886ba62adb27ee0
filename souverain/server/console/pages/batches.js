// Batches: many requests in one go, run in the background when the server has time.
// A JSONL file of requests (POST /v1/files, purpose batch; GET /v1/files?purpose=batch lists
// those uploaded before), a job over it (POST /v1/batch/jobs: model, endpoint), the jobs with
// their counters (GET /v1/batch/jobs, polled while one runs), cancel (POST
// /v1/batch/jobs/{id}/cancel) and the results and errors files (GET /v1/files/{id}/content,
// fetched with the key and saved through a blob: link).

import * as api from "../api.js";
import { add, date, num, t } from "../i18n.js";
import { errorBox, errorText, field, fill, h, table, toast } from "../ui.js";
import { downloadFile, statusBadge, uploader } from "./jsonl-files.js";

const POLL_MS = 1500;
const ACTIVE = ["QUEUED", "RUNNING", "CANCELLATION_REQUESTED"];
const KINDS = { ok: ["SUCCESS"], error: ["FAILED", "TIMEOUT_EXCEEDED"], warn: ["CANCELLED", "CANCELLATION_REQUESTED"] };
const ENDPOINTS = ["/v1/chat/completions", "/v1/embeddings", "/v1/fim/completions", "/v1/completions"];
// which models an endpoint can use (capabilities of GET /v1/models)
const NEEDS = { "/v1/chat/completions": "completion_chat", "/v1/completions": "completion_chat",
  "/v1/fim/completions": "completion_fim", "/v1/embeddings": "embeddings" };
const EXAMPLE = '{"custom_id": "letter-1", "body": {"messages": [{"role": "user", "content": "Summarise this letter: ..."}], "max_tokens": 200}}';

add({
  en: {
    "batches.title": "Batches",
    "batches.off": "Batch jobs are turned off on this server (they need fine-tuning's files API: started with --no-finetune or --no-batch).",
    "batches.intro": "Send many requests at once, for example a summary of each of 500 letters. They run in the background; download the results when the job is done.",
    "batches.new": "New batch job",
    "batches.fileHelp": "A JSONL file: one request per line, each with a custom_id to find its result.",
    "batches.formatTitle": "What should a line look like?",
    "batches.file": "Requests file",
    "batches.noFile": "No requests file yet: upload one above.",
    "batches.endpoint": "Kind of request",
    "batches.endpoint./v1/chat/completions": "Chat answers (/v1/chat/completions)",
    "batches.endpoint./v1/embeddings": "Embeddings (/v1/embeddings)",
    "batches.endpoint./v1/fim/completions": "Code completion (/v1/fim/completions)",
    "batches.endpoint./v1/completions": "Text completion (/v1/completions)",
    "batches.model": "Model",
    "batches.noModel": "No model served here can answer this kind of request.",
    "batches.timeout": "Stop after (hours)",
    "batches.timeoutHint": "From 1 to 168; what is done by then is kept.",
    "batches.more": "More settings",
    "batches.create": "Start the batch",
    "batches.creating": "Starting…",
    "batches.created": "Batch job started.",
    "batches.jobs": "Batch jobs",
    "batches.noJobs": "No batch job yet.",
    "batches.job": "Job",
    "batches.requests": "Requests",
    "batches.counters": "{done} of {total} done · {ok} succeeded · {failed} failed",
    "batches.results": "Results",
    "batches.downloadOutput": "Download results",
    "batches.downloadErrors": "Download errors",
    "batches.cancel": "Cancel",
    "batches.cancelConfirm": "Cancel this batch job? Requests already answered are kept.",
    "batches.status.QUEUED": "Waiting", "batches.status.RUNNING": "Running",
    "batches.status.SUCCESS": "Done", "batches.status.FAILED": "Failed",
    "batches.status.TIMEOUT_EXCEEDED": "Ran out of time", "batches.status.CANCELLATION_REQUESTED": "Cancelling…",
    "batches.status.CANCELLED": "Cancelled",
  },
  fr: {
    "batches.title": "Lots",
    "batches.off": "Les traitements par lots sont désactivés sur ce serveur (ils demandent l'API de fichiers de l'affinage : lancé avec --no-finetune ou --no-batch).",
    "batches.intro": "Envoyez beaucoup de requêtes d'un coup, par exemple le résumé de 500 courriers. Elles tournent en arrière-plan ; téléchargez les résultats quand le lot est fini.",
    "batches.new": "Nouveau lot",
    "batches.fileHelp": "Un fichier JSONL : une requête par ligne, chacune avec un custom_id pour retrouver son résultat.",
    "batches.formatTitle": "À quoi doit ressembler une ligne ?",
    "batches.file": "Fichier de requêtes",
    "batches.noFile": "Aucun fichier de requêtes : envoyez-en un ci-dessus.",
    "batches.endpoint": "Type de requête",
    "batches.endpoint./v1/chat/completions": "Réponses de chat (/v1/chat/completions)",
    "batches.endpoint./v1/embeddings": "Plongements (/v1/embeddings)",
    "batches.endpoint./v1/fim/completions": "Complétion de code (/v1/fim/completions)",
    "batches.endpoint./v1/completions": "Complétion de texte (/v1/completions)",
    "batches.model": "Modèle",
    "batches.noModel": "Aucun modèle servi ici ne traite ce type de requête.",
    "batches.timeout": "Arrêter après (heures)",
    "batches.timeoutHint": "De 1 à 168 ; ce qui est fait d'ici là est gardé.",
    "batches.more": "Plus de réglages",
    "batches.create": "Lancer le lot",
    "batches.creating": "Lancement…",
    "batches.created": "Le lot est lancé.",
    "batches.jobs": "Lots",
    "batches.noJobs": "Aucun lot pour l'instant.",
    "batches.job": "Lot",
    "batches.requests": "Requêtes",
    "batches.counters": "{done} sur {total} traitées · {ok} réussies · {failed} en échec",
    "batches.results": "Résultats",
    "batches.downloadOutput": "Télécharger les résultats",
    "batches.downloadErrors": "Télécharger les erreurs",
    "batches.cancel": "Annuler",
    "batches.cancelConfirm": "Annuler ce lot ? Les requêtes déjà traitées sont gardées.",
    "batches.status.QUEUED": "En attente", "batches.status.RUNNING": "En cours",
    "batches.status.SUCCESS": "Terminé", "batches.status.FAILED": "Échec",
    "batches.status.TIMEOUT_EXCEEDED": "Délai dépassé", "batches.status.CANCELLATION_REQUESTED": "Annulation…",
    "batches.status.CANCELLED": "Annulé",
  },
});

export async function render(root) {
  const info = await api.serverInfo();
  if (!(info.features && info.features.batch)) {
    root.append(h("h1", {}, t("batches.title")), h("p", { class: "warn", role: "status", id: "batches-off" }, t("batches.off")));
    return null;
  }
  const ac = new AbortController();
  let timer = null;
  let gone = false;
  let models = [];
  let inputs = [];
  const urls = [];  // blob: URLs of the downloads, revoked when the page goes
  const saved = new Map();  // `${jobId}:${which}` -> the <span> holding its download link

  root.append(h("h1", {}, t("batches.title")), h("p", { class: "muted" }, t("batches.intro")));
  const top = h("div");
  root.append(top);
  try {
    [models, inputs] = await Promise.all([
      api.get("/v1/models", { signal: ac.signal }).then((r) => r.data),
      listInputs(ac.signal)]);
  } catch (err) {
    if (err.name === "AbortError") return () => {};
    fill(top, errorBox(err));
    return () => ac.abort();
  }

  // -- the new job form
  const fileSel = h("select", { id: "batch-file" });
  const endpoint = h("select", { id: "batch-endpoint" },
    ENDPOINTS.map((e) => h("option", { value: e }, t(`batches.endpoint.${e}`))));
  const model = h("select", { id: "batch-model" });
  const noModel = h("p", { class: "warn" }, t("batches.noModel"));
  const timeout = h("input", { id: "batch-timeout", type: "number", min: 1, max: 168, step: 1, placeholder: "24" });
  const submit = h("button", { type: "submit", id: "batch-create" }, t("batches.create"));
  const problem = h("div", { id: "batch-create-error" });
  const up = uploader({
    purpose: "batch", id: "batch-upload",
    onUploaded: async (made) => { inputs = await listInputs(ac.signal); drawInputs(made.id); },
  });

  function drawInputs(pick) {
    const was = pick || fileSel.value;
    fill(fileSel, inputs.length ? inputs.map((f) => h("option", { value: f.id, selected: f.id === was },
      `${f.filename} · ${num(f.num_lines ?? 0)} · ${f.id.slice(0, 8)}`))
      : h("option", { value: "" }, t("batches.noFile")));
  }

  function drawModels() {
    const need = NEEDS[endpoint.value];
    const fit = models.filter((m) => m.capabilities && m.capabilities[need]);
    const was = model.value;
    fill(model, fit.map((m) => h("option", { value: m.id, selected: m.id === was }, m.id)));
    noModel.hidden = fit.length > 0;
  }
  endpoint.addEventListener("change", drawModels);
  drawInputs();
  drawModels();

  const form = h("form", { class: "stack", id: "batch-form", novalidate: true },
    up.el,
    field(t("batches.file"), fileSel),
    field(t("batches.endpoint"), endpoint),
    field(t("batches.model"), model), noModel,
    h("details", {}, h("summary", {}, t("batches.more")),
      field(t("batches.timeout"), timeout, t("batches.timeoutHint"))),
    problem,
    h("div", { class: "row end" }, submit));

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    fill(problem);
    const body = { input_files: fileSel.value ? [fileSel.value] : [], endpoint: endpoint.value, model: model.value };
    if (timeout.value.trim()) body.timeout_hours = Number(timeout.value);
    submit.disabled = true;
    submit.textContent = t("batches.creating");
    try {
      await api.post("/v1/batch/jobs", body, { signal: ac.signal });
      toast(t("batches.created"), "ok");
      await loadJobs();
    } catch (err) {
      if (err.name === "AbortError") return;
      fill(problem, errorBox(err));
    } finally {
      submit.disabled = false;
      submit.textContent = t("batches.create");
    }
  });

  // -- the jobs
  const jobsBox = h("div", { id: "batch-jobs" });
  root.append(h("div", { class: "split wide-right" },
    h("section", { class: "panel", id: "batch-new-panel" },
      h("h2", {}, t("batches.new")),
      h("p", { class: "muted" }, t("batches.fileHelp")),
      h("details", {}, h("summary", {}, t("batches.formatTitle")), h("pre", {}, EXAMPLE)),
      form),
    h("section", { class: "panel", id: "batch-jobs-panel" },
      h("div", { class: "row" }, h("h2", { class: "grow" }, t("batches.jobs")),
        h("button", { type: "button", class: "secondary", onclick: () => loadJobs() }, t("common.refresh"))),
      jobsBox)));

  /** The span that holds a job file's download link (kept across redraws). */
  function slot(jobId, which) {
    const key = `${jobId}:${which}`;
    if (!saved.has(key)) saved.set(key, h("span", { class: "download-slot" }));
    return saved.get(key);
  }

  async function save(job, which) {
    const fileId = which === "output" ? job.output_file : job.error_file;
    const url = await downloadFile(fileId, slot(job.id, which), `batch-${job.id}-${which}.jsonl`);
    if (url) urls.push(url);
  }

  async function cancel(job) {
    if (!window.confirm(t("batches.cancelConfirm"))) return;
    try {
      await api.post(`/v1/batch/jobs/${encodeURIComponent(job.id)}/cancel`, undefined);
    } catch (err) {
      toast(errorText(err), "error");
    }
    await loadJobs();
  }

  function counters(j) {
    const done = j.completed_requests ?? (j.succeeded_requests + j.failed_requests);
    return h("div", { class: "batch-counters", dataset: { total: j.total_requests, succeeded: j.succeeded_requests,
      failed: j.failed_requests, completed: done } },
    h("progress", { max: Math.max(1, j.total_requests), value: done }),
    h("span", { class: "small" }, t("batches.counters", { done: num(done), total: num(j.total_requests),
      ok: num(j.succeeded_requests), failed: num(j.failed_requests) })));
  }

  function actions(j) {
    return h("div", { class: "stack" },
      j.output_file ? h("div", { class: "row" }, h("button", { type: "button", class: "secondary batch-output",
        onclick: () => save(j, "output") }, t("batches.downloadOutput")), slot(j.id, "output")) : null,
      j.error_file ? h("div", { class: "row" }, h("button", { type: "button", class: "secondary batch-errors",
        onclick: () => save(j, "error") }, t("batches.downloadErrors")), slot(j.id, "error")) : null,
      ["QUEUED", "RUNNING"].includes(j.status) ? h("button", { type: "button", class: "danger batch-cancel",
        onclick: () => cancel(j) }, t("batches.cancel")) : null);
  }

  async function loadJobs() {
    clearTimeout(timer);
    let jobs;
    try {
      jobs = (await api.get("/v1/batch/jobs?page_size=100", { signal: ac.signal })).data;
    } catch (err) {
      if (err.name === "AbortError" || gone) return;
      fill(jobsBox, errorBox(err));
      timer = setTimeout(loadJobs, POLL_MS * 3);
      return;
    }
    if (gone) return;
    fill(jobsBox, table([
      { label: t("batches.job"), cell: (j) => h("div", { class: "batch-job", dataset: { jobId: j.id } },
        h("code", {}, j.id.slice(0, 8)), h("div", { class: "muted small" }, j.model), h("div", { class: "muted small" }, j.endpoint)) },
      { label: t("common.status"), cell: (j) => h("div", {}, statusBadge("batches", j.status, KINDS),
        (j.errors || []).map((e) => h("div", { class: "error small" }, e.count > 1 ? `${e.message} (×${e.count})` : e.message))) },
      { label: t("batches.requests"), cell: counters },
      { label: t("common.created"), cell: (j) => date(j.created_at) },
      { label: t("batches.results"), cell: actions },
    ], jobs, { empty: t("batches.noJobs") }));
    if (jobs.some((j) => ACTIVE.includes(j.status))) timer = setTimeout(loadJobs, POLL_MS);
  }

  await loadJobs();
  return () => {
    gone = true;
    clearTimeout(timer);
    ac.abort();
    up.dispose();
    for (const u of urls) URL.revokeObjectURL(u);
  };
}

async function listInputs(signal) {
  return (await api.get("/v1/files?purpose=batch&sample_type=batch_request&page_size=1000", { signal })).data;
}
