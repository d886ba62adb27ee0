// Fine-tuning: teach a served model from example conversations.
//   #/finetuning           upload training files (POST /v1/files, purpose fine-tune), the files
//                          (GET /v1/files), a new job (POST /v1/fine_tuning/jobs, base models
//                          from GET /v1/models) and the jobs (GET /v1/fine_tuning/jobs).
//   #/finetuning?job=ID    one job (GET /v1/fine_tuning/jobs/ID, polled while it runs): its
//                          status, a live loss curve, what went wrong line by line, the release
//                          gate, checkpoints, events, cancel / start, and its fine-tuned model.
// Where the loss comes from: the job's events ("training-step": {step, loss}, stored every
// couple of seconds; "evaluation": {step, eval_loss} with a validation file) and its
// checkpoints ({step_number, metrics: {train_loss, valid_loss}}).

import * as api from "../api.js";
import { lineChart } from "../chart.js";
import { add, date, num, t } from "../i18n.js";
import { bytes, errorBox, errorText, field, fill, h, table, toast } from "../ui.js";
import { kindText, lineErrors, statusBadge, uploader } from "./jsonl-files.js";

const POLL_MS = 1200;  // a running job
const LIST_POLL_MS = 3000;  // the jobs list while one of them runs
const FINAL = ["SUCCESS", "FAILED", "FAILED_VALIDATION", "CANCELLED"];
const GATE_LIVE = ["pending", "running"];
const KINDS = { ok: ["SUCCESS"], error: ["FAILED", "FAILED_VALIDATION"], warn: ["CANCELLED", "CANCELLATION_REQUESTED"] };
const GATE_KINDS = { ok: ["passed", "overridden"], error: ["failed", "error"], warn: ["pending", "running"] };
const EXAMPLE = '{"messages": [{"role": "user", "content": "What are your opening hours?"}, '
  + '{"role": "assistant", "content": "We are open 8 am to 6 pm, Monday to Friday."}]}';
const POLICY_EXAMPLE = '{"suites": ["safety"], "limit": 40, "thresholds": '
  + '[{"suite": "safety", "metric": "over_refusal_rate", "max": 0.2}]}';

