// video-diffusion web page: builds its controls from GET /params, submits async tasks, follows them over
// Server-Sent Events (read with fetch, so an API key can go along; polling if streaming fails), plays results.
"use strict";

const $ = (selector) => document.querySelector(selector);
const RECENT_KEY = "video-diffusion.recent";
const KEY_KEY = "video-diffusion.api-key";
const ADVANCED_KEY = "video-diffusion.advanced-open";
const PHASE_TEXT = { waiting: "Waiting", loading: "Loading the image", denoising: "Denoising",
                     decoding: "Decoding frames", "matching colour": "Matching the segments' colours",
                     looping: "Making the loop", interpolating: "Interpolating frames", retiming: "Dropping frames",
                     encoding: "Encoding the video", done: "Done" };
// Shown up front; every other parameter goes under Advanced.
const BASIC = ["motion_bucket_id", "num_frames", "fps", "seed", "format"];
let current = null;  // {taskId, controller} of the task being followed

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
  const health = await fetch("/health").then((r) => r.json()).catch(() => ({}));
  $("#noise-banner").hidden = !health.noise;
  const response = await api("/params");
  if (response.status === 401) { askForKey(); return; }
  if (!response.ok) { $("#form-error").textContent = (await errorOf(response)).message; return; }
  buildControls((await response.json()).params);
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
  const response = await api("/params");
  if (response.status === 401) { askForKey("That key was not accepted."); return; }
  start();
});

// --- controls, from the parameter schema ----------------------------------------------------------------

function buildControls(params) {
  $("#controls").replaceChildren();
  $("#advanced-controls").replaceChildren();
  const advanced = $("#advanced");
  advanced.open = localStorage.getItem(ADVANCED_KEY) === "open";
  advanced.addEventListener("toggle", () => localStorage.setItem(ADVANCED_KEY, advanced.open ? "open" : "closed"));
  for (const param of params) {
    const box = BASIC.includes(param.name) ? $("#controls") : $("#advanced-controls");
    const field = document.createElement("div");
    field.className = "field";
    const id = `param-${param.name}`;
    const label = Object.assign(document.createElement("label"), { htmlFor: id, textContent: param.name.replaceAll("_", " ") });
    let input;
    if (param.enum) {
      input = document.createElement("select");
      for (const choice of param.enum) input.append(new Option(choice, choice, false, choice === param.default));
    } else {
      input = Object.assign(document.createElement("input"), { type: "number", inputMode: param.type === "integer" ? "numeric" : "decimal" });
      input.min = param.minimum; input.max = param.maximum;
      input.step = param.multipleOf || (param.type === "integer" ? 1 : "any");
      if (param.default !== null) input.value = param.default;
      else input.placeholder = (param.default_text || "").replace(/`/g, "");
    }
    Object.assign(input, { id, name: param.name });
    const help = Object.assign(document.createElement("span"), { className: "help", id: `${id}-help`,
      textContent: `${param.help} ${param.enum ? "" : `(${param.minimum}–${param.maximum})`}`.replace(/`/g, "") });
    const error = Object.assign(document.createElement("p"), { className: "error", role: "alert" });
    error.dataset.errorFor = param.name;
    input.setAttribute("aria-describedby", help.id);
    field.append(label);
    if (param.name === "seed") {
      const row = document.createElement("div");
      row.className = "row";
      const dice = Object.assign(document.createElement("button"), { type: "button", className: "secondary",
        textContent: "Random", title: "Pick a random seed" });
      dice.setAttribute("aria-label", "Random seed");
      dice.addEventListener("click", () => { input.value = Math.floor(Math.random() * 2 ** 32); });
      row.append(input, dice);
      field.append(row);
    } else {
      field.append(input);
    }
    field.append(help, error);
    box.append(field);
  }
}

// --- the image ------------------------------------------------------------------------------------------

function showPreview(file) {
  const preview = $("#preview");
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  $("#drop-help").textContent = `${file.name} — drop or press Enter to change it`;
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
  if (event.dataTransfer.files.length) {
    $("#image").files = event.dataTransfer.files;
    showPreview(event.dataTransfer.files[0]);
  }
});
$("#image").addEventListener("change", () => { if ($("#image").files.length) showPreview($("#image").files[0]); });

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

