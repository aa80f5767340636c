// The attention explorer: plain browser JavaScript over the public REST API, no build step and
// no network access beyond the service itself.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { models: [], translation: null, image: null, pending: null };
// the request each panel waits for: a newer one aborts it, so a late answer never overwrites it
const calls = { models: null, translation: null, image: null };

/** A fresh AbortSignal for ``panel``'s next request, aborting the one before. */
function nextCall(panel) {
  calls[panel]?.abort();
  calls[panel] = new AbortController();
  return calls[panel].signal;
}

/** The bearer header, if a token was typed; a token no HTTP header can carry is refused here. */
function authorization() {
  const token = $("token").value.trim();
  if (!token) return {};
  if (!/^[\x21-\x7e]+$/.test(token)) throw new Error("The API token can hold only printable ASCII characters.");
  return { Authorization: `Bearer ${token}` };
}

function status(message, error = false) {
  $("status").textContent = message;
  $("status").classList.toggle("error", error);
}

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}), ...authorization() };
  const response = await fetch(path, { ...options, headers });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
  return body;
}

function option(select, value, label = value) {
  const o = document.createElement("option");
  o.value = value;
  o.textContent = label;
  select.append(o);
}

function showMetrics(dl, answer) {
  const m = answer.metrics || {};
  const rows = { version: answer.version, queue: `${m.queue_wait_ms} ms`, compute: `${m.compute_ms} ms`,
                 total: `${m.total_ms} ms`, batch: m.batch_size, replica: m.replica };
  dl.replaceChildren();
  for (const [k, v] of Object.entries(rows)) {
    if (v === undefined || v === null) continue;
    const dt = document.createElement("dt"); dt.textContent = k;
    const dd = document.createElement("dd"); dd.textContent = v;
    dl.append(dt, dd);
  }
}

/** List the served models (again when the token changes: a service with a token lists none
 * without it); models the service refused to load are named with their reason. */
async function loadModels() {
  const signal = nextCall("models"); // a listing for a newer token wins over an older one
  let listed;
  try {
    listed = await api("/v1/models", { signal });
  } catch (err) {
    if (signal.aborted) return;
    const hint = err.message.startsWith("authorization:") ? " Enter the API token above." : "";
    status(`Could not list the models: ${err.message.replace(/\.$/, "")}.${hint}`, true);
    state.models = [];
    for (const select of [$("translation-model"), $("image-model")]) select.replaceChildren();
    document.body.dataset.ready = "false";
    return;
  }
  if (signal.aborted) return;
  document.body.dataset.listings = String(Number(document.body.dataset.listings || 0) + 1);
  state.models = listed.models;
  for (const [select, translation] of [[$("translation-model"), true], [$("image-model"), false]]) {
    const keep = select.value;
    select.replaceChildren();
    for (const m of state.models.filter((m) => (m.task === "translation") === translation)) {
      option(select, m.name, `${m.name} (v${m.version}, ${m.family})`);
    }
    if ([...select.options].some((o) => o.value === keep)) select.value = keep;
  }
  const refused = Object.entries(listed.rejected || {});
  const note = refused.length ? ` Not loaded: ${refused.map(([n, why]) => `${n} (${why})`).join("; ")}.` : "";
  status(`${state.models.length} models ready.${note}`, refused.length > 0);
  document.body.dataset.ready = "true";
}

/** The model chosen in ``select``, or an error saying why there is none. */
function chosen(select) {
  if (select.value) return select.value;
  throw new Error(state.models.length ? "No model of this kind is served." : "No models listed yet: enter the API token above if the service has one.");
}

// -- translation --------------------------------------------------------------------------------

async function translate(event) {
  event.preventDefault();
  const signal = nextCall("translation");
  // every layer and head: RNNs answer without them, Transformers (ours or imported) with them;
  // streamed: each token and its alignment row show as the model chooses it (greedy search)
  const body = { text: $("text").value, beam_size: Number($("search").value), return_attention: true,
                 attention_layers: "all", stream: true, truncate: $("truncate").checked };
  status("Translating…");
  try {
    const model = chosen($("translation-model"));
    const headers = { "Content-Type": "application/json", ...authorization() };
    const response = await fetch(`/v1/models/${encodeURIComponent(model)}/translate`, {
      method: "POST", headers, body: JSON.stringify(body), signal,
    });
    if (!response.ok) { // refused before the stream began: an ordinary JSON error
      const error = await response.json().catch(() => ({}));
      throw new Error(error.error || `${response.status} ${response.statusText}`);
    }
    let streamed = 0;
    $("translation").textContent = "";
    $("grid").replaceChildren();
    $("layer-head").hidden = true;
    $("translation-result").hidden = false;
    for await (const [name, data] of events(response)) {
      if (name === "error") throw new Error(data.error);
      if (name === "token") {
        streamed += 1;
        $("translation").textContent += data.text;
        liveRow(data);
        continue;
      }
      state.translation = data.translations[0]; // the answer: the whole grid, every layer and head
      $("translation").textContent = state.translation.text;
      setupLayers(state.translation.attention);
      drawGrid();
      showMetrics($("translation-metrics"), data);
      document.body.dataset.streamedTokens = String(streamed);
      status(`Translated by ${data.model} v${data.version}` + (streamed ? `, ${streamed} tokens streamed.` : "."));
    }
  } catch (err) {
    if (signal.aborted) return; // a newer request took over: it owns the panel now
    $("translation-result").hidden = true; // no answer on screen that is not this request's
    status(err.message, true);
  }
}

