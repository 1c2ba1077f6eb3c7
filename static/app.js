// video-diffusion web page: builds its controls from GET /params, submits async tasks, follows them over
// Server-Sent Events (read with fetch, so an API key can go along; polling if streaming fails), plays results,
// and keeps a history in this browser. No build step, nothing fetched from outside the origin.
"use strict";

const $ = (selector) => document.querySelector(selector);
const RECENT_KEY = "video-diffusion.recent";
const KEY_KEY = "video-diffusion.api-key";
const ADVANCED_KEY = "video-diffusion.advanced-open";
const PHASE_TEXT = { waiting: "Waiting", loading: "Loading the image", denoising: "Denoising",
                     decoding: "Decoding frames", "matching colour": "Matching the segments' colours",
                     looping: "Making the loop", interpolating: "Interpolating frames", retiming: "Dropping frames",
                     encoding: "Encoding the video", done: "Done" };
// Shown up front (with the image); every other parameter goes under Advanced. Only what the served model takes
// comes from /params: an SVD server has motion, a Wan or LTX-Video one a prompt.
const BASIC = ["prompt", "motion_bucket_id", "num_frames", "fps", "seed", "format"];
const LABELS = {
  motion_bucket_id: "Motion amount", fps: "Frames per second", num_frames: "Frames",
  decode_chunk_size: "Frames decoded at once (lower = less GPU memory)", num_inference_steps: "Denoising steps",
  noise_aug_strength: "Departure from the image", min_guidance_scale: "Guidance at the first frame",
  max_guidance_scale: "Guidance at the last frame", seed: "Seed", width: "Width", height: "Height",
  sizing: "Fitting the image", format: "Format", loop: "Loop", output_fps: "Playback rate (fps)",
  segments: "Segments (longer video)", cache_interval: "Reuse deep features every N steps (faster)",
  prompt: "Prompt", negative_prompt: "Negative prompt", guidance_scale: "Prompt guidance",
};
const NO_SLIDER = ["seed", "width", "height", "output_fps"];
let current = null;  // {taskId, controller, started, firstStep} of the task being followed
let schema = [];
let needsKey = false;
const inputs = new Map();  // task id -> the input image's object URL, for before/after

function apiKey() { return sessionStorage.getItem(KEY_KEY) || ""; }

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (apiKey()) headers.set("Authorization", `Bearer ${apiKey()}`);
  return fetch(path, { ...options, headers });
}

async function errorOf(response) {
  try { return (await response.json()).error || { message: response.statusText }; }
  catch { return { message: `${response.status} ${response.statusText}` }; }
}

// --- start-up and the API key ---------------------------------------------------------------------------

async function start() {
  const health = await fetch("health").then((r) => r.json()).catch(() => ({}));
  $("#noise-banner").hidden = !health.noise;
  const response = await api("params");
  if (response.status === 401) { needsKey = true; askForKey(); return; }
  if (!response.ok) { $("#form-error").textContent = (await errorOf(response)).message; return; }
  const described = await response.json();
  schema = described.params;
  showModels(described.models || [], described.model);
  buildControls(schema);
  $("#key-form").hidden = true;
  $("#app").hidden = false;
  renderRecent();
}

function askForKey(message = "") {
  $("#app").hidden = true;
  $("#key-form").hidden = false;
  $("#key-error").textContent = message;
  $("#api-key").focus();
}

$("#key-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY_KEY, $("#api-key").value.trim());
  const response = await api("params");
  if (response.status === 401) { askForKey("That key was not accepted."); return; }
  start();
});

// --- the model, when the server runs several -------------------------------------------------------------

function showModels(models, current) {
  $("#model").replaceChildren(...models.map((name) =>
    Object.assign(document.createElement("option"), { value: name, textContent: name, selected: name === current })));
  $("#model-row").hidden = models.length < 2;
}

