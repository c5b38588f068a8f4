// ptylive viewer, drawing: everything here turns the page's state into DOM (as text, never as HTML).
// It asks the daemon for nothing; viewer.js owns the state and the requests.

const SILENT_WORKER_S = 5;         // a worker's heartbeat older than this is reported
const RISING_LOSS = 0.05;          // all frames in, yet loss per frame rose by more than this in an iteration
const HIGH_LOSS_VS_MEDIAN = 2;     // loss per frame this many times the tiles' median

export const $ = (id) => document.getElementById(id);

function fmt(value) {
  if (value === null || value === undefined || Number.isNaN(value)) { return "-"; }
  if (typeof value !== "number" || Number.isInteger(value)) { return String(value); }
  return Math.abs(value) >= 1e4 || Math.abs(value) < 1e-2 ? value.toExponential(2) : value.toPrecision(3);
}

function percent(fraction) {  // floor, so 99.96 % never reads 100 %
  return fraction === null || fraction === undefined ? "-" : (Math.floor(fraction * 1000) / 10) + "%";
}

function item(text, cls) {
  const li = document.createElement("li");
  li.textContent = text;
  if (cls) { li.className = cls; }
  return li;
}

export function setConnection(name) {
  const badge = $("connection");
  badge.dataset.state = name;
  badge.textContent = name === "live" ? "live" : "reconnecting\u2026";
}

export function showNoPreview(text) {
  $("mosaic-frame").hidden = true;
  $("no-preview").hidden = false;
  $("no-preview").textContent = text;
}

export function showMosaic(image) {
  $("mosaic").replaceWith(image);
  $("mosaic-frame").hidden = false;
  $("no-preview").hidden = true;
}

const SCALE_FRACTION = 0.2;  // the scale bar spans about this part of the mosaic's width

export function niceLength(approx) {  // the largest 1, 2 or 5 x 10^k not above approx (approx > 0)
  const decade = Math.pow(10, Math.floor(Math.log10(approx)));
  return [5, 2, 1].map((m) => m * decade).find((v) => v <= approx) ?? decade;
}

export function renderScaleBar(objectShape, pixelSizeA) {  // a bar of a round length in Å under the mosaic
  const bar = $("scale-bar");
  if (!objectShape || !(pixelSizeA > 0)) { bar.hidden = true; return; }
  const widthA = objectShape[1] * pixelSizeA;
  const lengthA = niceLength(widthA * SCALE_FRACTION);
  $("scale-line").style.width = (100 * lengthA / widthA) + "%";
  $("scale-text").textContent = lengthA + " \u00c5";
  bar.dataset.lengthA = String(lengthA);
  bar.hidden = false;
}

export function renderColourBar(id, range, units) {  // black-to-white ramp with the values it stands for
  const bar = $(id);
  if (!Array.isArray(range) || range.length !== 2 || !range.every(Number.isFinite)) { bar.hidden = true; return; }
  bar.querySelector(".low").textContent = fmt(range[0]) + " " + units;
  bar.querySelector(".high").textContent = fmt(range[1]) + " " + units;
  Object.assign(bar.dataset, {low: String(range[0]), high: String(range[1]), units});
  bar.hidden = false;
}

const LOSS_COLOURS = ["#4a9eff", "#e9b23a", "#5c5", "#f55", "#c7f", "#4dd", "#f9a", "#aa8"];
const PLOT_MARGIN = {left: 46, right: 6, top: 6, bottom: 18};

