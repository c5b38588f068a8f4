// ptylive live viewer: the page's state and every request it makes (drawing is in draw.js).
//
// Server-sent events from /events drive the page: each "preview" event brings the series' counts and
// per-tile quality, and the mosaic is fetched once per event (at most the daemon's preview rate; one
// image in flight, later events coalesce). /status and /tiles are read again on every (re)connect and
// after a "resync", so a restarted daemon or dropped events cost nothing. Only the daemon is asked.
// Each preview event also adds a point to every tile's loss curve (seeded from /tiles' loss_curves) and
// re-reads virtual.json and the chosen virtual.png (one request in flight; none once the daemon said 404).
// Each "diffraction" event reloads probe.png and diffraction.png (the mean pattern) once.
import {$, clearCoverage, drawCoverage, drawLossCurves, render, renderColourBar, renderProgress, renderScaleBar,
        setConnection, setPatternText, setSlices, setVirtualKinds, showMosaic, showNoPreview, showPattern,
        showVirtual} from "./draw.js";

const RECONNECT_MS = 2000;     // when the browser gave up on the stream (an HTTP error, not a network one)
const STATUS_EVERY_MS = 2000;  // /status (coverage map, ingest counters) at most this often while previews arrive
const STATUS_IDLE_MS = 10000;  // and this often without previews (worker heartbeats, a refused series)
const RATE_WINDOW_S = 10;      // frame rate over the previews of the last seconds
const NO_PREVIEW = "no preview yet: start a scan, the mosaic appears with its first tiles";

const state = {
  seriesId: null, objectShape: null, framesReceived: null, framesExpected: null, iteration: null, tiles: [],
  ended: false, version: 0, record: null, samples: [], lastPreviewMs: null, coverageShown: false,
  finished: [], workersUp: [], heartbeatAge: {}, workerErrors: [], pixelSizeA: null,
  phaseRange: null, sliceRanges: [], lossCurves: {},
};
const virtual = {served: true, loading: false, again: false, kind: null, shown: null};
const pattern = {loading: false, next: null, shown: {probe: null, diffraction: null}};
const TOKEN_KEY = "ptylive.control-token";  // sessionStorage only: gone with the tab, never in the page
const LOSS_POINTS = 2000;      // per tile, as rank 0 keeps
const preview = {loading: false, pending: null};
let tilesDue = 0;
let source = null;
let statusDue = 0;
let statusInFlight = false;

async function getJson(path) {
  const response = await fetch(path, {cache: "no-store"});
  if (!response.ok) { throw new Error(path + ": HTTP " + response.status); }
  return response.json();
}

// ---- the event stream ------------------------------------------------------------------------------
function connect() {
  if (source) { source.close(); }
  source = new EventSource("events");
  source.onopen = () => { setConnection("live"); refreshAll(); };
  source.onerror = () => {
    setConnection("reconnecting");
    if (source.readyState === EventSource.CLOSED) { setTimeout(connect, RECONNECT_MS); }
  };
  source.addEventListener("series_start", (event) => onSeriesStart(JSON.parse(event.data)));
  source.addEventListener("preview", (event) => onPreview(JSON.parse(event.data)));
  source.addEventListener("series_end", (event) => onSeriesEnd(JSON.parse(event.data)));
  source.addEventListener("resync", () => refreshAll());
  source.addEventListener("virtual", () => refreshVirtual());  // if the daemon announces new virtual images
  source.addEventListener("diffraction", (event) => loadPattern(JSON.parse(event.data)));
}

function newSeries(seriesId) {
  renderScaleBar(null, null);
  Object.assign(state, {seriesId, pixelSizeA: null, objectShape: null, framesReceived: null, framesExpected: null, iteration: null,
                        tiles: [], ended: false, version: 0, record: null, samples: [], lastPreviewMs: null,
                        coverageShown: false, phaseRange: null, sliceRanges: [], lossCurves: {}});
  Object.assign(virtual, {served: true, shown: null});
  showVirtual(null, "no virtual images yet");
  pattern.shown = {probe: null, diffraction: null};
  showPattern("probe", null);
  showPattern("diffraction", null);
  setPatternText("no frames yet");
  drawLossCurves(state.lossCurves);
  renderMosaicColourBar();
  setSlices(1);
  clearCoverage(seriesId ? "no coverage map yet" : "no series running");
}

