// The chat page: OpenAI chat completions with stream: true, read with fetch + ReadableStream.
// No framework and no build step. The whole conversation lives in `history` (OpenAI
// messages) and is sent again each turn; the server's feature cache makes resent images cheap.
// A message may carry several images (they go before its text, in the order they were
// added), and every turn may add more: all of them count against the model's context.
"use strict";

const MAX_IMAGE_BYTES = 20 * 1024 * 1024;
const KEY_STORAGE = "fastvlm.apiKey";
const $ = (id) => document.getElementById(id);

const state = { history: [], images: [], model: null, controller: null };

// ---- small helpers ------------------------------------------------------------------

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

function showError(message) {
  $("error").textContent = message || "";
  $("error").hidden = !message;
}

function setBusy(busy) {
  document.body.dataset.state = busy ? "streaming" : "idle";
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return `${response.status}: ${body.error.message}`;
  } catch (_) { /* not JSON */ }
  return `${response.status} ${response.statusText}`;
}

function addMessage(role, text, imageUrls = []) {
  const el = document.createElement("div");
  el.className = `msg ${role}`;
  if (imageUrls.length) {
    const strip = document.createElement("div");
    strip.className = "images";
    for (const url of imageUrls) {
      const img = document.createElement("img");
      img.src = url;
      img.alt = "attached image";
      strip.appendChild(img);
    }
    el.appendChild(strip);
  }
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  el.appendChild(body);
  $("log").appendChild(el);
  el.scrollIntoView({ block: "end" });
  return body;
}

// ---- the model name and the API key ---------------------------------------------------

async function loadModel() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (response.status === 401) {
    $("settings").open = true;
    $("model-name").textContent = "(API key needed)";
    throw new Error("This server needs an API key: enter it under Settings.");
  }
  if (!response.ok) throw new Error(await errorMessage(response));
  const body = await response.json();
  state.model = body.data[0].id;
  $("model-name").textContent = state.model;
}

// ---- the attached images --------------------------------------------------------------

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result); // a data:image/...;base64, URI
    reader.onerror = () => reject(new Error(`Cannot read ${file.name}.`));
    reader.readAsDataURL(file);
  });
}

// Read one file after another, so the images keep the order in which they were chosen.
async function addImages(files) {
  showError("");
  for (const file of files) {
    if (!file) continue;
    if (!file.type.startsWith("image/")) { showError(`${file.name} is not an image.`); continue; }
    if (file.size > MAX_IMAGE_BYTES) { showError(`${file.name} is larger than 20 MB.`); continue; }
    try {
      state.images.push(await readAsDataURL(file));
    } catch (err) {
      showError(err.message);
    }
  }
  showPreviews();
}

function showPreviews() {
  const thumbs = state.images.map((url, i) => {
    const img = document.createElement("img");
    img.src = url;
    img.alt = `image ${i + 1}`;
    img.title = "Click to remove";
    img.addEventListener("click", () => { state.images.splice(i, 1); showPreviews(); });
    return img;
  });
  $("previews").replaceChildren(...thumbs);
  const any = thumbs.length > 0;
  $("previews").hidden = !any;
  $("clear-image").hidden = !any;
  $("clear-image").textContent = thumbs.length > 1 ? `Remove ${thumbs.length} images` : "Remove image";
  $("drop-hint").hidden = any;
  $("image-input").value = ""; // choosing the same file again still fires "change"
}

function clearImages() {
  state.images = [];
  showPreviews();
}

// ---- server-sent events ---------------------------------------------------------------

// Yields the JSON payload of each `data:` event until `data: [DONE]`.
async function* sseEvents(stream) {
  const reader = stream.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trimStart())
        .join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

function showStats(t0, tFirst, tLast, tokens) {
  if (tFirst === null) return;
  const parts = [`TTFT ${Math.round(tFirst - t0)} ms`];
  const seconds = (tLast - tFirst) / 1000;
  if (tokens > 1 && seconds > 0) parts.push(`${((tokens - 1) / seconds).toFixed(1)} tokens/s`);
  parts.push(`${tokens} tokens`);
  $("stats").textContent = parts.join(" · ");
}

