// The console's only way to the server: souverain's public API, with the tab's API key.
// Every error becomes an ApiError carrying the API's own message (La Plateforme's error body:
// {object, message, type, param, code}), so pages can show it as it is.

const KEY = "souverain.apiKey";

export class ApiError extends Error {
  constructor(status, body, fallback) {
    const message = (body && (typeof body.message === "string" ? body.message
      : body.detail && JSON.stringify(body.detail))) || fallback || `HTTP ${status}`;
    super(message);
    this.status = status;
    this.code = body && body.code;
    this.param = body && body.param;
    this.body = body;
  }
}

let onUnauthorized = null;
/** Called with the ApiError of every 401, e.g. to ask for a key again. */
export function setUnauthorizedHandler(fn) { onUnauthorized = fn; }

export function getKey() { return sessionStorage.getItem(KEY) || ""; }
export function setKey(key) {
  if (key) sessionStorage.setItem(KEY, key); else sessionStorage.removeItem(KEY);
}

export function headers(extra = {}) {
  const h = { ...extra };
  const key = getKey();
  if (key) h["Authorization"] = `Bearer ${key}`;
  return h;
}

async function failure(resp) {
  let body = null;
  const text = await resp.text();
  try { body = JSON.parse(text); } catch { body = null; }
  const err = new ApiError(resp.status, body, text.slice(0, 300) || resp.statusText);
  if (resp.status === 401 && onUnauthorized) onUnauthorized(err);
  return err;
}

/** fetch + the key; JSON in and out; throws ApiError on any status >= 400. */
export async function request(method, path, { json, body, signal, raw } = {}) {
  const init = { method, headers: headers(), signal };
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  } else if (body !== undefined) {
    init.body = body;
  }
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, null, `The server did not answer (${e.message}).`);
  }
  if (!resp.ok) throw await failure(resp);
  if (raw) return resp;
  if (resp.status === 204) return null;
  const type = resp.headers.get("content-type") || "";
  return type.includes("json") ? resp.json() : resp.text();
}

export const get = (path, opts) => request("GET", path, opts);
export const post = (path, json, opts = {}) => request("POST", path, { ...opts, json });
export const patch = (path, json, opts = {}) => request("PATCH", path, { ...opts, json });
export const del = (path, opts) => request("DELETE", path, opts);

/** POST a server-sent-events stream (chat, completions with stream: true): onEvent(obj) for
 *  each `data:` JSON chunk until `[DONE]`. Resolves when the stream ends; abort with signal. */
export async function stream(path, json, onEvent, { signal } = {}) {
  const resp = await request("POST", path, { json, signal, raw: true });
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        const obj = JSON.parse(data);
        if (obj && obj.object === "error") throw new ApiError(500, obj);
        onEvent(obj);
      }
    }
  }
}

/** multipart upload with progress: onProgress(fraction 0..1). XHR, since fetch has no upload
 *  progress. Resolves to the JSON answer; rejects with ApiError. */
export function upload(path, formData, onProgress, { signal } = {}) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", path);
    for (const [k, v] of Object.entries(headers())) xhr.setRequestHeader(k, v);
    xhr.upload.onprogress = (e) => { if (e.lengthComputable && onProgress) onProgress(e.loaded / e.total); };
    xhr.onload = () => {
      let body = null;
      try { body = JSON.parse(xhr.responseText); } catch { body = null; }
      if (xhr.status >= 200 && xhr.status < 300) { resolve(body); return; }
      const err = new ApiError(xhr.status, body, xhr.responseText.slice(0, 300));
      if (xhr.status === 401 && onUnauthorized) onUnauthorized(err);
      reject(err);
    };
    xhr.onerror = () => reject(new ApiError(0, null, "The upload did not reach the server."));
    xhr.onabort = () => reject(new DOMException("aborted", "AbortError"));
    if (signal) signal.addEventListener("abort", () => xhr.abort());
    xhr.send(formData);
  });
}

let healthOnce = null;
/** The server's /health (no key needed), asked once per page load: its `features` say which
 *  optional API families are served ({libraries, fine_tuning, batch}), so a page can say one
 *  is turned off instead of calling a route that is not there. */
export function serverInfo() {
  healthOnce ||= get("/health").catch((e) => { healthOnce = null; throw e; });
  return healthOnce;
}

/** Parse Prometheus text format into [{name, labels, value}] (the /metrics page). */
export function parseMetrics(text) {
  const out = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    if (m[3]) {
      for (const lm of m[3].matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) {
        labels[lm[1]] = lm[2].replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
      }
    }
    out.push({ name: m[1], labels, value: Number(m[4]) });
  }
  return out;
}