function onSeriesStart(data) {
  newSeries(data.series_id);
  Object.assign(state, {framesExpected: data.frames_expected, objectShape: data.object_shape});
  showNoPreview("series " + data.series_id + " started: the mosaic appears with its first tiles");
  render(state);
}

function onPreview(data) {
  if (data.series_id !== state.seriesId) { newSeries(data.series_id); }
  Object.assign(state, {framesReceived: data.frames_received, framesExpected: data.frames_expected,
                        iteration: data.iteration, tiles: data.tiles || [], objectShape: data.object_shape,
                        version: data.version, lastPreviewMs: Date.now()});
  setSlices(data.n_slices || 1);
  state.phaseRange = data.phase_range_rad ?? state.phaseRange;
  for (const tile of state.tiles) { addLossPoint(tile.worker, tile.iteration, tile.loss_per_frame); }
  drawLossCurves(state.lossCurves);
  renderMosaicColourBar();
  refreshVirtual();
  if ($("slice").value !== "projected" && Date.now() >= tilesDue) { refreshTiles(); }  // the slice's range
  state.samples.push([data.published_s, data.frames_received]);
  while (state.samples.length > 2 && data.published_s - state.samples[0][0] > RATE_WINDOW_S) { state.samples.shift(); }
  render(state);
  requestPreview();
  if (Date.now() >= statusDue) { refreshStatus(); }
}

function onSeriesEnd(data) {
  state.finished = [data, ...state.finished.filter((f) => f.series_id !== data.series_id)];
  if (data.series_id === state.seriesId) {
    state.ended = true;
    showCoverage(data.coverage);
  }
  render(state);
  refreshStatus();
  refreshTiles();
}

// ---- reads on (re)connect ----------------------------------------------------------------------------
async function refreshAll() {  // in order: /status says which series /tiles must belong to
  await refreshStatus();
  await refreshTiles();
  requestPreview();
  virtual.served = true;  // a restarted (or upgraded) daemon may serve them now
  refreshVirtual();
  loadPattern({series_id: state.seriesId, version: "connect-" + Date.now()});  // what the daemon has now, if any
}

async function refreshStatus() {
  if (statusInFlight) { return; }
  statusInFlight = true;
  statusDue = Date.now() + STATUS_EVERY_MS;
  try {
    applyStatus(await getJson("status"));
  } catch (error) {
    // the connection badge already says the daemon is away; keep what is shown
  } finally {
    statusInFlight = false;
  }
}

function applyStatus(s) {
  if (s.series_id && s.series_id !== state.seriesId) { newSeries(s.series_id); }
  if (!s.series_id && state.seriesId) {  // a restarted daemon remembers no series
    newSeries(null);
    showNoPreview(NO_PREVIEW);
  }
  const registry = (s.ingest && s.ingest.registry) || {};
  const records = [registry.current, ...(registry.queued || []), ...(registry.finished || []).slice().reverse()];
  state.record = records.find((r) => r && r.series_id === state.seriesId) || null;
  if (state.record) { Object.assign(state, {framesReceived: state.record.received, framesExpected: state.record.n_expected}); }
  state.iteration = s.iteration ?? state.iteration;
  state.finished = (s.finished || []).slice().reverse();
  state.ended = state.ended || state.finished.some((f) => f.series_id === state.seriesId);
  Object.assign(state, {workersUp: s.workers_up || [], heartbeatAge: s.heartbeat_age_s || {},
                        workerErrors: s.worker_errors || []});
  if (!showCoverage(s.coverage) && state.seriesId && !state.coverageShown) { clearCoverage("no coverage map yet"); }
  render(state);
}

function showCoverage(coverage) {  // /status' map while the series runs; the final one from series_end or /tiles
  if (!coverage || coverage.series_id !== state.seriesId) { return false; }
  drawCoverage(coverage, state.ended);
  state.coverageShown = true;
  return true;
}