$("#generate-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  clearErrors();
  const form = new FormData();
  if ($("#image").files.length) form.append("image", $("#image").files[0]);
  for (const input of $("#generate-form").querySelectorAll("#controls input, #controls select, #advanced-controls input, #advanced-controls select")) {
    if (input.value.trim() !== "") form.append(input.name, input.value.trim());
  }
  $("#generate").disabled = true;
  try {
    const response = await api("/generate", { method: "POST", body: form, headers: { Prefer: "respond-async" } });
    if (response.status === 401) { askForKey("The key was not accepted."); return; }
    if (!response.ok) { showError(await errorOf(response)); return; }
    const task = await response.json();
    remember(task);
    follow(task.task_id);
  } catch (error) {
    $("#form-error").textContent = `The server could not be reached (${error.message}).`;
  } finally {
    $("#generate").disabled = false;
  }
});

$("#cancel").addEventListener("click", async () => {
  if (!current) return;
  const response = await api(`/tasks/${current.taskId}`, { method: "DELETE" });
  if (!response.ok && response.status !== 409) $("#form-error").textContent = (await errorOf(response)).message;
  $("#progress-text").textContent = "Canceling…";
});

// --- following a task -----------------------------------------------------------------------------------

async function follow(taskId) {
  if (current) current.controller.abort();
  current = { taskId, controller: new AbortController() };
  $("#progress-card").hidden = false;
  $("#result-card").hidden = true;
  $("#cancel").hidden = false;
  $("#progress").value = 0;
  $("#progress-text").textContent = "Submitted…";
  const mine = current;
  try {
    await followEvents(mine);
  } catch (error) {
    if (mine.controller.signal.aborted) return;
    await followByPolling(mine);  // streaming failed (a proxy that buffers, an old browser): poll instead
  }
}

async function followEvents(mine) {
  const response = await api(`/status/${mine.taskId}/events`, { signal: mine.controller.signal });
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
    const response = await api(`/status/${mine.taskId}`);
    if (!response.ok) { showError(await errorOf(response)); return; }
    if (update(mine, await response.json())) return;
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

// Shows the task's state; returns true once it has ended.
function update(mine, task) {
  if (current !== mine) return true;
  const bar = $("#progress"), text = $("#progress-text"), p = task.progress;
  if (task.status === "queued") {
    bar.value = 2;
    text.textContent = task.queue_position ? `Queued: position ${task.queue_position}` : "Queued";
  } else if (task.status === "started") {
    const fraction = p.total ? p.step / p.total : 0;
    bar.value = { loading: 4, denoising: 5 + 85 * fraction, decoding: 5 + 85 * fraction, encoding: 97 }[p.phase] ?? 94;
    text.textContent = p.phase === "denoising" ? `Denoising: step ${p.step} of ${p.total}` : `${PHASE_TEXT[p.phase] || p.phase}…`;
  } else {
    bar.value = task.status === "finished" ? 100 : bar.value;
    $("#cancel").hidden = true;
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
  const t = task.timings;
  $("#result-info").textContent = `Seed ${task.seed} · ${task.params.width}×${task.params.height}, ${task.params.num_frames} frames at ${task.params.fps} fps · ` +
    `waited ${t.queue_wait.toFixed(1)} s, generated in ${t.generation.toFixed(1)} s, encoded in ${t.encoding.toFixed(2)} s · ${(blob.size / 1024).toFixed(0)} KB`;
  Object.assign($("#download"), { href: url, download: `${task.task_id}.${format === "frames" ? "zip" : format}` });
  $("#result-card").hidden = false;
}

// --- recent tasks (this browser only) -------------------------------------------------------------------

function recent() { try { return JSON.parse(localStorage.getItem(RECENT_KEY)) || []; } catch { return []; } }

function remember(task) {
  const list = recent().filter((t) => t.id !== task.task_id);
  list.unshift({ id: task.task_id, status: task.status, seed: task.seed, format: task.params.format,
                 at: task.created_at });
  localStorage.setItem(RECENT_KEY, JSON.stringify(list.slice(0, 20)));
  renderRecent();
}

function renderRecent() {
  const list = recent(), box = $("#recent");
  box.replaceChildren(...list.map((t) => {
    const item = document.createElement("li");
    const when = new Date(t.at).toLocaleString();
    const label = Object.assign(document.createElement("span"), { textContent: `${when} · ${t.format} · seed ${t.seed} · ${t.status}` });
    const open = Object.assign(document.createElement("button"), { type: "button", className: "secondary", textContent: "Open" });
    open.setAttribute("aria-label", `Open the task of ${when}`);
    open.addEventListener("click", () => follow(t.id));
    item.append(label, open);
    return item;
  }));
  $("#recent-empty").hidden = list.length > 0;
}

start();
