// The playground page: builds the form from /playground/form.json (the model's input schema),
// talks to this server's own v3 API with the key from the "API key" field (kept in localStorage,
// never put in a URL), polls like the SDKs do, and keeps a local note of what each submit asked
// for, because the API's history lists predictions without their inputs.
"use strict";

const KEY_STORE = "skyreels.playground.apiKey";
const INPUT_STORE = "skyreels.playground.inputs";
const MAX_REMEMBERED = 100;
const POLL_MS = 250;
const TERMINAL = ["completed", "failed", "cancelled"];

const state = {
  model: "wavespeed-ai/SkyReels-V1",
  fields: [],
  file: null, // the chosen image File (picker, drop or paste)
  uploaded: null, // {file, url}: the upload URL of `file`, so a second Generate reuses it
  previewUrl: null,
  current: null, // the prediction id on display
  pollTimer: null,
  tickTimer: null,
  startedAt: 0,
};

const $ = (id) => document.getElementById(id);

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// --- the API --------------------------------------------------------------------------------

function apiKey() {
  return $("api-key").value.trim();
}

async function api(method, path, body) {
  const headers = {};
  const key = apiKey();
  if (key) headers.Authorization = "Bearer " + key;
  let payload;
  if (body instanceof FormData) {
    payload = body;
  } else if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    payload = JSON.stringify(body);
  }
  const response = await fetch(path, { method, headers, body: payload, cache: "no-store" });
  let reply = null;
  try {
    reply = await response.json();
  } catch (_) {
    // not JSON: reported below by status
  }
  if (!response.ok) {
    const detail = reply && reply.data && reply.data.error ? reply.data.error : response.statusText;
    throw new ApiError(response.status, detail);
  }
  return reply.data;
}

function explain(error) {
  if (error instanceof ApiError && error.status === 401) {
    return "The server refused the API key (401 Unauthorized: " + error.message +
      "). Enter a valid key in the API key field.";
  }
  if (error instanceof ApiError) return "Error " + error.status + ": " + error.message;
  return "Could not reach the server: " + error.message;
}

function showMessage(text) {
  const box = $("message");
  box.textContent = text;
  box.hidden = !text;
}

// --- the form, from the schema ----------------------------------------------------------------

function el(tag, attrs = {}, children = []) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "text") node.textContent = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children) node.append(child);
  return node;
}

function fieldId(field) {
  return "f-" + field.name;
}

function labelFor(field) {
  return el("label", { for: fieldId(field), class: field.required ? "required" : null, text: field.label });
}

function help(field) {
  return field.help ? el("p", { class: "help", id: fieldId(field) + "-help", text: field.help }) : "";
}

function formatNumber(field, value) {
  return field.step < 1 ? Number(value).toFixed(1) : String(value);
}