async function refreshTiles() {
  tilesDue = Date.now() + STATUS_EVERY_MS;
  try {
    const data = await getJson("tiles");
    if (data.series_id && data.series_id === state.seriesId) {
      Object.assign(state, {tiles: data.tiles || [], objectShape: data.object_shape || state.objectShape,
                            pixelSizeA: data.pixel_size_A ?? state.pixelSizeA,
                            phaseRange: data.phase_range_rad ?? state.phaseRange,
                            sliceRanges: data.slice_ranges_rad || state.sliceRanges});
      for (const curve of data.loss_curves || []) {
        curve.iteration.forEach((iteration, k) => addLossPoint(curve.worker, iteration, curve.loss_per_frame[k]));
      }
      drawLossCurves(state.lossCurves);
      renderMosaicColourBar();
      renderScaleBar(state.objectShape, state.pixelSizeA);
      setSlices(data.n_slices || 1);
      showCoverage(data.coverage);  // the final map, once the series is finished
      render(state);
    }
  } catch (error) {
    // as above
  }
}

function addLossPoint(worker, iteration, lossPerFrame) {  // kept in iteration order, one point per iteration
  if (typeof iteration !== "number" || typeof lossPerFrame !== "number" || !Number.isFinite(lossPerFrame)) { return; }
  const curve = state.lossCurves[worker] || (state.lossCurves[worker] = []);
  const at = curve.findIndex((point) => point[0] >= iteration);
  if (at === -1) { curve.push([iteration, lossPerFrame]); } else if (curve[at][0] !== iteration) {
    curve.splice(at, 0, [iteration, lossPerFrame]);
  }
  if (curve.length > LOSS_POINTS) { curve.splice(0, curve.length - LOSS_POINTS); }
}

function renderMosaicColourBar() {  // the range preview.png maps to black and white, of the view shown
  const chosen = $("slice").value;
  renderColourBar("colour-bar", chosen === "projected" ? state.phaseRange : state.sliceRanges[Number(chosen)], "rad");
}

// ---- virtual images (virtual.json, virtual.png) ----------------------------------------------------
async function refreshVirtual() {
  if (!virtual.served) { return; }
  if (virtual.loading) { virtual.again = true; return; }
  virtual.loading = true;
  try {
    const response = await fetch("virtual.json", {cache: "no-store"});
    if (response.status === 404) {
      virtual.served = false;
      showVirtual(null, "this daemon serves no virtual images");
      return;
    }
    if (!response.ok) { throw new Error("virtual.json: HTTP " + response.status); }
    const index = await response.json();
    const images = index.images || [];
    if (!images.length || index.series_id !== state.seriesId) {
      if (!virtual.shown) { showVirtual(null, "no virtual images yet: they start with the first frame"); }
      return;
    }
    virtual.kind = setVirtualKinds(images, virtual.kind);
    const chosen = images.find((image) => image.kind === virtual.kind);
    await loadVirtual(chosen, index);
  } catch (error) {
    // the connection badge says when the daemon is away; keep what is shown
  } finally {
    virtual.loading = false;
    if (virtual.again) { virtual.again = false; refreshVirtual(); }
  }
}

function loadVirtual(chosen, index) {  // resolves once the image is swapped in (or failed)
  const url = "virtual.png?kind=" + encodeURIComponent(chosen.kind) + "&v=" +
    encodeURIComponent(index.series_id + "." + index.frames_filled);
  if (virtual.shown === url) { return Promise.resolve(); }
  return new Promise((resolve) => {
    const next = new Image();
    next.onload = () => {
      Object.assign(next, {id: "virtual", alt: (chosen.label || chosen.kind) + " of " + index.series_id});
      next.dataset.src = url;
      virtual.shown = url;
      const label = chosen.label || chosen.kind;  // the daemon's labels name their ring already
      showVirtual(next, label + ": " + index.frames_filled + " of " + index.frames_expected + " frames" +
        (chosen.inner_mrad !== null && chosen.inner_mrad !== undefined && !label.includes("mrad")
          ? ", " + chosen.inner_mrad + "\u2013" + chosen.outer_mrad + " mrad" : ""));
      renderColourBar("virtual-colour", [chosen.finite_min, chosen.finite_max], chosen.units || "");
      resolve();
    };
    next.onerror = () => resolve();  // 404 before the first frame of this kind: keep what is shown
    next.src = url;
  });
}