export function drawLossCurves(curves) {  // {worker: [[iteration, loss per frame], ...]}, log scale in y
  const canvas = $("loss-plot");
  const context = canvas.getContext("2d");
  const {width, height} = canvas;
  context.fillStyle = "#000";
  context.fillRect(0, 0, width, height);
  const workers = Object.keys(curves).map(Number).sort((a, b) => a - b);
  const points = workers.flatMap((w) => curves[w]).filter((p) => p[1] > 0);
  canvas.dataset.points = JSON.stringify(Object.fromEntries(workers.map((w) => [w, curves[w].length])));
  if (!points.length) {
    $("loss-legend").replaceChildren();
    $("loss-text").textContent = "no iterations yet";
    return;
  }
  const iterations = points.map((p) => p[0]), logs = points.map((p) => Math.log10(p[1]));
  const x0 = Math.min(...iterations), x1 = Math.max(...iterations, x0 + 1);
  let y0 = Math.min(...logs), y1 = Math.max(...logs);
  if (y1 - y0 < 1e-6) { y0 -= 0.5; y1 += 0.5; }
  const px = (x) => PLOT_MARGIN.left + (x - x0) / (x1 - x0) * (width - PLOT_MARGIN.left - PLOT_MARGIN.right);
  const py = (y) => PLOT_MARGIN.top + (y1 - y) / (y1 - y0) * (height - PLOT_MARGIN.top - PLOT_MARGIN.bottom);
  context.strokeStyle = "#555";
  context.strokeRect(PLOT_MARGIN.left, PLOT_MARGIN.top, width - PLOT_MARGIN.left - PLOT_MARGIN.right,
                     height - PLOT_MARGIN.top - PLOT_MARGIN.bottom);
  context.fillStyle = "#aaa";
  context.font = "10px ui-monospace, monospace";
  context.textAlign = "right";
  context.fillText(fmt(Math.pow(10, y1)), PLOT_MARGIN.left - 3, PLOT_MARGIN.top + 8);
  context.fillText(fmt(Math.pow(10, y0)), PLOT_MARGIN.left - 3, height - PLOT_MARGIN.bottom);
  context.textAlign = "left";
  context.fillText(String(x0), PLOT_MARGIN.left, height - 4);
  context.textAlign = "right";
  context.fillText("iteration " + x1, width - PLOT_MARGIN.right, height - 4);
  const legend = [];
  workers.forEach((worker, i) => {
    const colour = LOSS_COLOURS[i % LOSS_COLOURS.length];
    const curve = curves[worker].filter((p) => p[1] > 0);
    context.strokeStyle = context.fillStyle = colour;
    context.beginPath();
    curve.forEach(([x, y], k) => context[k ? "lineTo" : "moveTo"](px(x), py(Math.log10(y))));
    context.stroke();
    if (curve.length === 1) { context.fillRect(px(curve[0][0]) - 2, py(Math.log10(curve[0][1])) - 2, 4, 4); }
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = colour;
    const entry = item("tile " + worker + ": " + fmt(curve.length ? curve[curve.length - 1][1] : null));
    entry.prepend(swatch);
    legend.push(entry);
  });
  $("loss-legend").replaceChildren(...legend);
  $("loss-text").textContent = "log scale: " + fmt(Math.pow(10, y0)) + " … " + fmt(Math.pow(10, y1)) +
    " per frame, iterations " + x0 + "–" + Math.max(...iterations);
}

export function setVirtualKinds(images, chosen) {  // the select lists what /virtual.json offers
  const select = $("virtual-kind");
  const kinds = images.map((image) => image.kind);
  if ([...select.options].map((o) => o.value).join() !== kinds.join()) {
    select.replaceChildren(...images.map((image) => {
      const option = document.createElement("option");
      Object.assign(option, {value: image.kind, textContent: image.label || image.kind});
      return option;
    }));
  }
  if (kinds.includes(chosen)) { select.value = chosen; }
  return select.value || null;
}

export function showVirtual(image, text) {  // image null: nothing to show (text says why)
  if (image) { $("virtual").replaceWith(image); }
  $("virtual-frame").hidden = !image;
  $("virtual-text").textContent = text;
}

export function showPattern(which, image) {  // which: "probe" or "diffraction"; image null: none yet
  if (image) { $(which).replaceWith(image); }
  $(which + "-frame").hidden = !image;
}

export function setPatternText(text) { $("pattern-text").textContent = text; }

export function setSlices(count) {
  const select = $("slice");
  if (select.options.length === count + 1 || (count <= 1 && select.options.length === 1)) { return; }
  const chosen = select.value;
  const options = [new Option("projected phase", "projected")];
  for (let k = 0; count > 1 && k < count; k++) {
    const side = k === 0 ? " (beam entrance)" : (k === count - 1 ? " (exit)" : "");
    options.push(new Option("slice " + (k + 1) + " of " + count + side, String(k)));
  }
  select.replaceChildren(...options);
  select.value = options.some((o) => o.value === chosen) ? chosen : "projected";
}