add({
  en: {
    "finetuning.title": "Fine-tuning",
    "finetuning.off": "Fine-tuning is turned off on this server (it was started with --no-finetune).",
    "finetuning.intro": "Teach a model your way of answering: upload example conversations, start a training job, watch it learn, then try the new model in the playground.",
    "finetuning.files": "1. Training files",
    "finetuning.filesHelp": "A JSONL file: one example per line, each a conversation with the answer you want.",
    "finetuning.formatTitle": "What should a line look like?",
    "finetuning.noFiles": "No training file yet: upload one above.",
    "finetuning.new": "2. Start a training job",
    "finetuning.model": "Model to teach",
    "finetuning.noModel": "This server has no model that can be fine-tuned.",
    "finetuning.trainingFiles": "Training files",
    "finetuning.validationFile": "Validation file (optional)",
    "finetuning.validationHint": "Examples kept apart to check the model on data it did not train on.",
    "finetuning.noValidation": "None",
    "finetuning.suffix": "Name for the new model (optional)",
    "finetuning.suffixHint": "Letters, digits, '.', '_' and '-' only; it becomes part of the model's name.",
    "finetuning.steps": "Training steps",
    "finetuning.stepsHint": "Empty: one pass over the data.",
    "finetuning.lr": "Learning rate",
    "finetuning.lrHint": "How big each learning step is (default 0.0001).",
    "finetuning.more": "More settings",
    "finetuning.epochs": "Passes over the data (epochs)",
    "finetuning.epochsHint": "Instead of training steps.",
    "finetuning.weightDecay": "Weight decay",
    "finetuning.warmup": "Warm-up fraction",
    "finetuning.seqLen": "Longest example (tokens)",
    "finetuning.loraRank": "LoRA rank",
    "finetuning.jobType": "Kind of job",
    "finetuning.jobType.completion": "Answers (chat)",
    "finetuning.jobType.classifier": "Classifier (labels)",
    "finetuning.autoStart": "Start training as soon as the data is checked",
    "finetuning.evaluation": "Release gate policy (optional, JSON)",
    "finetuning.evaluationHint": "The new model is served only once an evaluation meets this policy. Example: {example}",
    "finetuning.create": "Start training",
    "finetuning.creating": "Starting…",
    "finetuning.pickFile": "Choose at least one training file.",
    "finetuning.badNumber": "{field} must be a number.",
    "finetuning.badPolicy": "The release gate policy is not valid JSON: {message}",
    "finetuning.jobs": "3. Training jobs",
    "finetuning.noJobs": "No training job yet.",
    "finetuning.job": "Job",
    "finetuning.baseModel": "Base model",
    "finetuning.newModel": "New model",
    "finetuning.open": "Open",
    "finetuning.back": "← All fine-tuning jobs",
    "finetuning.jobTitle": "Training job {name}",
    "finetuning.cancel": "Stop this job",
    "finetuning.cancelConfirm": "Stop this training job? What it learned so far is not kept as a model.",
    "finetuning.start": "Start training",
    "finetuning.progress": "Step {step} of {total}",
    "finetuning.eta": "about {s} s left",
    "finetuning.tokens": "{n} tokens trained",
    "finetuning.waiting": "The curve appears when training starts.",
    "finetuning.noCurve": "No training step was recorded.",
    "finetuning.lossTitle": "Learning curve",
    "finetuning.lossHelp": "The loss says how far the model's answers still are from your examples: lower is better. The validation loss is measured on the validation file.",
    "finetuning.trainLoss": "training loss",
    "finetuning.evalLoss": "validation loss",
    "finetuning.step": "step",
    "finetuning.loss": "loss",
    "finetuning.problems": "What went wrong",
    "finetuning.problemsHelp": "Fix these lines, upload the file again and start a new job.",
    "finetuning.ready": "Your model is ready",
    "finetuning.readyHelp": "Ask it questions in the playground; applications use it under this name:",
    "finetuning.playground": "Open in playground",
    "finetuning.held": "The model is trained but held until the release gate lets it through.",
    "finetuning.gate": "Release gate",
    "finetuning.gateReasons": "Reasons",
    "finetuning.policy": "Policy",
    "finetuning.report": "Evaluation report",
    "finetuning.reportDownload": "Download the evaluation report",
    "finetuning.checkpoints": "Checkpoints",
    "finetuning.cpStep": "Step", "finetuning.cpTrain": "Training loss", "finetuning.cpValid": "Validation loss",
    "finetuning.cpAcc": "Validation accuracy",
    "finetuning.events": "Events",
    "finetuning.evTime": "Time", "finetuning.evWhat": "Event", "finetuning.evDetails": "Details",
    "finetuning.ev.status-updated": "Status", "finetuning.ev.training-step": "Training step",
    "finetuning.ev.evaluation": "Validation", "finetuning.ev.checkpoint": "Checkpoint saved",
    "finetuning.ev.training-done": "Training finished", "finetuning.ev.paused": "Paused",
    "finetuning.ev.worker-lost": "Worker stopped unexpectedly", "finetuning.ev.resume": "Resumed",
    "finetuning.evStep": "step {step} of {total} · loss {loss}",
    "finetuning.evEval": "step {step} · validation loss {loss}",
    "finetuning.evCheckpoint": "step {step} · training loss {loss}",
    "finetuning.settings": "Settings",
    "finetuning.status.QUEUED": "Waiting to start", "finetuning.status.STARTED": "Starting",
    "finetuning.status.VALIDATING": "Checking the data", "finetuning.status.VALIDATED": "Data checked",
    "finetuning.status.RUNNING": "Training", "finetuning.status.FAILED_VALIDATION": "Data refused",
    "finetuning.status.FAILED": "Failed", "finetuning.status.SUCCESS": "Done",
    "finetuning.status.CANCELLED": "Stopped", "finetuning.status.CANCELLATION_REQUESTED": "Stopping…",
    "finetuning.gate.status.pending": "Waiting to be evaluated", "finetuning.gate.status.running": "Being evaluated",
    "finetuning.gate.status.passed": "Passed: the model is served", "finetuning.gate.status.failed": "Held: the policy is not met",
    "finetuning.gate.status.error": "The evaluation could not run", "finetuning.gate.status.overridden": "Released by an administrator",
  },
  fr: {
    "finetuning.title": "Affinage",
    "finetuning.off": "L'affinage est désactivé sur ce serveur (il a été lancé avec --no-finetune).",
    "finetuning.intro": "Apprenez à un modèle votre façon de répondre : envoyez des conversations d'exemple, lancez un entraînement, suivez-le, puis essayez le nouveau modèle dans le bac à sable.",
    "finetuning.files": "1. Fichiers d'entraînement",
    "finetuning.filesHelp": "Un fichier JSONL : un exemple par ligne, chacun une conversation avec la réponse attendue.",
    "finetuning.formatTitle": "À quoi doit ressembler une ligne ?",
    "finetuning.noFiles": "Aucun fichier d'entraînement : envoyez-en un ci-dessus.",
    "finetuning.new": "2. Lancer un entraînement",
    "finetuning.model": "Modèle à entraîner",
    "finetuning.noModel": "Ce serveur n'a aucun modèle qui puisse être affiné.",
    "finetuning.trainingFiles": "Fichiers d'entraînement",
    "finetuning.validationFile": "Fichier de validation (facultatif)",
    "finetuning.validationHint": "Des exemples mis de côté pour vérifier le modèle sur des données qu'il n'a pas apprises.",
    "finetuning.noValidation": "Aucun",
    "finetuning.suffix": "Nom du nouveau modèle (facultatif)",
    "finetuning.suffixHint": "Lettres, chiffres, « . », « _ » et « - » seulement ; il entre dans le nom du modèle.",
    "finetuning.steps": "Étapes d'entraînement",
    "finetuning.stepsHint": "Vide : un passage sur les données.",
    "finetuning.lr": "Taux d'apprentissage",
    "finetuning.lrHint": "La taille de chaque pas d'apprentissage (0,0001 par défaut).",
    "finetuning.more": "Plus de réglages",
    "finetuning.epochs": "Passages sur les données (époques)",
    "finetuning.epochsHint": "À la place des étapes d'entraînement.",
    "finetuning.weightDecay": "Décroissance des poids",
    "finetuning.warmup": "Part d'échauffement",
    "finetuning.seqLen": "Exemple le plus long (jetons)",
    "finetuning.loraRank": "Rang LoRA",
    "finetuning.jobType": "Type d'entraînement",
    "finetuning.jobType.completion": "Réponses (chat)",
    "finetuning.jobType.classifier": "Classifieur (étiquettes)",
    "finetuning.autoStart": "Lancer l'entraînement dès que les données sont vérifiées",
    "finetuning.evaluation": "Politique de mise en service (facultatif, JSON)",
    "finetuning.evaluationHint": "Le nouveau modèle n'est servi qu'après une évaluation conforme à cette politique. Exemple : {example}",
    "finetuning.create": "Lancer l'entraînement",
    "finetuning.creating": "Lancement…",
    "finetuning.pickFile": "Choisissez au moins un fichier d'entraînement.",
    "finetuning.badNumber": "{field} doit être un nombre.",
    "finetuning.badPolicy": "La politique de mise en service n'est pas du JSON valide : {message}",
    "finetuning.jobs": "3. Entraînements",
    "finetuning.noJobs": "Aucun entraînement pour l'instant.",
    "finetuning.job": "Entraînement",
    "finetuning.baseModel": "Modèle de base",
    "finetuning.newModel": "Nouveau modèle",
    "finetuning.open": "Ouvrir",
    "finetuning.back": "← Tous les entraînements",
    "finetuning.jobTitle": "Entraînement {name}",
    "finetuning.cancel": "Arrêter cet entraînement",
    "finetuning.cancelConfirm": "Arrêter cet entraînement ? Ce qu'il a appris jusqu'ici ne sera pas gardé comme modèle.",
    "finetuning.start": "Lancer l'entraînement",
    "finetuning.progress": "Étape {step} sur {total}",
    "finetuning.eta": "environ {s} s restantes",
    "finetuning.tokens": "{n} jetons appris",
    "finetuning.waiting": "La courbe apparaît quand l'entraînement commence.",
    "finetuning.noCurve": "Aucune étape d'entraînement n'a été enregistrée.",
    "finetuning.lossTitle": "Courbe d'apprentissage",
    "finetuning.lossHelp": "La perte mesure l'écart entre les réponses du modèle et vos exemples : plus elle est basse, mieux c'est. La perte de validation est mesurée sur le fichier de validation.",
    "finetuning.trainLoss": "perte d'entraînement",
    "finetuning.evalLoss": "perte de validation",
    "finetuning.step": "étape",
    "finetuning.loss": "perte",
    "finetuning.problems": "Ce qui ne va pas",
    "finetuning.problemsHelp": "Corrigez ces lignes, renvoyez le fichier et lancez un nouvel entraînement.",
    "finetuning.ready": "Votre modèle est prêt",
    "finetuning.readyHelp": "Posez-lui des questions dans le bac à sable ; les applications l'utilisent sous ce nom :",
    "finetuning.playground": "Ouvrir dans le bac à sable",
    "finetuning.held": "Le modèle est entraîné mais retenu jusqu'à ce que la politique de mise en service le laisse passer.",
    "finetuning.gate": "Mise en service",
    "finetuning.gateReasons": "Raisons",
    "finetuning.policy": "Politique",
    "finetuning.report": "Rapport d'évaluation",
    "finetuning.reportDownload": "Télécharger le rapport d'évaluation",
    "finetuning.checkpoints": "Points de sauvegarde",
    "finetuning.cpStep": "Étape", "finetuning.cpTrain": "Perte d'entraînement", "finetuning.cpValid": "Perte de validation",
    "finetuning.cpAcc": "Exactitude de validation",
    "finetuning.events": "Événements",
    "finetuning.evTime": "Heure", "finetuning.evWhat": "Événement", "finetuning.evDetails": "Détails",
    "finetuning.ev.status-updated": "État", "finetuning.ev.training-step": "Étape d'entraînement",
    "finetuning.ev.evaluation": "Validation", "finetuning.ev.checkpoint": "Sauvegarde",
    "finetuning.ev.training-done": "Entraînement fini", "finetuning.ev.paused": "En pause",
    "finetuning.ev.worker-lost": "Arrêt inattendu du processus d'entraînement", "finetuning.ev.resume": "Reprise",
    "finetuning.evStep": "étape {step} sur {total} · perte {loss}",
    "finetuning.evEval": "étape {step} · perte de validation {loss}",
    "finetuning.evCheckpoint": "étape {step} · perte d'entraînement {loss}",
    "finetuning.settings": "Réglages",
    "finetuning.status.QUEUED": "En attente", "finetuning.status.STARTED": "Démarrage",
    "finetuning.status.VALIDATING": "Vérification des données", "finetuning.status.VALIDATED": "Données vérifiées",
    "finetuning.status.RUNNING": "Entraînement", "finetuning.status.FAILED_VALIDATION": "Données refusées",
    "finetuning.status.FAILED": "Échec", "finetuning.status.SUCCESS": "Terminé",
    "finetuning.status.CANCELLED": "Arrêté", "finetuning.status.CANCELLATION_REQUESTED": "Arrêt en cours…",
    "finetuning.gate.status.pending": "En attente d'évaluation", "finetuning.gate.status.running": "Évaluation en cours",
    "finetuning.gate.status.passed": "Réussie : le modèle est servi", "finetuning.gate.status.failed": "Retenu : la politique n'est pas respectée",
    "finetuning.gate.status.error": "L'évaluation n'a pas pu se faire", "finetuning.gate.status.overridden": "Mis en service par un administrateur",
  },
});