const BUILDERS = {
  textarea(field) {
    return [labelFor(field), el("textarea", { id: fieldId(field), name: field.name, rows: 3 }), help(field)];
  },
  number(field) {
    const input = el("input", {
      id: fieldId(field), name: field.name, type: "number", min: field.min, max: field.max,
      step: field.step, value: field.default,
    });
    return [labelFor(field), input, help(field)];
  },
  checkbox(field) {
    const input = el("input", { id: fieldId(field), name: field.name, type: "checkbox", checked: !!field.default });
    return [input, labelFor(field), help(field)];
  },
  slider(field) {
    const input = el("input", {
      id: fieldId(field), name: field.name, type: "range", min: field.min, max: field.max,
      step: field.step, value: field.default,
    });
    const shown = el("output", { for: fieldId(field), text: formatNumber(field, field.default) });
    input.addEventListener("input", () => { shown.textContent = formatNumber(field, input.value); });
    return [labelFor(field), el("div", { class: "slider-row" }, [input, shown]), help(field)];
  },
  choice(field) {
    const select = el("select", { id: fieldId(field), name: field.name });
    for (const option of field.options) {
      select.append(el("option", { value: option, text: option, selected: option === field.default }));
    }
    return [labelFor(field), select, help(field)];
  },
  seed(field) {
    const input = el("input", {
      id: fieldId(field), name: field.name, type: "number", min: field.min, max: field.max, step: 1,
      value: field.default,
    });
    const random = el("button", { type: "button", id: "seed-random", text: "Random" });
    random.addEventListener("click", () => { input.value = "-1"; updateCode(); });
    const note = el("p", { class: "help", text: "-1 = random; the seed used is shown with the result." });
    return [labelFor(field), el("div", { class: "seed-row" }, [input, random]), note];
  },
  image(field) {
    const preview = el("img", { id: "image-preview", alt: "Image preview", hidden: true });
    const file = el("input", { id: fieldId(field), name: field.name, type: "file", accept: "image/*" });
    const url = el("input", {
      id: "f-image-url", type: "url", placeholder: "https://… or an upload URL of this server",
      spellcheck: "false",
    });
    const zone = el("div", { class: "dropzone", id: "dropzone" }, [
      preview,
      el("span", { text: "Drop an image here, paste one, or choose a file" }),
      file,
      el("label", { for: "f-image-url", text: "or Image URL" }),
      url,
    ]);
    file.addEventListener("change", () => { if (file.files[0]) setFile(file.files[0]); });
    url.addEventListener("input", () => setImageUrl(url.value.trim()));
    zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (event) => {
      event.preventDefault();
      zone.classList.remove("over");
      const dropped = event.dataTransfer.files[0];
      if (dropped) setFile(dropped);
      else {
        const link = event.dataTransfer.getData("text/uri-list") || event.dataTransfer.getData("text/plain");
        if (link) { url.value = link.trim(); setImageUrl(link.trim()); }
      }
    });
    return [labelFor(field), zone, help(field)];
  },
};

function buildForm(fields) {
  const box = $("fields");
  box.replaceChildren();
  for (const field of fields) {
    const build = BUILDERS[field.widget] || BUILDERS.textarea;
    box.append(el("div", { class: "field", "data-field": field.name }, build(field)));
  }
}

// --- the image --------------------------------------------------------------------------------

function showPreview(src) {
  const preview = $("image-preview");
  if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
  state.previewUrl = src && src.startsWith("blob:") ? src : null;
  preview.hidden = !src;
  if (src) preview.src = src;
  else preview.removeAttribute("src");
}

function setFile(file) {
  state.file = file;
  state.uploaded = null;
  $("f-image-url").value = "";
  showPreview(URL.createObjectURL(file));
  updateCode();
}

function setImageUrl(url) {
  state.file = null;
  state.uploaded = null;
  $("f-image").value = "";
  // Only this server's URLs and data: URIs can preview: the CSP forbids loading from elsewhere.
  const local = url.startsWith(location.origin + "/") || url.startsWith("data:image/");
  showPreview(local ? url : null);
  updateCode();
}

async function imageValue() {
  if (state.file) {
    if (!state.uploaded || state.uploaded.file !== state.file) {
      const form = new FormData();
      form.append("file", state.file, state.file.name || "pasted.png");
      const data = await api("POST", "/api/v3/media/upload/binary", form);
      state.uploaded = { file: state.file, url: data.download_url };
    }
    return state.uploaded.url;
  }
  return $("f-image-url").value.trim();
}

// --- reading and filling the form -------------------------------------------------------------

function readField(field) {
  const input = $(fieldId(field));
  if (field.widget === "checkbox") return input.checked;
  const raw = input.value.trim();
  if (raw === "") return null;
  if (["slider", "number", "seed"].includes(field.widget)) return field.step < 1 ? Number(raw) : parseInt(raw, 10);
  return raw;
}

function formValues() {
  const values = {};
  for (const field of state.fields) {
    if (field.widget === "image") continue;
    const value = readField(field);
    if (value !== null) values[field.name] = value;
  }
  return values;
}

