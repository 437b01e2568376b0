// The page: plain JavaScript over the JSON API (docs/serving.md). No build step, no dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { info: null, chosen: [], selected: null };
const MAX_LISTED = 200;  // classes shown at once in the picker (ImageNet has 1000)

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

async function api(path, options) {
  const response = await fetch(path, options);
  const type = response.headers.get("Content-Type") || "";
  const body = type.includes("json") ? await response.json() : null;
  if (!response.ok) {
    throw new Error((body && body.error) || `${response.status} ${response.statusText}`);
  }
  return body;
}

function settings() {
  return {
    cfg: Number($("cfg").value), top_k: Number($("top-k").value), top_p: Number($("top-p").value),
    temperature: Number($("temperature").value), seed: Number($("seed").value),
  };
}

async function busy(button, status, work) {
  showError("");
  button.disabled = true;
  status.textContent = "working…";
  const started = performance.now();
  try {
    await work();
    status.textContent = `done in ${((performance.now() - started) / 1000).toFixed(2)} s`;
  } catch (err) {
    showError(err.message);
    status.textContent = "";
  } finally {
    button.disabled = false;
  }
}

function figure(src, caption, onClick) {
  const fig = document.createElement("figure");
  const img = document.createElement("img");
  img.src = src;
  img.alt = caption;
  if (onClick) img.addEventListener("click", () => onClick(img));
  fig.append(img);
  const cap = document.createElement("figcaption");
  cap.textContent = caption;
  cap.title = caption;
  fig.append(cap);
  return fig;
}

// ------------------------------------------------------------------------ class picker
function renderClassList() {
  const query = $("class-search").value.trim().toLowerCase();
  const list = $("class-list");
  list.replaceChildren();
  let shown = 0;
  state.info.classes.forEach((name, id) => {
    if (shown >= MAX_LISTED) return;
    if (query && !name.toLowerCase().includes(query) && String(id) !== query) return;
    const label = document.createElement("label");
    const box = document.createElement("input");
    box.type = "checkbox";
    box.className = "class-option";
    box.dataset.id = id;
    box.checked = state.chosen.includes(id);
    box.addEventListener("change", () => toggleClass(id, box.checked));
    label.append(box, ` ${id}: ${name}`);
    label.title = name;
    list.append(label);
    shown += 1;
  });
}

function toggleClass(id, on) {
  state.chosen = state.chosen.filter((c) => c !== id);
  if (on) state.chosen.push(id);
  const chips = $("chosen");
  chips.replaceChildren();
  for (const c of state.chosen) {
    const chip = document.createElement("span");
    chip.className = "chip";
    chip.textContent = `${state.info.classes[c]} ×`;
    chip.title = "remove";
    chip.addEventListener("click", () => { toggleClass(c, false); renderClassList(); });
    chips.append(chip);
  }
}

// ------------------------------------------------------------------------ sampling
function downloadNpz(base64) {
  const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
  return URL.createObjectURL(new Blob([bytes], { type: "application/octet-stream" }));
}

function selectImage(img, ids, caption) {
  document.querySelectorAll("figure img.selected").forEach((el) => el.classList.remove("selected"));
  img.classList.add("selected");
  state.selected = { ids, src: img.src, caption };
}

async function sample() {
  if (!state.chosen.length) throw new Error("choose at least one class");
  const body = { classes: state.chosen, count: Number($("count").value), ...settings() };
  const out = await api("/api/sample", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  const grid = $("samples");
  grid.replaceChildren();
  out.images.forEach((src, i) => {
    const caption = `${out.class_names[i]} #${i}`;
    const fig = figure(src, caption, (img) => { selectImage(img, out.ids[i], caption); showScales(); });
    grid.append(fig);
    if (i === 0) selectImage(fig.querySelector("img"), out.ids[0], caption);
  });
  $("download-png").href = out.grid_png;
  $("download-npz").href = downloadNpz(out.npz);
  $("sample-downloads").hidden = false;
  $("command-text").textContent = out.command;
  $("sample-command").hidden = false;
}

// ------------------------------------------------------------------------ scale by scale
async function showScales() {
  selectTab("scales");
  if (!state.selected) return;
  $("scales-hint").textContent =
    `${state.selected.caption}: the image decoded from scales 1..k of both branches`;
  $("scales-source").replaceChildren(figure(state.selected.src, "final"));
  const strip = $("scales");
  strip.replaceChildren();
  try {
    const out = await api("/api/scales", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ ids: state.selected.ids }),
    });
    out.images.forEach((src, s) => {
      strip.append(figure(src, `scale ${s + 1}: ${out.scales[s]}×${out.scales[s]}`));
    });
  } catch (err) {
    showError(err.message);
  }
}

