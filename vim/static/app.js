// The page of vim/serve_rpi.py: send the picked photo to /v1/classify as the raw request body and
// show its top-5 as labelled bars. The token, when the server asks for one (401, on load or on a
// photo), is kept in localStorage so it is asked for once per browser. After an error the result
// card is hidden; a photo the browser cannot display (e.g. TIFF) is still classified, without a preview.
"use strict";

const TOKEN_KEY = "vim-serve-token";
const $ = (id) => document.getElementById(id);
let pending = null;  // the file waiting for a token

function headers() {
  const token = localStorage.getItem(TOKEN_KEY);
  if (!token) return {};
  // A header value may only hold characters up to U+00FF, sent as one byte each: spell the
  // token's UTF-8 bytes that way, which is how the server compares it.
  const utf8 = String.fromCharCode(...new TextEncoder().encode(token));
  return { Authorization: "Bearer " + utf8 };
}

function status(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "muted";
}

async function errorText(response) {
  try { return (await response.json()).error; } catch (e) { return response.statusText; }
}

function askForToken(file) {
  pending = file;
  localStorage.removeItem(TOKEN_KEY);
  $("token-form").hidden = false;
  $("token").focus();
  status("This server needs a token.", true);
}

function failed(text) {
  $("result").hidden = true;
  status(text, true);
}

async function showInfo() {
  const response = await fetch("/v1/info", { headers: headers() });
  if (response.ok) {
    const info = await response.json();
    $("model").textContent = `${info.model} · threads: ${info.threads} · torch ${info.torch}`;
  } else if (response.status === 401) {
    $("model").textContent = "token required";
    askForToken(pending);
  } else {
    $("model").textContent = await errorText(response);
  }
}

function render(result) {
  const list = $("topk");
  list.replaceChildren();
  for (const entry of result.topk) {
    const item = document.createElement("li");
    const row = document.createElement("div");
    row.className = "row";
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = entry.label;
    const prob = document.createElement("span");
    prob.textContent = (100 * entry.prob).toFixed(1) + " %";
    row.append(label, prob);
    const bar = document.createElement("div");
    bar.className = "bar";
    const fill = document.createElement("div");
    fill.className = "fill";
    fill.style.width = (100 * entry.prob).toFixed(1) + "%";
    bar.append(fill);
    item.append(row, bar);
    list.append(item);
  }
  const t = result.timing_ms;
  $("timing").textContent = `inference ${t.inference.toFixed(0)} ms · preprocess ${t.preprocess.toFixed(0)} ms` +
    ` · queue ${t.queue.toFixed(0)} ms`;
}

async function classify(file) {
  if (!file) return;
  $("preview").hidden = false;
  $("preview").src = URL.createObjectURL(file);
  $("result").hidden = false;
  $("topk").replaceChildren();
  $("timing").textContent = "";
  status("Classifying…");
  let response;
  try {
    response = await fetch("/v1/classify?topk=5", { method: "POST", headers: headers(), body: file });
  } catch (e) {
    failed("The server cannot be reached.");
    return;
  }
  if (response.status === 401) { $("result").hidden = true; askForToken(file); return; }
  if (!response.ok) { failed(await errorText(response)); return; }
  render(await response.json());
  status("");
}

$("preview").addEventListener("error", () => { $("preview").hidden = true; });

for (const id of ["choose", "camera"]) {
  $(id).addEventListener("change", (event) => classify(event.target.files[0]));
}

$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  localStorage.setItem(TOKEN_KEY, $("token").value);
  $("token-form").hidden = true;
  showInfo();
  if (pending) { const file = pending; pending = null; classify(file); }
});

showInfo();