function fillForm(input) {
  for (const field of state.fields) {
    if (!(field.name in input)) continue;
    const node = $(fieldId(field));
    const value = input[field.name];
    if (field.widget === "image") {
      $("f-image-url").value = value;
      setImageUrl(value);
    } else if (field.widget === "checkbox") {
      node.checked = !!value;
    } else {
      node.value = value === null ? "" : value;
      node.dispatchEvent(new Event("input"));
    }
  }
  updateCode();
}

function resetForm() {
  for (const field of state.fields) {
    if (field.widget === "image") continue;
    const node = $(fieldId(field));
    if (field.widget === "checkbox") node.checked = !!field.default;
    else node.value = field.default === null || field.default === undefined ? "" : field.default;
    node.dispatchEvent(new Event("input"));
  }
  $("f-image-url").value = "";
  setImageUrl("");
}

function missingField(values, image) {
  for (const field of state.fields) {
    if (!field.required) continue;
    const value = field.widget === "image" ? image : values[field.name];
    if (value === null || value === undefined || value === "") return field;
  }
  return null;
}

// --- remembered inputs (the history route lists predictions without them) ---------------------

function rememberedInputs() {
  try {
    return JSON.parse(localStorage.getItem(INPUT_STORE) || "{}");
  } catch (_) {
    return {};
  }
}

function remember(id, input) {
  const all = rememberedInputs();
  all[id] = input;
  const ids = Object.keys(all);
  for (const old of ids.slice(0, Math.max(0, ids.length - MAX_REMEMBERED))) delete all[old];
  localStorage.setItem(INPUT_STORE, JSON.stringify(all));
}

// --- generating and showing a prediction ------------------------------------------------------

async function generate(event) {
  event.preventDefault();
  showMessage("");
  const values = formValues();
  const chosen = state.file ? "(file)" : $("f-image-url").value.trim();
  const missing = missingField(values, chosen);
  if (missing) {
    showMessage(missing.label + " is required.");
    $(fieldId(missing)).focus();
    return;
  }
  $("generate").disabled = true;
  try {
    const body = { ...values, image: await imageValue() };
    setStatus({ status: "created", progress: 0, queue_position: 0 }, "submitting");
    const prediction = await api("POST", "/api/v3/" + state.model, body);
    remember(prediction.id, body);
    track(prediction, Date.now());
    updateCode();
  } catch (error) {
    showMessage(explain(error));
    setStatus(null);
  } finally {
    $("generate").disabled = false;
  }
}

function statusText(p) {
  switch (p.status) {
    case "created":
      return p.queue_position > 0 ? "queued at position " + p.queue_position : "created";
    case "processing":
      return "processing " + Math.round((p.progress || 0) * 100) + "%";
    case "failed":
      return "failed: " + (p.error || "unknown error");
    default:
      return p.status;
  }
}

function setStatus(prediction, text) {
  const status = $("status");
  status.className = "status" + (prediction ? " " + prediction.status : "");
  status.textContent = text || (prediction ? statusText(prediction) : "idle");
  $("progress").value = prediction ? Math.round((prediction.progress || 0) * 100) : 0;
  $("cancel").disabled = !prediction || !prediction.id || TERMINAL.includes(prediction.status);
}

function seconds(ms) {
  return (ms / 1000).toFixed(1) + " s";
}

function outputUrl(output) {
  // A prediction submitted elsewhere with enable_base64_output carries bare base64.
  return /^https?:/.test(output) ? output : "data:video/mp4;base64," + output;
}

function showPrediction(p) {
  setStatus(p);
  const result = $("result");
  const video = $("video");
  const done = p.status === "completed" && p.outputs && p.outputs.length > 0;
  result.hidden = !(done || p.status === "failed" || p.status === "cancelled");
  video.hidden = !done;
  $("download").hidden = !done;
  if (done) {
    const src = outputUrl(p.outputs[0]);
    if (video.getAttribute("src") !== src) {
      video.src = src;
      $("download").href = src;
      $("download").setAttribute("download", p.id + ".mp4");
    }
  } else if (video.getAttribute("src")) {
    video.removeAttribute("src");
    video.load();
  }
  $("seed-used").textContent = p.seed !== undefined ? "Seed used: " + p.seed : "";
  $("timings").textContent = TERMINAL.includes(p.status)
    ? "inference " + seconds((p.timings && p.timings.inference) || 0) + " · total " + seconds(p.executionTime || 0)
    : "";
  const error = $("error-text");
  error.hidden = !p.error;
  error.textContent = p.error || "";
  $("reuse").hidden = !rememberedInputs()[p.id];
}