export async function render(root, ctx) {
  const info = await api.serverInfo();
  if (!(info.features && info.features.fine_tuning)) {
    root.append(h("h1", {}, t("finetuning.title")), h("p", { class: "warn", role: "status", id: "finetuning-off" }, t("finetuning.off")));
    return null;
  }
  const jobId = ctx.params.get("job");
  return jobId ? renderJob(root, ctx, jobId) : renderOverview(root, ctx);
}

const jobLink = (id) => `#/finetuning?${new URLSearchParams({ job: id })}`;
const playgroundLink = (model) => `#/playground?${new URLSearchParams({ model })}`;
const finite = (x) => typeof x === "number" && Number.isFinite(x);
const fmtLoss = (x) => (finite(x) ? num(x, 4) : "—");

/** The job's status in words, a badge (data-status keeps the API's value). */
const badge = (status) => statusBadge("finetuning", status, KINDS);

/** A job still changing: polled (a trained model's release gate too, until it decides). */
function live(job) {
  return !FINAL.includes(job.status)
    || (job.status === "SUCCESS" && Boolean(job.evaluation && GATE_LIVE.includes(job.evaluation.status)));
}

// -- the overview: files, a new job, the jobs ----------------------------------------------
async function renderOverview(root, ctx) {
  const ac = new AbortController();
  let timer = null;
  let gone = false;
  let files = [];
  let models = [];

  const filesBox = h("div", { id: "ft-files" });
  const jobsBox = h("div", { id: "ft-jobs" });
  const up = uploader({
    purpose: "fine-tune", id: "ft-upload",
    onUploaded: async (made) => { await loadFiles(); form.check(made.id); },
  });

  root.append(h("h1", {}, t("finetuning.title")), h("p", { class: "muted" }, t("finetuning.intro")));
  const offBox = h("div");
  root.append(offBox);

  try {
    [files, models] = await Promise.all([listFiles(ac.signal), api.get("/v1/models", { signal: ac.signal })
      .then((r) => r.data)]);
  } catch (err) {
    if (err.name === "AbortError") return () => {};
    fill(offBox, errorBox(err));
    return () => ac.abort();
  }

  const form = jobForm(ctx, models);
  root.append(h("div", { class: "grid" },
    h("section", { class: "panel", id: "ft-files-panel" },
      h("h2", {}, t("finetuning.files")),
      h("p", { class: "muted" }, t("finetuning.filesHelp")),
      h("details", {}, h("summary", {}, t("finetuning.formatTitle")), h("pre", {}, EXAMPLE)),
      up.el, filesBox),
    h("section", { class: "panel", id: "ft-new-panel" }, h("h2", {}, t("finetuning.new")), form.el)),
  h("section", { class: "panel", id: "ft-jobs-panel" },
    h("div", { class: "row" }, h("h2", { class: "grow" }, t("finetuning.jobs")),
      h("button", { type: "button", class: "secondary", onclick: () => loadJobs() }, t("common.refresh"))),
    jobsBox));

  function drawFiles() {
    fill(filesBox, table([
      { label: t("common.name"), cell: (f) => h("div", {}, f.filename, h("div", { class: "muted small", title: f.id }, f.id.slice(0, 8))) },
      { label: t("files.lines"), cell: (f) => num(f.num_lines ?? 0) },
      { label: t("files.kind"), cell: (f) => kindText(f.sample_type) },
      { label: t("files.size"), cell: (f) => bytes(f.bytes) },
      { label: t("files.uploadedAt"), cell: (f) => date(f.created_at) },
      { label: "", cell: (f) => h("button", { type: "button", class: "secondary small-button", onclick: () => removeFile(f) }, t("common.delete")) },
    ], files, { empty: t("finetuning.noFiles") }));
    form.setFiles(files);
  }

  async function loadFiles() {
    try {
      files = await listFiles(ac.signal);
      drawFiles();
    } catch (err) {
      if (err.name !== "AbortError") fill(filesBox, errorBox(err));
    }
  }

  async function removeFile(f) {
    if (!window.confirm(t("files.deleteConfirm", { name: f.filename }))) return;
    try {
      await api.del(`/v1/files/${encodeURIComponent(f.id)}`);
      toast(t("files.deleted", { name: f.filename }), "ok");
      await loadFiles();
    } catch (err) {
      toast(errorText(err), "error");
    }
  }

  async function loadJobs() {
    clearTimeout(timer);
    let jobs;
    try {
      jobs = (await api.get("/v1/fine_tuning/jobs?page_size=100", { signal: ac.signal })).data;
    } catch (err) {
      if (err.name === "AbortError") return;
      fill(jobsBox, errorBox(err));
      return;
    }
    if (gone) return;
    fill(jobsBox, table([
      { label: t("finetuning.job"), cell: (j) => h("a", { href: jobLink(j.id), class: "ft-job-link" }, j.suffix || j.id.slice(0, 8)) },
      { label: t("finetuning.baseModel"), cell: (j) => j.model },
      { label: t("common.status"), cell: (j) => badge(j.status) },
      { label: t("finetuning.newModel"), cell: (j) => (j.fine_tuned_model ? h("code", {}, j.fine_tuned_model) : "—") },
      { label: t("common.created"), cell: (j) => date(j.created_at) },
      { label: "", cell: (j) => h("a", { href: jobLink(j.id) }, t("finetuning.open")) },
    ], jobs, { empty: t("finetuning.noJobs") }));
    if (jobs.some((j) => !FINAL.includes(j.status))) timer = setTimeout(loadJobs, LIST_POLL_MS);
  }

  drawFiles();
  await loadJobs();
  return () => { gone = true; clearTimeout(timer); ac.abort(); up.dispose(); form.dispose(); };
}

