"""The page at `/`: try a served model in a browser, offline (no external assets).

It reads `/dlsuite/models` and calls the same REST API a client would:
a classifier gets the dropped image as `{"b64": ...}` on `serving_bytes`
and shows the top 5 classes; a captioner gets it on `serving_default` and
shows the caption; a language model gets a prompt in the columnar format
and the text is typed out as it arrives; any other SavedModel gets a JSON
editor prefilled from its signature. Each panel shows the request it sent.
The version menu lists the versions loaded, each with the version labels
naming it (a --model-config-file's), then the labels themselves: choosing
one sends the request to `/v1/models/NAME/labels/LABEL:predict`.
The header shows the chosen model's live request rate: the change in its
`requests_total` (the metrics' request counter, `metrics.py`) between two
reads of `/dlsuite/models`, every `RATE_SECONDS`.
"""

HTML = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>dlsuite serve</title>
<style>
  :root { --fg:#1d2430; --muted:#667085; --line:#d9dee7; --accent:#2563eb; --bg:#f6f7f9; --card:#fff; }
  * { box-sizing: border-box; }
  body { margin:0; font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif; color:var(--fg); background:var(--bg); }
  header { padding:14px 24px; background:var(--card); border-bottom:1px solid var(--line); display:flex; gap:16px; align-items:center; flex-wrap:wrap; }
  header h1 { font-size:18px; margin:0 12px 0 0; }
  main { max-width:900px; margin:24px auto; padding:0 16px; }
  .card { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:20px; margin-bottom:16px; }
  select, input, textarea, button { font:inherit; }
  select, input[type=number], input[type=text], textarea { border:1px solid var(--line); border-radius:6px; padding:6px 8px; background:#fff; }
  textarea { width:100%; min-height:90px; font-family:ui-monospace,Menlo,Consolas,monospace; font-size:13px; }
  button { background:var(--accent); color:#fff; border:0; border-radius:6px; padding:7px 16px; cursor:pointer; }
  button:disabled { opacity:.5; cursor:wait; }
  .muted { color:var(--muted); font-size:13px; }
  #drop { border:2px dashed var(--line); border-radius:10px; padding:28px; text-align:center; cursor:pointer; }
  #drop.over { border-color:var(--accent); background:#eef4ff; }
  #preview { height:160px; width:auto; max-width:100%; object-fit:contain; image-rendering:pixelated; display:none; margin:12px auto 0; border-radius:6px; }
  .row { display:flex; gap:12px; align-items:center; flex-wrap:wrap; margin:8px 0; }
  .bar { display:grid; grid-template-columns:160px 1fr 64px; gap:10px; align-items:center; margin:6px 0; }
  .bar .track { background:#eef0f4; border-radius:4px; height:14px; overflow:hidden; }
  .bar .fill { background:var(--accent); height:100%; }
  .bar .name { overflow:hidden; text-overflow:ellipsis; white-space:nowrap; }
  #caption { font-size:20px; margin-top:12px; }
  #text { white-space:pre-wrap; font-family:ui-monospace,Menlo,Consolas,monospace; background:#fbfbfc; border:1px solid var(--line); border-radius:6px; padding:12px; min-height:80px; }
  #text .prompt { color:var(--muted); }
  pre { white-space:pre-wrap; word-break:break-all; font-size:12px; background:#fbfbfc; border:1px solid var(--line); border-radius:6px; padding:10px; max-height:320px; overflow:auto; }
  .error { color:#b42318; }
  [hidden] { display:none !important; }
</style>
</head>
<body>
<header>
  <h1>dlsuite serve</h1>
  <label>model <select id="model"></select></label>
  <label>version <select id="version"></select></label>
  <span id="kind" class="muted"></span>
  <span id="rate" class="muted" title="requests answered per second, every API and status"></span>
</header>
<main>
  <div id="empty" class="card" hidden>No model is loaded yet. Export one (for example <code>dlsuite classify train</code>) into a folder this server watches; it appears here within a few seconds.</div>

  <section id="image-panel" class="card" hidden>
    <div id="drop">Drop an image here, or click to choose one<br><span class="muted">JPEG, PNG, BMP or GIF</span>
      <input id="file" type="file" accept="image/*" hidden>
      <img id="preview" alt="the image sent">
    </div>
    <div id="bars"></div>
    <div id="caption"></div>
  </section>

  <section id="lm-panel" class="card" hidden>
    <textarea id="prompt" placeholder="Type a prompt">Return the </textarea>
    <div class="row">
      <label>length <input id="length" type="number" value="200" min="1" max="5000" style="width:90px"></label>
      <label>temperature <input id="temperature" type="number" value="0.7" step="0.1" min="0.05" style="width:80px"></label>
      <label>seed <input id="seed" type="number" value="-1" style="width:90px"></label>
      <button id="generate">Generate</button>
      <span class="muted">seed -1: a new sample each time</span>
    </div>
    <div id="text"></div>
  </section>

  <section id="generic-panel" class="card" hidden>
    <div class="row"><label>signature <select id="signature"></select></label></div>
    <textarea id="body"></textarea>
    <div class="row"><button id="send">Predict</button></div>
    <pre id="answer"></pre>
  </section>

  <div class="card"><div class="muted">Request sent</div><pre id="request">(none yet)</pre><div id="status" class="muted"></div></div>
</main>
<script>
"use strict";
let models = [];
const $ = (id) => document.getElementById(id);

function current() { return models.find((m) => m.name === $("model").value); }

function url(model) {
  const v = $("version").value;
  const base = "/v1/models/" + encodeURIComponent(model.name);
  if (v.startsWith("label:")) return base + "/labels/" + encodeURIComponent(v.slice(6)) + ":predict";
  return (v && Number(v) !== model.default_version ? base + "/versions/" + v : base) + ":predict";
}

let listed = null;
let counted = null;  // {time, totals: {model: requests_total}} at the previous read
const RATE_SECONDS = 5;

function showRate(answer) {
  const now = performance.now();
  const totals = Object.fromEntries(answer.models.map((m) => [m.name, m.requests_total]));
  const model = current();
  if (counted && model && model.name in counted.totals && model.name in totals) {
    const rate = (totals[model.name] - counted.totals[model.name]) / ((now - counted.time) / 1000);
    $("rate").textContent = `${rate.toFixed(1)} requests/s`;
  }
  counted = {time: now, totals};
}

async function load() {
  const answer = await fetch("/dlsuite/models").then((r) => r.json());
  showRate(answer);
  const fresh = JSON.stringify(answer.models.map((m) => [m.name, m.versions, m.labels]));
  if (fresh === listed) return;  // nothing new: leave the page as the user has it
  listed = fresh;
  const chosen = $("model").value, version = $("version").value;
  models = answer.models;
  $("empty").hidden = models.length > 0;
  $("model").innerHTML = models.map((m) => `<option>${escapeHtml(m.name)}</option>`).join("");
  if (models.some((m) => m.name === chosen)) $("model").value = chosen;
  show(version);
}

function show(version) {
  const model = current();
  for (const id of ["image-panel", "lm-panel", "generic-panel"]) $(id).hidden = true;
  if (!model) return;
  const labels = Object.entries(model.labels || {});  // [label, version]: a model config file's version_labels
  const named = (v) => labels.filter(([, n]) => n === v).map(([l]) => escapeHtml(l));
  $("version").innerHTML = model.versions.map((v) => `<option value="${v}">${v}${named(v).length ?
      " (" + named(v).join(", ") + ")" : ""}</option>`).join("")
    + labels.map(([l, n]) => `<option value="label:${escapeHtml(l)}">label ${escapeHtml(l)} (version ${n})</option>`)
      .join("");
  if ([...$("version").options].some((option) => option.value === version)) $("version").value = version;
  $("kind").textContent = {classifier: "image classifier", captioner: "image captioner",
                           language_model: "language model"}[model.kind] || "SavedModel";
  $("bars").innerHTML = ""; $("caption").textContent = "";
  if (model.kind === "classifier" && model.signatures.serving_bytes) $("image-panel").hidden = false;
  else if (model.kind === "captioner") $("image-panel").hidden = false;
  else if (model.kind === "language_model") $("lm-panel").hidden = false;
  else showGeneric(model);
}

function showGeneric(model) {
  $("generic-panel").hidden = false;
  const names = Object.keys(model.signatures);
  $("signature").innerHTML = names.map((n) => `<option>${escapeHtml(n)}</option>`).join("");
  if (names.includes("serving_default")) $("signature").value = "serving_default";
  template();
}

function template() {
  const model = current();
  const signature = model.signatures[$("signature").value];
  if (!signature) return;
  const example = (spec) => {
    let value = spec.dtype === "DT_STRING" ? "text" : spec.dtype === "DT_BOOL" ? false : 0;
    const shape = (spec.shape || []).map((d) => (d < 0 ? 1 : d));
    for (const d of shape.slice().reverse()) value = Array(Math.min(d, 8)).fill(value);
    return value;
  };
  const inputs = {};
  for (const [name, spec] of Object.entries(signature.inputs)) inputs[name] = example(spec);
  const names = Object.keys(inputs);
  $("body").value = JSON.stringify({signature_name: $("signature").value,
                                    inputs: names.length === 1 ? inputs[names[0]] : inputs}, null, 1);
}

async function predict(model, request) {
  const shown = JSON.stringify(request, (k, v) => (k === "b64" && v.length > 60 ? v.slice(0, 60) + "..." : v));
  $("request").textContent = "POST " + url(model) + "\n" + shown;
  $("status").textContent = "waiting...";
  $("status").className = "muted";
  const started = performance.now();
  const response = await fetch(url(model), {method: "POST", headers: {"Content-Type": "application/json"},
                                            body: JSON.stringify(request)});
  const answer = await response.json();
  const ms = Math.round(performance.now() - started);
  if (!response.ok) {
    $("status").textContent = `${response.status}: ${answer.error}`;
    $("status").className = "error";
    throw new Error(answer.error);
  }
  $("status").textContent = `${response.status} in ${ms} ms`;
  return answer;
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function sendImage(file) {
  const model = current();
  const dataUrl = await readFile(file);
  $("preview").src = dataUrl; $("preview").style.display = "block";
  $("bars").innerHTML = ""; $("caption").textContent = "";
  const b64 = dataUrl.slice(dataUrl.indexOf(",") + 1);
  if (model.kind === "classifier") {
    const answer = await predict(model, {signature_name: "serving_bytes", instances: [{b64}]});
    const probabilities = answer.predictions[0].probabilities;
    const names = (model.dlsuite && model.dlsuite.class_names) || probabilities.map((_, i) => "class " + i);
    const top = probabilities.map((p, i) => [p, i]).sort((a, b) => b[0] - a[0]).slice(0, 5);
    $("bars").innerHTML = top.map(([p, i]) => `<div class="bar"><span class="name">${escapeHtml(names[i])}</span>
      <span class="track"><span class="fill" style="display:block;width:${(100 * p).toFixed(1)}%"></span></span>
      <span>${(100 * p).toFixed(1)}%</span></div>`).join("");
  } else {
    const answer = await predict(model, {instances: [{b64}]});
    const first = answer.predictions[0];
    $("caption").textContent = typeof first === "string" ? first : first.caption;
  }
}

async function generate() {
  const model = current();
  const prompt = $("prompt").value;
  $("generate").disabled = true;
  $("text").innerHTML = `<span class="prompt">${escapeHtml(prompt)}</span><span id="continuation"></span>`;
  try {
    const answer = await predict(model, {inputs: {prompt, length: Number($("length").value),
      temperature: Number($("temperature").value), seed: Number($("seed").value)}});
    const text = typeof answer.outputs === "string" ? answer.outputs : answer.outputs.text;
    await typeOut($("continuation"), text);
  } catch (error) { /* shown in the status line */ }
  finally { $("generate").disabled = false; }
}

async function typeOut(element, text) {
  const step = Math.max(1, Math.ceil(text.length / 120));  // about two seconds whatever the length
  for (let i = 0; i < text.length; i += step) {
    element.textContent = text.slice(0, i + step);
    await new Promise((resolve) => setTimeout(resolve, 16));
  }
}

async function sendGeneric() {
  let request;
  try { request = JSON.parse($("body").value); }
  catch (error) { $("status").textContent = "not JSON: " + error.message; $("status").className = "error"; return; }
  try { $("answer").textContent = JSON.stringify(await predict(current(), request), null, 1); }
  catch (error) { $("answer").textContent = ""; }
}

function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
}

$("model").addEventListener("change", () => { $("rate").textContent = ""; counted = null; show(); });
$("signature").addEventListener("change", template);
$("generate").addEventListener("click", generate);
$("send").addEventListener("click", sendGeneric);
const drop = $("drop");
drop.addEventListener("click", (event) => { if (event.target !== $("file")) $("file").click(); });
$("file").addEventListener("change", () => { if ($("file").files[0]) sendImage($("file").files[0]).catch(() => {}); });
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault(); drop.classList.remove("over");
  if (event.dataTransfer.files[0]) sendImage(event.dataTransfer.files[0]).catch(() => {});
});
load().catch((error) => { $("status").textContent = "cannot list models: " + error; });
setInterval(() => load().catch(() => {}), RATE_SECONDS * 1000);  // the rate; new models and versions appear
</script>
</body>
</html>
"""