function tick() {
  $("elapsed").textContent = seconds(Date.now() - state.startedAt);
}

function stopTracking() {
  clearTimeout(state.pollTimer);
  clearInterval(state.tickTimer);
  state.pollTimer = null;
  state.tickTimer = null;
}

function track(prediction, startedAt) {
  stopTracking();
  state.current = prediction.id;
  state.startedAt = startedAt;
  showPrediction(prediction);
  if (TERMINAL.includes(prediction.status)) {
    $("elapsed").textContent = prediction.executionTime ? "took " + seconds(prediction.executionTime) : "";
    return;
  }
  tick();
  state.tickTimer = setInterval(tick, 100);
  const poll = async () => {
    const id = state.current;
    try {
      const latest = await api("GET", "/api/v3/predictions/" + id + "/result");
      if (id !== state.current) return; // another prediction was opened meanwhile
      showPrediction(latest);
      if (TERMINAL.includes(latest.status)) {
        clearInterval(state.tickTimer);
        tick();
        refreshHistory();
        return;
      }
    } catch (error) {
      showMessage(explain(error));
    }
    state.pollTimer = setTimeout(poll, POLL_MS);
  };
  state.pollTimer = setTimeout(poll, POLL_MS);
}

async function cancel() {
  if (!state.current) return;
  try {
    showPrediction(await api("POST", "/api/v3/predictions/" + state.current + "/cancel"));
  } catch (error) {
    showMessage(explain(error));
  }
}

async function openPrediction(id) {
  showMessage("");
  try {
    const prediction = await api("GET", "/api/v3/predictions/" + id + "/result");
    track(prediction, Date.parse(prediction.created_at));
  } catch (error) {
    showMessage(explain(error));
  }
}

// --- history ------------------------------------------------------------------------------------

function historyItem(p, inputs) {
  const input = inputs[p.id];
  const thumb = p.status === "completed" && p.outputs && p.outputs.length
    ? el("video", { class: "thumb", src: outputUrl(p.outputs[0]), muted: true, preload: "metadata", "aria-hidden": "true" })
    : el("span", { class: "thumb", "aria-hidden": "true" });
  const info = el("span", { class: "info" }, [
    el("span", { class: "prompt", text: input ? input.prompt : "(prompt not known in this browser)" }),
    el("span", { class: "when", text: p.status + " · " + new Date(p.created_at).toLocaleString() }),
  ]);
  const button = el("button", { type: "button", class: "history-item", "data-id": p.id, "data-status": p.status }, [thumb, info]);
  button.addEventListener("click", () => openPrediction(p.id));
  return el("li", {}, [button]);
}

async function refreshHistory() {
  if (!apiKey()) return;
  try {
    const page = await api("GET", "/api/v3/predictions?page_size=12");
    const inputs = rememberedInputs();
    $("history").replaceChildren(...page.items.map((p) => historyItem(p, inputs)));
    $("history-empty").hidden = page.items.length > 0;
  } catch (error) {
    showMessage(explain(error));
  }
}

// --- the Code panel -----------------------------------------------------------------------------