// ------------------------------------------------------------------------ branches
function imageForm(fileInput, demoSelect, field) {
  const form = new FormData();
  const file = $(fileInput).files[0];
  if (file) form.append("image" + field, file);
  else if ($(demoSelect).value) form.append("demo" + field, $(demoSelect).value);
  else {
    const which = field ? field.slice(1).toUpperCase() : "A";
    throw new Error(`choose an image file or a demo photo for image ${which}`);
  }
  return form;
}

async function reconstruct() {
  const out = await api("/api/reconstruct", { method: "POST", body: imageForm("upload-a", "demo-a", "") });
  const box = $("reconstruction");
  box.replaceChildren(figure(out.original, "original (model input)"));
  box.append(figure(out.reconstruction, `reconstruction, PSNR ${out.psnr.toFixed(2)} dB`,
                    (img) => { selectImage(img, out.ids, "reconstruction"); showScales(); }));
  const psnr = document.createElement("div");
  psnr.id = "psnr";
  psnr.textContent = `PSNR ${out.psnr.toFixed(2)} dB`;
  box.append(psnr);
}

async function resample(keep) {
  const form = imageForm("upload-a", "demo-a", "");
  const s = settings();
  form.append("keep", keep);
  form.append("classes", $("resample-class").value);
  form.append("count", $("resample-count").value);
  for (const [k, v] of Object.entries(s)) form.append(k, String(v));
  const out = await api("/api/resample", { method: "POST", body: form });
  $("reconstruction").replaceChildren(figure(out.reference, "reference"),
                                      figure(out.reconstruction, "its reconstruction"));
  const grid = $("resampled");
  grid.replaceChildren();
  out.images.forEach((src, i) => {
    const caption = `${keep} kept, ${out.class_names[i]} #${i}`;
    grid.append(figure(src, caption, (img) => { selectImage(img, out.ids[i], caption); showScales(); }));
  });
  $("resample-command-text").textContent = out.command;
  $("resample-command").hidden = false;
}

async function swap() {
  const form = imageForm("upload-a", "demo-a", "_a");
  const second = imageForm("upload-b", "demo-b", "_b");
  for (const [k, v] of second.entries()) form.append(k, v);
  const out = await api("/api/swap", { method: "POST", body: form });
  $("swapped").replaceChildren(
    figure(out.reconstruction_a, `A reconstructed (${out.psnr_a.toFixed(1)} dB)`),
    figure(out.reconstruction_b, `B reconstructed (${out.psnr_b.toFixed(1)} dB)`),
    figure(out.detail_a_semantic_b, "detail of A + semantic of B"),
    figure(out.detail_b_semantic_a, "detail of B + semantic of A"));
}

// ------------------------------------------------------------------------ set-up
function selectTab(name) {
  document.querySelectorAll(".tabs button").forEach(
    (b) => b.classList.toggle("active", b.dataset.tab === name));
  document.querySelectorAll(".tab").forEach((t) => { t.hidden = t.id !== `tab-${name}`; });
}

async function init() {
  try {
    state.info = await api("/api/info");
  } catch (err) {
    showError(`cannot reach the server: ${err.message}`);
    return;
  }
  const info = state.info;
  $("bundle-info").textContent =
    `${info.bundle} · ${info.num_classes} classes (${info.class_names_from}) · ` +
    `${info.resolution} px · scales ${info.scales.join(", ")}`;
  const d = info.defaults;
  $("cfg").value = d.cfg;
  $("top-k").value = d.top_k;
  $("top-p").value = d.top_p;
  $("temperature").value = d.temperature;
  $("seed").value = d.seed;
  $("count").max = info.limits.max_per_class;
  $("random-seed").addEventListener("click", () => { $("seed").value = Math.floor(Math.random() * 1e6); });
  $("class-search").addEventListener("input", renderClassList);
  renderClassList();
  info.classes.forEach((name, id) => $("resample-class").append(new Option(`${id}: ${name}`, id)));
  for (const select of ["demo-a", "demo-b"]) {
    info.demo_photos.forEach((name) => $(select).append(new Option(name, name)));
  }
  document.querySelectorAll(".tabs button").forEach((b) => b.addEventListener("click", () => {
    if (b.dataset.tab === "scales") showScales(); else selectTab(b.dataset.tab);
  }));
  $("sample-btn").addEventListener("click", () => busy($("sample-btn"), $("sample-status"), sample));
  $("reconstruct-btn").addEventListener("click",
    () => busy($("reconstruct-btn"), $("branch-status"), reconstruct));
  $("keep-detail-btn").addEventListener("click",
    () => busy($("keep-detail-btn"), $("branch-status"), () => resample("detail")));
  $("keep-semantic-btn").addEventListener("click",
    () => busy($("keep-semantic-btn"), $("branch-status"), () => resample("semantic")));
  $("swap-btn").addEventListener("click", () => busy($("swap-btn"), $("branch-status"), swap));
}

document.addEventListener("DOMContentLoaded", init);