// ---- one turn -------------------------------------------------------------------------

async function send(event) {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text && !state.images.length) return;
  showError("");
  try {
    if (!state.model) await loadModel();
  } catch (err) {
    return showError(err.message);
  }
  const images = state.images;
  const content = images.length
    ? [...images.map((url) => ({ type: "image_url", image_url: { url } })), { type: "text", text }]
    : text;
  const userMessage = { role: "user", content };
  addMessage("user", text, images);
  $("prompt").value = "";
  clearImages();

  const bubble = addMessage("assistant", "");
  bubble.parentElement.classList.add("streaming");
  setBusy(true);
  state.controller = new AbortController();
  const t0 = performance.now();
  let tFirst = null, tLast = null, pieces = 0, usage = null, answer = "";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      signal: state.controller.signal,
      body: JSON.stringify({
        model: state.model,
        messages: [...state.history, userMessage],
        stream: true,
        stream_options: { include_usage: true },
        max_tokens: Number($("max-tokens").value) || 256,
        temperature: Number($("temperature").value) || 0,
      }),
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const data of sseEvents(response.body)) {
      if (data.error) throw new Error(data.error.message);
      if (data.usage) usage = data.usage;
      const delta = data.choices && data.choices[0] && data.choices[0].delta.content;
      if (!delta) continue;
      tLast = performance.now();
      if (tFirst === null) tFirst = tLast;
      answer += delta;
      pieces += 1;
      bubble.textContent = answer;
      bubble.parentElement.scrollIntoView({ block: "end" });
      showStats(t0, tFirst, tLast, pieces);
    }
    state.history.push(userMessage, { role: "assistant", content: answer });
  } catch (err) {
    if (err.name === "AbortError") {
      state.history.push(userMessage, { role: "assistant", content: answer }); // keep what arrived
    } else {
      showError(err.message);
      if (!answer) bubble.parentElement.remove();
    }
  } finally {
    bubble.parentElement.classList.remove("streaming");
    showStats(t0, tFirst, tLast ?? performance.now(), usage ? usage.completion_tokens : pieces);
    state.controller = null;
    setBusy(false);
  }
}

function reset() {
  if (state.controller) state.controller.abort();
  state.history = [];
  $("log").replaceChildren();
  $("stats").textContent = "";
  showError("");
  clearImages();
  $("prompt").focus();
}

// ---- wiring ---------------------------------------------------------------------------

function wire() {
  const keyInput = $("api-key");
  keyInput.value = localStorage.getItem(KEY_STORAGE) || "";
  keyInput.addEventListener("change", () => {
    localStorage.setItem(KEY_STORAGE, keyInput.value.trim());
    state.model = null;
    loadModel().then(() => showError(""), (err) => showError(err.message));
  });
  $("composer").addEventListener("submit", send);
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("reset").addEventListener("click", reset);
  $("clear-image").addEventListener("click", clearImages);
  $("image-input").addEventListener("change", (e) => addImages([...e.target.files]));
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key !== "Enter" || e.shiftKey) return;
    e.preventDefault();
    $("composer").requestSubmit();
  });
  document.addEventListener("paste", (e) => {
    const items = [...(e.clipboardData?.items || [])].filter((i) => i.type.startsWith("image/"));
    if (items.length) addImages(items.map((i) => i.getAsFile()));
  });
  const zone = $("drop-zone");
  for (const name of ["dragenter", "dragover"]) {
    document.addEventListener(name, (e) => { e.preventDefault(); zone.classList.add("dragging"); });
  }
  for (const name of ["dragleave", "drop"]) {
    document.addEventListener(name, (e) => { e.preventDefault(); zone.classList.remove("dragging"); });
  }
  document.addEventListener("drop", (e) => addImages([...(e.dataTransfer?.files || [])]));
  setBusy(false);
  loadModel().catch((err) => showError(err.message));
}

wire();