/** The server-sent events of a response body, as [name, JSON data]. */
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let name = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) name = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      yield [name, JSON.parse(data)];
    }
  }
}

/** A streamed token's row of the alignment grid, drawn as it arrives (the answer redraws it whole). */
function liveRow(token) {
  const table = $("grid");
  const tbody = table.tBodies[0] || table.createTBody();
  const tr = tbody.insertRow();
  tr.className = "live";
  const th = document.createElement("th");
  th.className = "tgt";
  th.textContent = token.token;
  tr.append(th);
  for (const p of token.attention || []) {
    const td = tr.insertCell();
    td.className = "cell";
    td.style.background = `rgba(36, 89, 196, ${Math.min(1, p).toFixed(3)})`;
  }
}

function setupLayers(attention) {
  const layered = Array.isArray(attention.layers); // a Transformer's (layers, heads, T, S)
  $("layer-head").hidden = !layered;
  if (!layered) return;
  const [layers, heads] = [attention.layers.length, attention.layers[0].length];
  for (const [select, n] of [[$("layer"), layers], [$("head"), heads]]) {
    const keep = select.value;
    select.replaceChildren();
    option(select, "mean", "mean");
    for (let i = 0; i < n; i++) option(select, String(i), String(i + 1));
    select.value = [...select.options].some((o) => o.value === keep) ? keep : "mean";
  }
  if (!$("layer").dataset.touched) $("layer").value = String(layers - 1); // the last layer first
}

function mean(arrays) {
  return arrays[0].map((row, i) => row.map((_, j) => arrays.reduce((s, a) => s + a[i][j], 0) / arrays.length));
}

/** The (target × source) matrix to show: an RNN's alignment, or one layer/head (or their mean). */
function matrix(attention) {
  if (!Array.isArray(attention.layers)) return attention.values;
  const all = attention.layers;
  const layers = $("layer").value === "mean" ? all : [all[Number($("layer").value)]];
  const perLayer = layers.map((heads) => ($("head").value === "mean" ? mean(heads) : heads[Number($("head").value)]));
  return mean(perLayer);
}

function drawGrid() {
  const t = state.translation;
  const grid = matrix(t.attention);
  const table = $("grid");
  table.replaceChildren();
  const head = table.createTHead().insertRow();
  head.append(document.createElement("th"));
  for (const token of t.source_tokens) {
    const th = document.createElement("th");
    th.className = "src";
    th.textContent = token === " " ? "␣" : token;
    head.append(th);
  }
  const tbody = table.createTBody();
  grid.forEach((row, i) => {
    const tr = tbody.insertRow();
    const th = document.createElement("th");
    th.className = "tgt";
    th.textContent = t.target_tokens[i];
    tr.append(th);
    row.forEach((p, j) => {
      const td = tr.insertCell();
      td.className = "cell";
      td.style.background = `rgba(36, 89, 196, ${Math.min(1, p).toFixed(3)})`;
      td.title = `${t.target_tokens[i]} → ${t.source_tokens[j]}: ${p.toFixed(3)}`;
    });
    tr.addEventListener("mouseenter", () => highlight(tr, row));
    tr.addEventListener("mouseleave", () => highlight(null, null));
  });
}

function highlight(tr, row) {
  for (const r of $("grid").tBodies[0].rows) r.classList.toggle("active", r === tr);
  const sources = $("grid").tHead.rows[0].querySelectorAll("th.src");
  const top = row ? Math.max(...row) : 0;
  sources.forEach((th, j) => {
    const lit = row !== null && row[j] >= 0.5 * top;
    th.classList.toggle("lit", lit);
    th.style.background = row ? `rgba(232, 89, 12, ${row[j].toFixed(3)})` : "";
  });
}

// -- images -------------------------------------------------------------------------------------

/** Classify ``blob``; ``signal``: the request's, taken when the user asked (a sample is
 * downloaded first, and a later click must still win). */