export function drawCoverage(coverage, final) {  // one "0101…" string per scan row
  const [rows, cols] = coverage.scan_shape;
  const canvas = $("coverage");
  Object.assign(canvas, {width: cols, height: rows, hidden: false});
  canvas.style.aspectRatio = cols + " / " + Math.max(rows, cols / 20);  // a one-row scan still shows as a band
  const context = canvas.getContext("2d");
  const image = context.createImageData(cols, rows);
  let received = 0;
  coverage.rows.forEach((line, r) => {
    for (let c = 0; c < line.length; c++) {
      received += line[c] === "1";
      image.data.set(line[c] === "1" ? [74, 158, 255, 255] : [30, 30, 30, 255], 4 * (r * cols + c));
    }
  });
  context.putImageData(image, 0, 0);
  $("coverage-text").textContent = received + " of " + rows * cols + " scan positions received (" + rows +
    " \u00d7 " + cols + "); dark: " + (final ? "never received" : "not received yet");
}

export function clearCoverage(text) {
  $("coverage").hidden = true;
  $("coverage-text").textContent = text;
}

export function render(state) {
  $("series").textContent = state.seriesId ? "series " + state.seriesId : "no series yet";
  const up = state.workersUp.length;
  $("workers").textContent = up ? up + (up === 1 ? " worker" : " workers") : "";
  renderProgress(state);
  renderTiles(state);
  renderFinished(state);
}

function frameRate(samples) {  // [[published_s, frames_received], ...]
  if (samples.length < 2) { return null; }
  const seconds = samples[samples.length - 1][0] - samples[0][0];
  return seconds >= 0.5 ? (samples[samples.length - 1][1] - samples[0][1]) / seconds : null;
}

export function renderProgress(state) {
  const received = state.framesReceived, expected = state.framesExpected;
  const fraction = received !== null && expected ? received / expected : 0;
  const missing = state.record && state.record.ended ? state.record.missing : 0;  // until the end: not yet here
  const fill = $("progress-fill");
  fill.style.width = (100 * Math.min(fraction, 1)) + "%";
  fill.className = missing > 0 ? "lossy" : (fraction >= 1 ? "done" : "");
  $("progress").setAttribute("aria-valuenow", String(Math.floor(100 * fraction)));
  if (!state.seriesId) { $("progress-text").textContent = "waiting for a series"; return; }
  const parts = ["frames " + fmt(received) + " / " + fmt(expected) + " (" + percent(received !== null ? fraction : null) + ")"];
  if (missing > 0) { parts.push(missing + " missing"); }
  const rate = frameRate(state.samples);
  if (!state.ended && rate !== null && received < expected) { parts.push(Math.round(rate) + " frames/s"); }
  const iteration = Math.max(state.iteration ?? -1, ...state.tiles.map((t) => t.iteration ?? -1));
  parts.push("iteration " + (iteration >= 0 ? iteration : "-"));
  const done = state.finished.find((f) => f.series_id === state.seriesId);
  if (done) {
    parts.push("finished: " + done.status);
  } else if (state.lastPreviewMs !== null) {
    parts.push("last preview " + ((Date.now() - state.lastPreviewMs) / 1000).toFixed(1) + " s ago");
  }
  $("progress-text").textContent = parts.join(" \u00b7 ");
}

function median(values) {
  const sorted = values.filter((v) => typeof v === "number" && v > 0).sort((a, b) => a - b);
  return sorted.length >= 2 ? sorted[Math.floor(sorted.length / 2)] : null;
}

function assess(tile, ended, medianLoss) {  // [[severity, text], ...] for one tile
  const received = tile.frames_received ?? 0, expected = tile.frames_expected ?? 0;
  const issues = [];
  if (ended && expected && received < expected) {
    issues.push(["bad", (expected - received) + " frames lost: rescan this region"]);
  }
  if (expected && received === expected && typeof tile.convergence_rate === "number" &&
      tile.convergence_rate < -RISING_LOSS) {
    issues.push(["warn", "loss per frame rising (" + percent(-tile.convergence_rate) + " in an iteration)"]);
  }
  if (medianLoss && tile.loss_per_frame > HIGH_LOSS_VS_MEDIAN * medianLoss) {
    issues.push(["warn", "loss per frame " + (tile.loss_per_frame / medianLoss).toFixed(1) + "\u00d7 the median"]);
  }
  return issues;
}

