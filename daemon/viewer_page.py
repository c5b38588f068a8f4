"""The live viewer page served at ``/`` by :mod:`ptylive.daemon.http_api`.

Self-contained (inline CSS and JS, no external resources) so it works on a
beamline network with no internet. It polls, each about once a second:

- ``/preview.png?t=<ms>`` (cache-busting query), swapped in only once loaded so it never flickers;
- ``/status`` for the status line (``series_id``, ``frames_received``/``frames_expected``, ``iteration``);
- ``/tiles`` and draws its ``tiles`` list (flat objects) as a table, one column per key.

Every value is written with ``textContent``, never as HTML.
"""

from __future__ import annotations

VIEWER_HTML = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>ptylive</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 0.5rem; background: #111; color: #ddd; }
  h1 { font-size: 1.1rem; margin: 0 0 0.4rem 0; }
  #status { font-family: ui-monospace, monospace; margin-bottom: 0.5rem; overflow-wrap: anywhere; }
  #status.stale { color: #e88; }
  #preview-box { background: #000; max-width: 100%; text-align: center; }
  #preview { max-width: 100%; width: 720px; height: auto; image-rendering: pixelated; display: block;
             margin: 0 auto; }
  #no-preview { padding: 2rem 0; color: #888; }
  .scroll { overflow-x: auto; margin-top: 0.5rem; }
  table { border-collapse: collapse; font-size: 0.85rem; font-family: ui-monospace, monospace; }
  th, td { border: 1px solid #444; padding: 0.15rem 0.4rem; text-align: right; white-space: nowrap; }
  th { background: #222; }
</style>
</head>
<body>
<h1>ptylive live preview</h1>
<div id="status">connecting&hellip;</div>
<div id="preview-box">
  <img id="preview" alt="projected phase mosaic" hidden>
  <div id="no-preview">no preview yet</div>
</div>
<div class="scroll"><table id="tiles"><thead></thead><tbody></tbody></table></div>
<script>
"use strict";
const PERIOD_MS = 1000;

function show(value) {
  if (value === null || value === undefined) { return "-"; }
  return typeof value === "object" ? JSON.stringify(value) : String(value);
}

async function getJson(path) {
  const response = await fetch(path, {cache: "no-store"});
  if (!response.ok) { throw new Error(path + ": HTTP " + response.status); }
  return response.json();
}

async function refreshStatus() {
  const line = document.getElementById("status");
  try {
    const s = await getJson("/status");
    line.textContent = "series " + show(s.series_id) + " | frames " + show(s.frames_received) + "/" +
      show(s.frames_expected) + " | iteration " + show(s.iteration);
    line.classList.remove("stale");
  } catch (error) {
    line.textContent = "status unavailable: " + error.message;
    line.classList.add("stale");
  }
}

async function refreshTiles() {
  const table = document.getElementById("tiles");
  try {
    const data = await getJson("/tiles");
    const rows = Array.isArray(data.tiles) ? data.tiles : [];
    const columns = [];
    for (const row of rows) {
      for (const key of Object.keys(row)) { if (!columns.includes(key)) { columns.push(key); } }
    }
    const head = document.createElement("tr");
    for (const key of columns) {
      const th = document.createElement("th"); th.textContent = key; head.appendChild(th);
    }
    table.tHead.replaceChildren(head);
    const body = [];
    for (const row of rows) {
      const tr = document.createElement("tr");
      for (const key of columns) {
        const td = document.createElement("td"); td.textContent = show(row[key]); tr.appendChild(td);
      }
      body.push(tr);
    }
    table.tBodies[0].replaceChildren(...body);
  } catch (error) {
    table.tBodies[0].replaceChildren();
  }
}

function refreshPreview() {
  return new Promise((resolve) => {
    const next = new Image();
    next.onload = () => {
      next.id = "preview"; next.alt = "projected phase mosaic";
      document.getElementById("preview").replaceWith(next);  // no second fetch: no-store
      document.getElementById("no-preview").hidden = true;
      resolve();
    };
    next.onerror = () => resolve();  // 404 before the first preview: keep what is shown
    next.src = "/preview.png?t=" + Date.now();
  });
}

async function loop() {
  await Promise.all([refreshStatus(), refreshTiles(), refreshPreview()]);
  setTimeout(loop, PERIOD_MS);
}
loop();
</script>
</body>
</html>
"""