async function classify(blob, signal = nextCall("image")) {
  state.pending = blob; // what a change of head fusion classifies again
  const form = new FormData();
  form.append("file", blob, "image.png");
  form.append("top_k", "5");
  form.append("return_attention", "true");
  form.append("head_fusion", $("fusion").value);
  status("Classifying…");
  try {
    const model = chosen($("image-model"));
    const answer = await api(`/v1/models/${encodeURIComponent(model)}/classify`, { method: "POST", body: form, signal });
    const shown = await drawPicture(blob, signal);
    if (signal.aborted) return;
    state.image = shown ? { blob, answer } : null; // nothing to lay a heatmap over
    $("picture").closest(".stack").hidden = !shown;
    if (shown) drawOverlay();
    const labels = $("labels");
    labels.replaceChildren();
    for (const p of answer.predictions) {
      const li = document.createElement("li");
      li.textContent = `${p.label} — ${(100 * p.probability).toFixed(1)} %`;
      labels.append(li);
    }
    showMetrics($("image-metrics"), answer);
    $("image-result").hidden = false;
    const top = answer.predictions[0];
    $("picture").setAttribute("aria-label", `the image, classified ${top.label} (${(100 * top.probability).toFixed(1)} %)`);
    const unseen = shown ? "" : " This browser cannot display the image's format, so no heatmap is drawn.";
    status(`Classified by ${answer.model} v${answer.version}.${unseen}`);
  } catch (err) {
    if (signal.aborted) return; // a newer request took over: it owns the panel now
    $("image-result").hidden = true;
    state.image = null;
    status(err.message, true);
  }
}

/** Draw the image, or say false when the browser cannot decode its format (TIFF, PPM …, which
 * the service reads). Nothing is drawn once ``signal`` is aborted: a large image still decoding
 * would paint over a later request's picture, under that request's labels and heatmap. */
async function drawPicture(blob, signal) {
  let bitmap;
  try {
    bitmap = await createImageBitmap(blob);
  } catch {
    return false;
  }
  if (signal.aborted) return false;
  const ctx = $("picture").getContext("2d");
  ctx.imageSmoothingEnabled = false;
  // on black, not the page's white: the service reads a transparent image without its alpha
  // channel, and most images store their transparent pixels black
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, 288, 288);
  ctx.drawImage(bitmap, 0, 0, 288, 288);
  return true;
}

/** A blue → yellow → red ramp for a value in [0, 1]. */
function heat(v) {
  const stops = [[49, 54, 149], [254, 224, 144], [165, 0, 38]];
  const x = Math.max(0, Math.min(1, v)) * 2;
  const [a, b] = x < 1 ? [stops[0], stops[1]] : [stops[1], stops[2]];
  const f = x < 1 ? x : x - 1;
  return a.map((c, i) => Math.round(c + f * (b[i] - c)));
}

function drawOverlay() {
  const attention = state.image.answer.attention;
  const ctx = $("overlay").getContext("2d");
  ctx.clearRect(0, 0, 288, 288);
  if (!attention) return;
  const [rows, cols] = attention.shape.slice(-2);
  const values = attention.values.flat(Infinity);
  const lo = Math.min(...values), hi = Math.max(...values);
  const small = new OffscreenCanvas(cols, rows);
  const image = small.getContext("2d").createImageData(cols, rows);
  values.forEach((v, k) => {
    const [r, g, b] = heat(hi > lo ? (v - lo) / (hi - lo) : 0);
    image.data.set([r, g, b, 255], 4 * k);
  });
  small.getContext("2d").putImageData(image, 0, 0);
  ctx.globalAlpha = Number($("opacity").value);
  ctx.imageSmoothingEnabled = true;
  ctx.drawImage(small, 0, 0, 288, 288);
  ctx.globalAlpha = 1;
}

async function sample(name) {
  const signal = nextCall("image");
  try {
    const response = await fetch(`/static/samples/${name}.png`, { signal });
    await classify(await response.blob(), signal);
  } catch (err) {
    if (!signal.aborted) status(err.message, true);
  }
}

// -- wiring -------------------------------------------------------------------------------------

$("translate-form").addEventListener("submit", translate);
for (const id of ["layer", "head"]) {
  $(id).addEventListener("change", () => { $("layer").dataset.touched = "1"; drawGrid(); });
}
$("samples").addEventListener("click", (e) => { if (e.target.dataset.sample) sample(e.target.dataset.sample); });
$("file").addEventListener("change", () => { if ($("file").files[0]) classify($("file").files[0]); });
$("fusion").addEventListener("change", () => { if (state.pending) classify(state.pending); });
$("opacity").addEventListener("input", () => { if (state.image) drawOverlay(); });
$("token").addEventListener("change", loadModels); // typed, then Enter or focus moved on
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files[0]) classify(e.dataTransfer.files[0]);
});
loadModels();