// ---- probe and mean diffraction pattern (probe.png, diffraction.png) --------------------------------
async function loadPattern(data) {  // data: the "diffraction" event (or what is known on connect)
  if (pattern.loading) { pattern.next = data; return; }  // events meanwhile collapse into the latest
  pattern.loading = true;
  try {
    const version = encodeURIComponent((data.series_id || "none") + "." + data.version);
    const [probe, diffraction] = await Promise.all(["probe", "diffraction"].map(
      (which) => loadPatternImage(which, which + ".png?v=" + version)));
    if (data.frames_summed !== undefined && data.series_id === state.seriesId) {
      setPatternText("mean of " + data.frames_summed + " frames (" + data.detector_px + " \u00d7 " + data.detector_px +
                     " px)" + (data.probe_shape ? "; probe of worker 0" : "; no probe yet"));
    } else if (diffraction || probe) {
      setPatternText("as the daemon holds it now");
    }
  } finally {
    pattern.loading = false;
    if (pattern.next) { const next = pattern.next; pattern.next = null; loadPattern(next); }
  }
}

function loadPatternImage(which, url) {  // resolves true once shown, false if the daemon has none (404)
  if (pattern.shown[which] === url) { return Promise.resolve(true); }
  return new Promise((resolve) => {
    const next = new Image();
    next.onload = () => {
      Object.assign(next, {id: which, alt: $(which).alt});
      next.dataset.src = url;
      pattern.shown[which] = url;
      showPattern(which, next);
      resolve(true);
    };
    next.onerror = () => resolve(false);  // none yet (404): keep what is shown
    next.src = url;
  });
}

// ---- the mosaic ------------------------------------------------------------------------------------
function requestPreview() {
  preview.pending = "preview.png?slice=" + encodeURIComponent($("slice").value) + "&v=" +
    encodeURIComponent((state.seriesId || "none") + "." + state.version);
  if (!preview.loading) { loadPreview(); }
}

function loadPreview() {
  const url = preview.pending;
  preview.pending = null;
  if (url === null) { return; }
  preview.loading = true;
  const next = new Image();
  next.onload = () => {  // swapped in once decoded: no flicker, and no second request
    Object.assign(next, {id: "mosaic", alt: "phase mosaic of " + state.seriesId});
    next.dataset.src = url;
    showMosaic(next);
    preview.loading = false;
    loadPreview();
  };
  next.onerror = () => {  // 404 before the first preview (or of a slice not there yet): keep what is shown
    if (!state.version) { showNoPreview(NO_PREVIEW); }
    preview.loading = false;
    loadPreview();
  };
  next.src = url;
}

// ---- finalize / abort ------------------------------------------------------------------------------
async function sendControl(action) {  // POST control with the token the operator typed; the daemon decides
  const token = $("control-token").value.trim();
  sessionStorage.setItem(TOKEN_KEY, token);
  const result = $("control-result");
  const headers = {"Content-Type": "application/json"};
  if (token) { headers.Authorization = "Bearer " + token; }
  let text, ok = false;
  try {
    const response = await fetch("control", {method: "POST", headers, cache: "no-store",
                                             body: JSON.stringify({action, series_id: state.seriesId})});
    const body = await response.json().catch(() => ({}));
    ok = response.ok;
    text = ok ? action + ": " + (body.message || "accepted")
              : action + " refused (HTTP " + response.status + "): " + (body.error || body.message || response.statusText);
  } catch (error) {
    text = action + " not sent: " + error.message;
  }
  Object.assign(result, {textContent: text, className: ok ? "accepted" : "refused"});
  result.dataset.status = ok ? "accepted" : "refused";
}

$("control-token").value = sessionStorage.getItem(TOKEN_KEY) || "";
$("finalize").addEventListener("click", () => sendControl("finalize"));
$("abort").addEventListener("click", () => sendControl("abort"));
$("slice").addEventListener("change", () => { requestPreview(); renderMosaicColourBar(); refreshTiles(); });
$("virtual-kind").addEventListener("change", () => { virtual.kind = $("virtual-kind").value; virtual.shown = null;
                                                     refreshVirtual(); });
$("show-overlay").addEventListener("change", () => $("overlay").classList.toggle("off", !$("show-overlay").checked));
setInterval(() => {
  renderProgress(state);  // the "last preview … ago" clock
  const open = source && source.readyState === EventSource.OPEN;
  if (open && Date.now() >= statusDue - STATUS_EVERY_MS + STATUS_IDLE_MS) { refreshStatus(); }
}, 1000);
connect();