$("#model").addEventListener("change", async () => {
  const response = await api(`params?model=${encodeURIComponent($("#model").value)}`);
  if (!response.ok) { $("#form-error").textContent = (await errorOf(response)).message; return; }
  schema = (await response.json()).params;
  buildControls(schema);  // that model's own parameters, defaults and ranges
});

// --- controls, from the parameter schema ----------------------------------------------------------------

function shownDefault(param) {
  if (param.default !== null) return param.default;
  if (param.effective_default !== undefined) return param.effective_default;
  return null;
}

function buildControls(params) {
  $("#controls").replaceChildren();
  $("#advanced-controls").replaceChildren();
  const advanced = $("#advanced");
  advanced.open = localStorage.getItem(ADVANCED_KEY) === "open";
  // Saved at the click itself (the toggle event comes a task later: a reload could beat it), and on every toggle.
  advanced.querySelector("summary").addEventListener("click", () => localStorage.setItem(ADVANCED_KEY, advanced.open ? "closed" : "open"));
  advanced.addEventListener("toggle", () => localStorage.setItem(ADVANCED_KEY, advanced.open ? "open" : "closed"));
  for (const param of params) {
    const box = BASIC.includes(param.name) ? $("#controls") : $("#advanced-controls");
    box.append(buildField(param));
  }
}