function seriesIssues(state) {
  const items = [];
  if (state.record && state.record.refusal) { items.push(item("series refused: " + state.record.refusal, "bad")); }
  if (state.record && state.record.ended && state.record.missing > 0) {
    items.push(item(state.record.missing + " frames of " + state.seriesId + " never arrived", "bad"));
  }
  for (const [worker, age] of Object.entries(state.heartbeatAge)) {
    if (age > SILENT_WORKER_S) { items.push(item("worker " + worker + " silent for " + Math.round(age) + " s", "bad")); }
  }
  for (const error of state.workerErrors.slice(-3)) { items.push(item("worker " + error.worker + ": " + error.error, "bad")); }
  return items;
}

function renderTiles(state) {
  const medianLoss = median(state.tiles.map((t) => t.loss_per_frame));
  const attention = seriesIssues(state), boxes = [], rows = [];
  for (const tile of state.tiles) {
    const issues = assess(tile, state.ended, medianLoss);
    const severity = issues.some((i) => i[0] === "bad") ? "bad" : (issues.length ? "warn" : "");
    for (const [cls, text] of issues) { attention.push(item("tile " + tile.worker + ": " + text, cls)); }
    if (state.objectShape && Array.isArray(tile.tile)) { boxes.push(tileBox(tile, severity, state.objectShape)); }
    rows.push(tileRow(tile, severity, issues));
  }
  $("overlay").replaceChildren(...boxes);
  $("overlay").classList.toggle("off", !$("show-overlay").checked);
  $("tiles").tBodies[0].replaceChildren(...rows);
  $("attention").replaceChildren(...(attention.length ? attention : [item("nothing to report", "muted")]));
}

function tileBox(tile, severity, objectShape) {  // positioned in percent of the object: follows any image size
  const [height, width] = objectShape;
  const [row0, row1, col0, col1] = tile.tile;
  const box = document.createElement("div");
  box.className = "tile " + severity;
  Object.assign(box.style, {top: (100 * row0 / height) + "%", height: (100 * (row1 - row0) / height) + "%",
                            left: (100 * col0 / width) + "%", width: (100 * (col1 - col0) / width) + "%"});
  Object.assign(box.dataset, {worker: tile.worker, framesReceived: tile.frames_received,
                              framesExpected: tile.frames_expected});
  const coverage = tile.frames_expected ? tile.frames_received / tile.frames_expected : null;
  const label = document.createElement("span");
  label.className = "label";
  label.textContent = "tile " + tile.worker + "  " + tile.frames_received + "/" + tile.frames_expected +
    " frames (" + percent(coverage) + ")";
  const detail = document.createElement("span");
  detail.className = "detail";
  detail.textContent = "\nloss/frame " + fmt(tile.loss_per_frame) + "  conv " + fmt(tile.convergence_rate) +
    "\niteration " + fmt(tile.iteration ?? tile.iterations);
  label.appendChild(detail);
  box.appendChild(label);
  return box;
}

function tileRow(tile, severity, issues) {
  const tr = document.createElement("tr");
  tr.className = severity;
  const coverage = tile.frames_expected ? tile.frames_received / tile.frames_expected : null;
  const cells = [tile.worker, tile.iteration ?? tile.iterations, tile.frames_received + "/" + tile.frames_expected,
                 percent(coverage), fmt(tile.loss_per_frame), fmt(tile.convergence_rate), percent(tile.wait_fraction),
                 issues.length ? issues.map((i) => i[1]).join("; ") : (tile.status || "ok")];
  for (const value of cells) {
    const td = document.createElement("td");
    td.textContent = typeof value === "string" ? value : fmt(value);
    tr.appendChild(td);
  }
  return tr;
}

function renderFinished(state) {
  const entries = state.finished.map((f) => {
    const li = document.createElement("li");
    if (f.file) {
      const link = document.createElement("a");
      Object.assign(link, {href: "files/" + encodeURIComponent(f.file), textContent: f.series_id, download: f.file});
      li.appendChild(link);
    } else if (f.path) {  // written, but to the fallback folder, which /files does not serve
      li.appendChild(document.createTextNode(f.series_id + " (in the fallback folder: " + f.path + ")"));
    } else {
      li.appendChild(document.createTextNode(f.series_id + " (no file written" + (f.error ? ": " + f.error : "") + ")"));
    }
    const status = document.createElement("span");
    status.className = f.status === "complete" ? "status-complete" : "status-other";
    status.textContent = " " + f.status;
    li.append(status, " \u00b7 " + fmt(f.iterations) + " iterations");
    return li;
  });
  $("finished").replaceChildren(...(entries.length ? entries : [item("none yet", "muted")]));
}