async function listFiles(signal) {
  return (await api.get("/v1/files?purpose=fine-tune&page_size=1000", { signal })).data;
}

/** The new-job form: {el, setFiles(files), check(fileId), dispose}. */
function jobForm(ctx, models) {
  const bases = models.filter((m) => m.capabilities && m.capabilities.fine_tuning);
  const classifierBases = models.filter((m) => m.capabilities && (m.capabilities.fine_tuning || m.capabilities.embeddings));
  const model = h("select", { id: "ft-model" });
  const jobType = h("select", { id: "ft-type" },
    h("option", { value: "completion" }, t("finetuning.jobType.completion")),
    h("option", { value: "classifier" }, t("finetuning.jobType.classifier")));
  const training = h("div", { class: "ft-training-files", id: "ft-training", role: "group" });
  const validation = h("select", { id: "ft-validation" });
  const suffix = h("input", { id: "ft-suffix", type: "text", maxlength: 40, autocomplete: "off", spellcheck: "false" });
  const steps = h("input", { id: "ft-steps", type: "number", min: 1, step: 1, inputmode: "numeric" });
  const lr = h("input", { id: "ft-lr", type: "number", min: 0, step: "any", value: "0.0001" });
  const epochs = h("input", { id: "ft-epochs", type: "number", min: 0, step: "any" });
  const wd = h("input", { id: "ft-weight-decay", type: "number", min: 0, step: "any", placeholder: "0.1" });
  const warmup = h("input", { id: "ft-warmup", type: "number", min: 0, max: 0.99, step: "any", placeholder: "0.05" });
  const seqLen = h("input", { id: "ft-seq-len", type: "number", min: 16, step: 1 });
  const rank = h("input", { id: "ft-lora-rank", type: "number", min: 1, step: 1, placeholder: "16" });
  const autoStart = h("input", { id: "ft-auto-start", type: "checkbox", checked: true });
  const policy = h("textarea", { id: "ft-evaluation", class: "code", rows: 3, spellcheck: "false", placeholder: POLICY_EXAMPLE });
  const submit = h("button", { type: "submit", id: "ft-create" }, t("finetuning.create"));
  const problem = h("div", { id: "ft-create-error" });
  const noModel = h("p", { class: "warn" }, t("finetuning.noModel"));
  let files = [];
  let sending = null;

  function drawModels() {
    const list = jobType.value === "classifier" ? classifierBases : bases;
    const was = model.value;
    fill(model, list.map((m) => h("option", { value: m.id, selected: m.id === was }, m.id)));
    noModel.hidden = list.length > 0;
  }
  jobType.addEventListener("change", drawModels);
  drawModels();

  const el = h("form", { class: "stack", id: "ft-form", novalidate: true },
    noModel,
    field(t("finetuning.model"), model),
    h("div", { class: "field" }, h("span", {}, t("finetuning.trainingFiles")), training),
    field(t("finetuning.validationFile"), validation, t("finetuning.validationHint")),
    h("div", { class: "grid tight" },
      field(t("finetuning.steps"), steps, t("finetuning.stepsHint")),
      field(t("finetuning.lr"), lr, t("finetuning.lrHint"))),
    field(t("finetuning.suffix"), suffix, t("finetuning.suffixHint")),
    h("details", { class: "ft-more" }, h("summary", {}, t("finetuning.more")),
      h("div", { class: "grid tight" },
        field(t("finetuning.epochs"), epochs, t("finetuning.epochsHint")),
        field(t("finetuning.weightDecay"), wd),
        field(t("finetuning.warmup"), warmup),
        field(t("finetuning.seqLen"), seqLen),
        field(t("finetuning.loraRank"), rank),
        field(t("finetuning.jobType"), jobType)),
      h("label", { class: "row check" }, autoStart, h("span", {}, t("finetuning.autoStart"))),
      field(t("finetuning.evaluation"), policy, t("finetuning.evaluationHint", { example: POLICY_EXAMPLE }))),
    problem,
    h("div", { class: "row end" }, submit));

  function setFiles(list) {
    files = list.filter((f) => f.purpose === "fine-tune");
    const checked = new Set([...training.querySelectorAll("input:checked")].map((i) => i.value));
    fill(training, files.length ? files.map((f) => h("label", { class: "row check" },
      h("input", { type: "checkbox", name: "training", value: f.id, checked: checked.has(f.id) }),
      h("span", {}, f.filename, " ", h("span", { class: "muted" }, `(${num(f.num_lines ?? 0)} · ${kindText(f.sample_type)})`))))
      : h("p", { class: "muted" }, t("finetuning.noFiles")));
    const was = validation.value;
    fill(validation, h("option", { value: "" }, t("finetuning.noValidation")),
      files.map((f) => h("option", { value: f.id, selected: f.id === was }, `${f.filename} · ${f.id.slice(0, 8)}`)));
  }

  function check(fileId) {
    const box = training.querySelector(`input[value="${CSS.escape(fileId)}"]`);
    if (box) box.checked = true;
  }

  /** A number field: undefined when empty, an Error naming the field when not a number. */
  function number(input, label) {
    const raw = input.value.trim();
    if (raw === "") return undefined;
    const n = Number(raw.replace(",", "."));
    if (!Number.isFinite(n)) throw new Error(t("finetuning.badNumber", { field: label }));
    return n;
  }

  el.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    fill(problem);
    const ids = [...training.querySelectorAll("input:checked")].map((i) => i.value);
    let body;
    try {
      if (!ids.length) throw new Error(t("finetuning.pickFile"));
      const hp = {
        training_steps: number(steps, t("finetuning.steps")),
        learning_rate: number(lr, t("finetuning.lr")),
        epochs: number(epochs, t("finetuning.epochs")),
        weight_decay: number(wd, t("finetuning.weightDecay")),
        warmup_fraction: number(warmup, t("finetuning.warmup")),
        seq_len: number(seqLen, t("finetuning.seqLen")),
        lora_rank: number(rank, t("finetuning.loraRank")),
      };
      body = {
        model: model.value,
        training_files: ids.map((id) => ({ file_id: id, weight: 1 })),
        hyperparameters: Object.fromEntries(Object.entries(hp).filter(([, v]) => v !== undefined)),
        auto_start: autoStart.checked,
      };
      if (validation.value) body.validation_files = [validation.value];
      if (suffix.value.trim()) body.suffix = suffix.value.trim();
      if (jobType.value === "classifier") body.job_type = "classifier";
      if (policy.value.trim()) {
        try { body.evaluation = JSON.parse(policy.value); } catch (e) {
          throw new Error(t("finetuning.badPolicy", { message: e.message }));
        }
      }
    } catch (err) {
      fill(problem, errorBox(err));
      return;
    }
    submit.disabled = true;
    submit.textContent = t("finetuning.creating");
    sending = new AbortController();
    try {
      const job = await api.post("/v1/fine_tuning/jobs", body, { signal: sending.signal });
      ctx.go("finetuning", { job: job.id });
    } catch (err) {
      if (err.name === "AbortError") return;
      fill(problem, errorBox(err));
      submit.disabled = false;
      submit.textContent = t("finetuning.create");
    }
  });

  return { el, setFiles, check, dispose: () => { if (sending) sending.abort(); } };
}