function shellQuote(text) {
  return "'" + text.replace(/'/g, "'\\''") + "'";
}

function pyLiteral(value, indent) {
  if (value === null) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (typeof value === "object") {
    const pad = " ".repeat(indent + 4);
    const items = Object.entries(value).map(([k, v]) => pad + JSON.stringify(k) + ": " + pyLiteral(v, indent + 4) + ",");
    return "{\n" + items.join("\n") + "\n" + " ".repeat(indent) + "}";
  }
  return JSON.stringify(value);
}

function codeInput() {
  const values = formValues();
  const fileName = state.file ? state.file.name || "image.png" : null;
  const uploaded = state.uploaded && state.uploaded.file === state.file ? state.uploaded.url : null;
  const image = state.file ? uploaded || "<download_url of the upload>" : $("f-image-url").value.trim() || "<image URL>";
  return { body: { prompt: values.prompt || "", image, ...values }, fileName: uploaded ? null : fileName };
}

function updateCode() {
  if (!state.fields.length) return;
  const base = location.origin;
  const { body, fileName } = codeInput();
  const auth = '-H "Authorization: Bearer $WAVESPEED_API_KEY"';
  const curl = [];
  if (fileName) {
    curl.push("# 1. upload the image; the reply's data.download_url is the image URL",
      "curl -s -X POST " + base + "/api/v3/media/upload/binary \\", "  " + auth + " \\",
      "  -F " + shellQuote("file=@" + fileName), "", "# 2. submit");
  }
  curl.push("curl -s -X POST " + base + "/api/v3/" + state.model + " \\", "  " + auth + " \\",
    '  -H "Content-Type: application/json" \\', "  -d " + shellQuote(JSON.stringify(body)), "",
    "# poll until data.status is completed (data.outputs[0] is the MP4) or failed",
    "curl -s " + base + "/api/v3/predictions/<id>/result \\", "  " + auth);
  $("code-curl").firstChild.textContent = curl.join("\n");

  const py = ["import os", "", "import wavespeed", "",
    "client = wavespeed.Client(base_url=" + JSON.stringify(base) + ', api_key=os.environ["WAVESPEED_API_KEY"])'];
  const input = { ...body };
  if (fileName) {
    py.push("image_url = client.upload(" + JSON.stringify(fileName) + ")");
    delete input.image;
  }
  let literal = pyLiteral(input, 4);
  if (fileName) literal = literal.replace(/\n {4}}$/, '\n        "image": image_url,\n    }');
  py.push("result = client.run(", "    " + JSON.stringify(state.model) + ",", "    " + literal + ",", ")",
    'print(result["outputs"][0])');
  $("code-python").firstChild.textContent = py.join("\n");
}

function selectTab(which) {
  for (const name of ["curl", "python"]) {
    $("tab-" + name).setAttribute("aria-selected", String(name === which));
    $("code-" + name).hidden = name !== which;
  }
}

// --- start --------------------------------------------------------------------------------------

async function start() {
  const keyField = $("api-key");
  keyField.value = localStorage.getItem(KEY_STORE) || "";
  keyField.addEventListener("input", () => localStorage.setItem(KEY_STORE, apiKey()));
  keyField.addEventListener("change", () => {
    showMessage("");
    refreshHistory();
  });
  $("form").addEventListener("submit", generate);
  $("form").addEventListener("input", updateCode);
  $("form").addEventListener("change", updateCode);
  $("reset").addEventListener("click", resetForm);
  $("cancel").addEventListener("click", cancel);
  $("reuse").addEventListener("click", () => {
    const input = rememberedInputs()[state.current];
    if (input) fillForm(input);
  });
  $("tab-curl").addEventListener("click", () => selectTab("curl"));
  $("tab-python").addEventListener("click", () => selectTab("python"));
  document.addEventListener("paste", (event) => {
    const item = [...event.clipboardData.items].find((i) => i.kind === "file" && i.type.startsWith("image/"));
    if (item) {
      event.preventDefault();
      setFile(item.getAsFile());
    }
  });

  const response = await fetch("/playground/form.json", { cache: "no-store" });
  const form = await response.json();
  state.model = form.model;
  state.fields = form.fields;
  $("model-id").textContent = form.model;
  buildForm(form.fields);
  updateCode();
  document.body.dataset.ready = "true"; // the form is built (tests wait for this)
  refreshHistory();
}

document.addEventListener("DOMContentLoaded", start);