function buildField(param) {
  const field = Object.assign(document.createElement("div"), { className: "field" });
  const id = `param-${param.name}`;
  const labelRow = Object.assign(document.createElement("div"), { className: "label-row" });
  const label = Object.assign(document.createElement("label"), { htmlFor: id, textContent: LABELS[param.name] || param.name.replaceAll("_", " ") });
  const apiName = Object.assign(document.createElement("span"), { className: "api-name", textContent: param.name });
  labelRow.append(label, apiName);
  const fallback = shownDefault(param);
  let input, slider = null;
  if (param.enum) {
    input = document.createElement("select");
    for (const choice of param.enum) input.append(new Option(choice, choice, false, choice === param.default));
  } else if (param.type === "string") {
    input = Object.assign(document.createElement("textarea"), { rows: param.name === "prompt" ? 3 : 2,
      maxLength: param.maxLength, value: param.default || "" });
    input.placeholder = param.name === "prompt" ? "A slow pan across the scene, soft light" : "blurry, distorted";
  } else {
    input = Object.assign(document.createElement("input"), { type: "number", inputMode: param.type === "integer" ? "numeric" : "decimal" });
    input.min = param.minimum; input.max = param.maximum;
    input.step = param.step || param.multipleOf || (param.type === "integer" ? 1 : "any");
    if (param.default !== null) input.value = param.default;
    else input.placeholder = param.name === "output_fps" ? "= fps" : (fallback !== null ? String(fallback) : "");
    if (!NO_SLIDER.includes(param.name)) {
      slider = Object.assign(document.createElement("input"), { type: "range", min: param.minimum, max: param.maximum,
        step: param.step || param.multipleOf || (param.type === "integer" ? 1 : (param.maximum - param.minimum) / 100) });
      slider.id = `slider-${param.name}`;
      slider.value = input.value || fallback || param.minimum;
      slider.setAttribute("aria-label", `${LABELS[param.name] || param.name} (slider)`);
      slider.tabIndex = -1;  // the number field is the keyboard's control; the slider is for the pointer
      slider.addEventListener("input", () => { input.value = slider.value; });
      input.addEventListener("input", () => { if (input.value !== "") slider.value = input.value; });
    }
  }
  Object.assign(input, { id, name: param.name });
  const range = param.enum ? "" : param.type === "string" ? ` (at most ${param.maxLength} characters)`
    : ` (${param.minimum}–${param.maximum}${param.step ? `, every ${param.step}th from ${param.minimum}` : ""}${fallback !== null && param.default === null ? `, default ${fallback}` : ""})`;
  const help = Object.assign(document.createElement("span"), { className: "help", id: `${id}-help`,
    textContent: `${param.help}${range}`.replace(/`/g, "") });
  const error = Object.assign(document.createElement("p"), { className: "error", role: "alert" });
  error.dataset.errorFor = param.name;
  input.setAttribute("aria-describedby", help.id);
  field.append(labelRow);
  if (param.name === "seed") {
    const row = Object.assign(document.createElement("div"), { className: "row seed" });
    input.placeholder = "random";
    const dice = Object.assign(document.createElement("button"), { type: "button", className: "secondary",
      textContent: "Random", title: "Pick a random seed" });
    dice.setAttribute("aria-label", "Random seed");
    dice.addEventListener("click", () => { input.value = Math.floor(Math.random() * 2 ** 32); });
    row.append(input, dice);
    field.append(row);
  } else if (slider) {
    const row = Object.assign(document.createElement("div"), { className: "row" });
    row.append(input, slider);
    field.append(row);
  } else {
    field.append(input);
  }
  field.append(help, error);
  return field;
}

function controls() { return [...document.querySelectorAll("#controls [name], #advanced-controls [name]")]; }

function settings() {
  const values = {};
  for (const input of controls()) if (input.value.trim() !== "") values[input.name] = input.value.trim();
  if (!$("#model-row").hidden) values.model = $("#model").value;
  return values;
}

function restore(values) {
  for (const input of controls()) {
    const param = schema.find((p) => p.name === input.name);
    input.value = values[input.name] ?? (param && param.default !== null ? param.default : "");
    input.dispatchEvent(new Event("input"));
  }
}

// --- the image ------------------------------------------------------------------------------------------

function showPreview(file) {
  const preview = $("#preview");
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  $("#drop-help").textContent = `${file.name} — drop or press Enter to change it`;
  // A new image answers whatever was said about the last attempt's image ("no image", "not an image")
  $("#form-error").textContent = "";
  const slot = document.querySelector('[data-error-for="image"]');
  if (slot) slot.textContent = "";
}

function useFile(file) {
  const transfer = new DataTransfer();
  transfer.items.add(file);
  $("#image").files = transfer.files;
  showPreview(file);
}

const drop = $("#drop");
drop.addEventListener("click", () => $("#image").click());
drop.addEventListener("keydown", (event) => {
  if (event.key === "Enter" || event.key === " ") { event.preventDefault(); $("#image").click(); }
});
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  if (event.dataTransfer.files.length) useFile(event.dataTransfer.files[0]);
});
$("#image").addEventListener("change", () => { if ($("#image").files.length) showPreview($("#image").files[0]); });

// --- copy as curl ---------------------------------------------------------------------------------------

function quote(text) { return `'${String(text).replaceAll("'", "'\\''")}'`; }

function curlCommand() {
  const values = settings();
  const file = $("#image").files.length ? $("#image").files[0].name : "input.png";
  const extension = { frames: "zip" }[values.format] || values.format || "mp4";
  const lines = [`curl -X POST ${quote(`${location.origin}/generate`)}`];
  if (needsKey || apiKey()) lines.push(`-H ${quote("Authorization: Bearer YOUR_API_KEY")}`);
  lines.push(`-F ${quote(`image=@${file}`)}`);
  // Text goes as --form-string: curl would read a -F value starting with @ or < as a file.
  for (const [name, value] of Object.entries(values)) {
    const text = schema.find((p) => p.name === name)?.type === "string";
    lines.push(`${text ? "--form-string" : "-F"} ${quote(`${name}=${value}`)}`);
  }
  lines.push(`--output ${quote(`video.${extension}`)}`);
  return lines.join(" \\\n  ");
}

$("#copy-curl").addEventListener("click", async () => {
  const text = curlCommand();
  $("#curl-text").textContent = text;
  $("#curl-box").hidden = false;
  let copied = false;
  try { await navigator.clipboard.writeText(text); copied = true; } catch { /* not allowed here: select it */ }
  $("#curl-note").textContent = copied ? "Copied. Run it where the image is:" : "Select and copy it; run it where the image is:";
});

// --- submitting -----------------------------------------------------------------------------------------

function clearErrors() {
  document.querySelectorAll(".error").forEach((e) => { e.textContent = ""; });
  document.querySelectorAll("[aria-invalid]").forEach((e) => e.removeAttribute("aria-invalid"));
}

function showError(error) {
  const slot = error.field && document.querySelector(`[data-error-for="${error.field}"]`);
  if (slot && $("#advanced").contains(slot)) $("#advanced").open = true;
  (slot || $("#form-error")).textContent = error.message;
  const input = error.field && document.querySelector(`[name="${error.field}"]`);
  if (input) { input.setAttribute("aria-invalid", "true"); input.focus(); }
}

function running(on) {
  $("#generate").disabled = on;
  $("#cancel").hidden = !on;
}

$("#generate-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  if ($("#generate").disabled) return;
  clearErrors();
  const form = new FormData();
  const file = $("#image").files.length ? $("#image").files[0] : null;
  if (file) form.append("image", file);
  const values = settings();
  for (const [name, value] of Object.entries(values)) form.append(name, value);
  running(true);
  try {
    const response = await api("generate", { method: "POST", body: form, headers: { Prefer: "respond-async" } });
    if (response.status === 401) { running(false); askForKey("The key was not accepted."); return; }
    if (!response.ok) { running(false); showError(await errorOf(response)); return; }
    const task = await response.json();
    if (file) inputs.set(task.task_id, URL.createObjectURL(file));
    remember(task, { settings: values, input: file ? await thumbnail(URL.createObjectURL(file), "img") : null });
    follow(task.task_id);
  } catch (error) {
    running(false);
    $("#form-error").textContent = `The server could not be reached (${error.message}).`;
  }
});

async function cancel() {
  if (!current || $("#cancel").hidden) return;
  const response = await api(`tasks/${current.taskId}`, { method: "DELETE" });
  if (!response.ok && response.status !== 409) $("#form-error").textContent = (await errorOf(response)).message;
  $("#progress-text").textContent = "Canceling…";
}
$("#cancel").addEventListener("click", cancel);

document.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey) && !$("#app").hidden) {
    event.preventDefault();
    $("#generate-form").requestSubmit();
  } else if (event.key === "Escape" && current) {
    cancel();
  }
});

// --- following a task -----------------------------------------------------------------------------------

async function follow(taskId) {
  if (current) current.controller.abort();
  current = { taskId, controller: new AbortController(), started: performance.now(), firstStep: null };
  $("#progress-card").hidden = false;
  $("#result-card").hidden = true;
  $("#progress").value = 0;
  $("#progress-text").textContent = "Submitted…";
  $("#progress-time").textContent = "";
  if (window.matchMedia("(max-width: 56rem)").matches) $("#progress-card").scrollIntoView({ behavior: "smooth", block: "start" });
  const mine = current;
  const ticker = setInterval(() => showTime(mine), 1000);
  try {
    await followEvents(mine);
  } catch (error) {
    if (!mine.controller.signal.aborted) await followByPolling(mine);  // a proxy that buffers: poll instead
  } finally {
    clearInterval(ticker);
  }
}

async function followEvents(mine) {
  const response = await api(`status/${mine.taskId}/events`, { signal: mine.controller.signal });
  if (!response.ok || !response.body) throw new Error(`events: ${response.status}`);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (data && update(mine, JSON.parse(data))) return;
    }
  }
  throw new Error("the event stream ended early");
}

async function followByPolling(mine) {
  while (!mine.controller.signal.aborted) {
    const response = await api(`status/${mine.taskId}`);
    if (!response.ok) { showError(await errorOf(response)); running(false); return; }
    if (update(mine, await response.json())) return;
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

function seconds(s) { return s >= 90 ? `${Math.round(s / 60)} min` : `${Math.round(s)} s`; }

function showTime(mine) {
  if (current !== mine || mine.ended) return;
  let text = `Elapsed ${seconds((performance.now() - mine.started) / 1000)}`;
  if (mine.firstStep && mine.lastStep && mine.lastStep.step > mine.firstStep.step && mine.total) {
    const perStep = (mine.lastStep.at - mine.firstStep.at) / (mine.lastStep.step - mine.firstStep.step) / 1000;
    text += ` · about ${seconds(Math.max(0, (mine.total - mine.lastStep.step) * perStep + 1))} left`;
  }
  $("#progress-time").textContent = text;
}

// Shows the task's state; returns true once it has ended.
function update(mine, task) {
  if (current !== mine) return true;
  const bar = $("#progress"), text = $("#progress-text"), p = task.progress;
  running(!["finished", "failed", "canceled"].includes(task.status));
  if (task.status === "queued") {
    bar.value = 2;
    text.textContent = task.queue_position ? `Queued: position ${task.queue_position}` : "Queued";
  } else if (task.status === "started") {
    const fraction = p.total ? p.step / p.total : 0;
    if (["denoising", "decoding"].includes(p.phase) && p.step > 0) {
      const mark = { step: p.step, at: performance.now() };
      mine.firstStep = mine.firstStep || mark;
      mine.lastStep = mark;
      mine.total = p.total;
    }
    bar.value = { loading: 4, denoising: 5 + 85 * fraction, decoding: 5 + 85 * fraction, encoding: 97 }[p.phase] ?? 94;
    text.textContent = p.phase === "denoising" ? `Denoising: step ${p.step} of ${p.total}` : `${PHASE_TEXT[p.phase] || p.phase}…`;
    showTime(mine);
  } else {
    mine.ended = true;
    bar.value = task.status === "finished" ? 100 : bar.value;
    $("#progress-time").textContent = `Took ${seconds((performance.now() - mine.started) / 1000)}`;
    remember(task);
    if (task.status === "finished") { text.textContent = "Done"; showResult(task); }
    else text.textContent = task.status === "canceled" ? "Canceled" : `Failed: ${task.error.message}`;
    return true;
  }
  return false;
}

async function showResult(task) {
  const response = await api(task.result_url);
  if (!response.ok) { $("#progress-text").textContent = (await errorOf(response)).message; return; }
  const blob = await response.blob();
  const url = URL.createObjectURL(blob);
  const format = task.params.format;
  let media;
  if (["mp4", "webm"].includes(format)) {
    media = Object.assign(document.createElement("video"), { src: url, controls: true, loop: true, autoplay: true, muted: true, playsInline: true });
    media.setAttribute("aria-label", "The generated video");
  } else if (format === "frames") {
    media = Object.assign(document.createElement("p"), { textContent: `A ZIP of ${task.result ? task.result.frames : ""} PNG frames: download it below.` });
  } else {
    media = Object.assign(document.createElement("img"), { src: url, alt: "The generated animation" });
  }
  $("#result-media").replaceChildren(media);
  const entry = recent().find((t) => t.id === task.task_id);
  const input = inputs.get(task.task_id) || (entry && entry.input);
  $("#result-input").hidden = !input;
  if (input) $("#result-input").src = input;
  const t = task.timings, fmt = (s) => (s || 0).toFixed(1);
  $("#result-info").textContent = `Seed ${task.seed} · ${task.params.width}×${task.params.height}, ` +
    `${task.result ? task.result.frames : task.params.num_frames} frames at ${task.params.output_fps || task.params.fps} fps · ` +
    `waited ${fmt(t.queue_wait)} s, generated in ${fmt(t.generation)} s, encoded in ${fmt(t.encoding)} s · ${(blob.size / 1024).toFixed(0)} KB` +
    (task.cached ? " · from the cache" : "");
  Object.assign($("#download"), { href: url, download: `${task.task_id}.${format === "frames" ? "zip" : format}` });
  $("#use-as-input").hidden = !["mp4", "webm"].includes(format);
  $("#result-card").hidden = false;
  if (entry && !entry.thumb && format !== "frames") {
    remember(task, { thumb: await thumbnail(url, ["mp4", "webm"].includes(format) ? "video" : "img") });
  }
}

// The last frame of the shown video, as the next input: chain clips by hand.
$("#use-as-input").addEventListener("click", async () => {
  const video = $("#result-media video");
  if (!video) return;
  video.pause();
  await new Promise((resolve) => {
    video.addEventListener("seeked", resolve, { once: true });
    video.currentTime = Math.max(0, video.duration - 0.001);
  });
  const canvas = Object.assign(document.createElement("canvas"), { width: video.videoWidth, height: video.videoHeight });
  canvas.getContext("2d").drawImage(video, 0, 0);
  const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
  useFile(new File([blob], "last-frame.png", { type: "image/png" }));
  $("#drop").scrollIntoView({ block: "nearest" });
});

// A small JPEG of the first frame (a video's) or of an image, made in the browser, for the history.
function thumbnail(url, kind) {
  return new Promise((resolve) => {
    const element = document.createElement(kind);
    const draw = () => {
      const width = element.videoWidth || element.naturalWidth, height = element.videoHeight || element.naturalHeight;
      if (!width) { resolve(null); return; }
      const scale = 128 / Math.max(width, height);
      const canvas = Object.assign(document.createElement("canvas"), { width: Math.round(width * scale), height: Math.round(height * scale) });
      canvas.getContext("2d").drawImage(element, 0, 0, canvas.width, canvas.height);
      resolve(canvas.toDataURL("image/jpeg", 0.75));
    };
    element.addEventListener(kind === "video" ? "loadeddata" : "load", draw, { once: true });
    element.addEventListener("error", () => resolve(null), { once: true });
    if (kind === "video") Object.assign(element, { muted: true, preload: "auto", playsInline: true });
    element.src = url;
  });
}

// --- history (this browser only) ------------------------------------------------------------------------

function recent() { try { return JSON.parse(localStorage.getItem(RECENT_KEY)) || []; } catch { return []; } }

function remember(task, extra = {}) {
  const list = recent();
  const old = list.find((t) => t.id === task.task_id) || {};
  const entry = { ...old, id: task.task_id, status: task.status, seed: task.seed, format: task.params.format,
                  at: task.created_at, ...extra };
  const rest = list.filter((t) => t.id !== task.task_id);
  try { localStorage.setItem(RECENT_KEY, JSON.stringify([entry, ...rest].slice(0, 20))); }
  catch { localStorage.setItem(RECENT_KEY, JSON.stringify([entry, ...rest].slice(0, 5))); }  // storage full
  renderRecent();
}

function renderRecent() {
  const list = recent(), box = $("#recent");
  box.replaceChildren(...list.map((t) => {
    const item = document.createElement("li");
    const when = new Date(t.at).toLocaleString();
    const thumb = Object.assign(document.createElement("img"), { className: "thumb", alt: t.thumb ? "First frame" : "" });
    if (t.thumb || t.input) thumb.src = t.thumb || t.input;
    const label = Object.assign(document.createElement("span"), { className: "what", textContent: `${when} · ${t.format} · seed ${t.seed} · ${t.status}` });
    const open = Object.assign(document.createElement("button"), { type: "button", className: "secondary", textContent: "Open" });
    open.setAttribute("aria-label", `Open the task of ${when}`);
    open.addEventListener("click", () => follow(t.id));
    const reuse = Object.assign(document.createElement("button"), { type: "button", className: "secondary reuse", textContent: "Reuse settings" });
    reuse.setAttribute("aria-label", `Reuse the settings of ${when}`);
    reuse.disabled = !t.settings;
    reuse.addEventListener("click", () => { restore(t.settings || {}); $("#generate").focus(); });
    item.append(thumb, label, open, reuse);
    return item;
  }));
  $("#recent-empty").hidden = list.length > 0;
}

start();