// -- one job -------------------------------------------------------------------------------
/** {train: [[step, loss]], evals: [[step, loss]]} from the job's events and checkpoints. */
export function lossPoints(job) {
  const train = new Map();
  const evals = new Map();
  for (const e of job.events || []) {
    const d = e.data || {};
    if (!finite(d.step)) continue;
    if (e.name === "training-step" && finite(d.loss)) train.set(d.step, d.loss);
    else if (e.name === "evaluation" && finite(d.eval_loss)) evals.set(d.step, d.eval_loss);
    else if (e.name === "checkpoint") {
      if (finite(d.train_loss) && !train.has(d.step)) train.set(d.step, d.train_loss);
      if (finite(d.valid_loss) && !evals.has(d.step)) evals.set(d.step, d.valid_loss);
    } else if (e.name === "training-done" && finite(d.loss) && !train.has(d.step)) train.set(d.step, d.loss);
  }
  for (const c of job.checkpoints || []) {
    const m = c.metrics || {};
    if (finite(m.train_loss) && !train.has(c.step_number)) train.set(c.step_number, m.train_loss);
    if (finite(m.valid_loss) && !evals.has(c.step_number)) evals.set(c.step_number, m.valid_loss);
  }
  const sorted = (m) => [...m.entries()].sort((a, b) => a[0] - b[0]);
  return { train: sorted(train), evals: sorted(evals) };
}

function eventDetails(e) {
  const d = e.data || {};
  switch (e.name) {
    case "status-updated":
      return [t(`finetuning.status.${d.status}`), d.fine_tuned_model ? ` · ${d.fine_tuned_model}` : ""].join("");
    case "training-step":
      return t("finetuning.evStep", { step: d.step, total: d.total_steps ?? "?", loss: fmtLoss(d.loss) });
    case "evaluation":
      return t("finetuning.evEval", { step: d.step, loss: fmtLoss(d.eval_loss) });
    case "checkpoint":
      return t("finetuning.evCheckpoint", { step: d.step, loss: fmtLoss(d.train_loss) });
    case "training-done":
      return [t("finetuning.evCheckpoint", { step: d.step, loss: fmtLoss(d.loss) }),
        finite(d.eval_loss) ? ` · ${t("finetuning.evalLoss")} ${fmtLoss(d.eval_loss)}` : ""].join("");
    default: {
      if (Array.isArray(d.reasons) && d.reasons.length) return d.reasons.join(" ");
      const text = JSON.stringify(d);
      return text === "{}" ? "" : (text.length > 240 ? `${text.slice(0, 240)}…` : text);
    }
  }
}

function eventName(name) {
  const key = `finetuning.ev.${name}`;
  const s = t(key);
  if (s !== key) return s;
  if (name.startsWith("evaluation-")) return `${t("finetuning.gate")} · ${name.slice(11)}`;
  return name;
}

async function renderJob(root, ctx, id) {
  const ac = new AbortController();
  let timer = null;
  let gone = false;
  let shownPoints = "";
  const urls = [];

  const title = h("h1", {}, t("finetuning.jobTitle", { name: id.slice(0, 8) }));
  const head = h("div", { class: "panel", id: "ft-job-head" });
  const problems = h("div", { id: "ft-job-problems" });
  const result = h("div", { id: "ft-job-result" });
  const gate = h("div", { id: "ft-job-gate" });
  const chartBox = h("div", { id: "ft-loss-chart", class: "ft-chart" }, h("p", { class: "muted" }, t("common.loading")));
  const cpBox = h("div", { id: "ft-checkpoints" });
  const evBox = h("div", { id: "ft-events", class: "ft-events" });
  const pollError = h("div", { id: "ft-poll-error" });

  root.append(h("p", {}, h("a", { href: "#/finetuning", id: "ft-back" }, t("finetuning.back"))),
    title, pollError, head, problems, result, gate,
    h("section", { class: "panel" }, h("h2", {}, t("finetuning.lossTitle")),
      h("p", { class: "muted" }, t("finetuning.lossHelp")), chartBox),
    h("div", { class: "grid" },
      h("section", { class: "panel" }, h("h2", {}, t("finetuning.checkpoints")), cpBox),
      h("section", { class: "panel" }, h("h2", {}, t("finetuning.events")), evBox)));

  async function act(path, confirmText) {
    if (confirmText && !window.confirm(confirmText)) return;
    try {
      await api.post(`/v1/fine_tuning/jobs/${encodeURIComponent(id)}/${path}`, undefined);
    } catch (err) {
      toast(errorText(err), "error");
    }
    await tick();
  }

  function drawHead(job) {
    const steps = (job.events || []).filter((e) => e.name === "training-step");
    const last = steps.length ? steps[steps.length - 1].data : null;
    const running = job.status === "RUNNING" && last && finite(last.total_steps);
    const hp = job.hyperparameters || {};
    fill(head,
      h("div", { class: "row" },
        h("span", { id: "ft-job-status" }, badge(job.status)),
        h("span", { class: "muted" }, `${t("finetuning.baseModel")}: `, h("strong", {}, job.model)),
        h("span", { class: "muted" }, `${t("common.created")}: ${date(job.created_at)}`),
        h("span", { class: "grow" }),
        !FINAL.includes(job.status) && job.status !== "CANCELLATION_REQUESTED"
          ? h("button", { type: "button", class: "danger", id: "ft-cancel",
            onclick: () => act("cancel", t("finetuning.cancelConfirm")) }, t("finetuning.cancel")) : null,
        job.status === "VALIDATED" && !job.auto_start
          ? h("button", { type: "button", id: "ft-start", onclick: () => act("start") }, t("finetuning.start")) : null),
      running ? h("div", { class: "ft-progress" },
        h("progress", { max: last.total_steps, value: last.step }),
        h("span", { class: "muted" }, t("finetuning.progress", { step: num(last.step), total: num(last.total_steps) }),
          finite(last.eta_s) ? ` · ${t("finetuning.eta", { s: num(Math.ceil(last.eta_s)) })}` : "")) : null,
      job.trained_tokens ? h("p", { class: "muted" }, t("finetuning.tokens", { n: num(job.trained_tokens) })) : null,
      h("details", {}, h("summary", {}, t("finetuning.settings")),
        h("dl", { class: "kv" }, Object.entries(hp).filter(([, v]) => v !== null && v !== undefined)
          .flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, String(v))]),
        h("dt", {}, "id"), h("dd", {}, h("code", {}, job.id)),
        job.suffix ? [h("dt", {}, "suffix"), h("dd", {}, job.suffix)] : null,
        h("dt", {}, "training_files"), h("dd", {}, (job.training_files || []).join(", ")),
        (job.validation_files || []).length ? [h("dt", {}, "validation_files"), h("dd", {}, job.validation_files.join(", "))] : null)));
  }

  function drawProblems(job) {
    if (!["FAILED", "FAILED_VALIDATION"].includes(job.status)) { fill(problems); return; }
    const failed = (job.events || []).filter((e) => e.name === "status-updated" && e.data && e.data.status === job.status);
    const listed = failed.length && Array.isArray(failed[failed.length - 1].data.errors) ? failed[failed.length - 1].data.errors : null;
    fill(problems, h("section", { class: "panel error-panel", role: "alert" },
      h("h2", {}, t("finetuning.problems")),
      listed && listed.length ? lineErrors(listed) : h("p", { class: "error" }, job.error || t(`finetuning.status.${job.status}`)),
      job.status === "FAILED_VALIDATION" ? h("p", { class: "muted" }, t("finetuning.problemsHelp")) : null));
  }

  function drawResult(job) {
    if (job.status !== "SUCCESS" || !job.fine_tuned_model) { fill(result); return; }
    const held = job.evaluation && !["passed", "overridden"].includes(job.evaluation.status);
    fill(result, h("section", { class: "panel ft-ready" },
      h("h2", {}, t("finetuning.ready")),
      h("p", {}, t("finetuning.readyHelp")),
      h("p", {}, h("code", { id: "ft-model-name" }, job.fine_tuned_model)),
      held ? h("p", { class: "warn" }, t("finetuning.held"))
        : h("a", { href: playgroundLink(job.fine_tuned_model), class: "button", id: "ft-open-playground" }, t("finetuning.playground"))));
  }

  function drawGate(job) {
    const ev = job.evaluation;
    // a job that ended without a model has nothing to evaluate (its gate stays "pending")
    if (!ev || (FINAL.includes(job.status) && job.status !== "SUCCESS")) { fill(gate); return; }
    const report = h("span");
    fill(gate, h("section", { class: "panel", id: "ft-gate" },
      h("h2", {}, t("finetuning.gate")),
      h("p", {}, statusBadge("finetuning.gate", ev.status, GATE_KINDS)),
      ev.reasons && ev.reasons.length ? [h("h3", {}, t("finetuning.gateReasons")),
        h("ul", {}, ev.reasons.map((r) => h("li", {}, r)))] : null,
      ev.report_url ? h("p", { class: "row" },
        // a plain link works where no key is needed; with a key, fetch it and save it
        api.getKey() ? null : h("a", { href: ev.report_url, target: "_blank", rel: "noopener" }, t("finetuning.report")),
        h("button", { type: "button", class: "secondary", onclick: () => saveReport(ev.report_url, report) }, t("finetuning.reportDownload")),
        report) : null,
      h("details", {}, h("summary", {}, t("finetuning.policy")), h("pre", {}, JSON.stringify(ev.policy, null, 2)))));
  }

  async function saveReport(url, where) {
    try {
      const resp = await api.get(url, { raw: true });
      const blobUrl = URL.createObjectURL(await resp.blob());
      urls.push(blobUrl);
      const link = h("a", { href: blobUrl, download: `evaluation-${id.slice(0, 8)}.html` }, t("files.save", { name: `evaluation-${id.slice(0, 8)}.html` }));
      fill(where, link);
      link.click();
    } catch (err) {
      fill(where, h("span", { class: "error" }, errorText(err)));
    }
  }

  function drawChart(job) {
    const { train, evals } = lossPoints(job);
    const n = train.length + evals.length;
    const key = `${n}:${FINAL.includes(job.status)}`;
    if (key === shownPoints) return;  // nothing new: keep the drawn one
    shownPoints = key;
    const series = [{ name: t("finetuning.trainLoss"), points: train }];
    if (evals.length) series.push({ name: t("finetuning.evalLoss"), points: evals });
    // (an empty chart stays in the page, hidden, with its data-points="0")
    chartBox.classList.toggle("empty", n === 0);
    fill(chartBox, lineChart({ series, xLabel: t("finetuning.step"), yLabel: t("finetuning.loss"), yMin: 0 }),
      n ? null : h("p", { class: "muted" }, t(FINAL.includes(job.status) ? "finetuning.noCurve" : "finetuning.waiting")));
  }

  function drawCheckpoints(job) {
    fill(cpBox, table([
      { label: t("finetuning.cpStep"), cell: (c) => num(c.step_number) },
      { label: t("finetuning.cpTrain"), cell: (c) => fmtLoss(c.metrics.train_loss) },
      { label: t("finetuning.cpValid"), cell: (c) => fmtLoss(c.metrics.valid_loss) },
      { label: t("finetuning.cpAcc"), cell: (c) => (finite(c.metrics.valid_mean_token_accuracy) ? num(c.metrics.valid_mean_token_accuracy, 3) : "—") },
      { label: t("common.created"), cell: (c) => date(c.created_at) },
    ], job.checkpoints || []));
  }

  function drawEvents(job) {
    const events = (job.events || []).slice(-300).reverse();  // newest first
    fill(evBox, table([
      { label: t("finetuning.evTime"), cell: (e) => date(e.created_at) },
      { label: t("finetuning.evWhat"), cell: (e) => eventName(e.name) },
      { label: t("finetuning.evDetails"), cell: (e) => eventDetails(e) },
    ], events));
  }

  async function tick() {
    clearTimeout(timer);
    let job;
    try {
      job = await api.get(`/v1/fine_tuning/jobs/${encodeURIComponent(id)}`, { signal: ac.signal });
    } catch (err) {
      if (err.name === "AbortError" || gone) return;
      fill(pollError, errorBox(err));
      // a passing trouble (busy database, a restart): try again; a missing job: stop
      if (err.status !== 404 && err.status !== 403) timer = setTimeout(tick, POLL_MS * 3);
      return;
    }
    if (gone) return;
    fill(pollError);
    title.textContent = t("finetuning.jobTitle", { name: job.suffix || job.id.slice(0, 8) });
    drawHead(job);
    drawProblems(job);
    drawResult(job);
    drawGate(job);
    drawChart(job);
    drawCheckpoints(job);
    drawEvents(job);
    if (live(job)) timer = setTimeout(tick, POLL_MS);
  }

  await tick();
  return () => {
    gone = true;
    clearTimeout(timer);
    ac.abort();
    for (const u of urls) URL.revokeObjectURL(u);
  };
}
