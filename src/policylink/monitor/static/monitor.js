// policylink monitor: reads /events (server-sent events) and draws the loop live.
// No library, no CDN: plain DOM and canvas, so the page works offline.
"use strict";

const COLORS = ["#58a6ff", "#f0883e", "#3fb950", "#d2a8ff", "#f85149", "#e3b341", "#39c5cf", "#ff7b72",
                "#a5d6ff", "#ffa657", "#7ee787", "#bc8cff"];
const $ = (id) => document.getElementById(id);
// This monitor session's token (the server writes it into the page): every button press sends it.
const TOKEN = document.querySelector('meta[name="policylink-token"]')?.content || "";

// What the page knows; exposed as window.monitor for tests and for the curious.
const monitor = {
  config: { window_s: 10, fps: null, controls: false, replay: false },
  samples: [],        // {t, step, episode, state, action, fresh, recorded (replay only)}
  latencies: [],      // {t, roundtrip_ms, infer_ms}
  chunk: null,        // the latest chunk: {chunk_id, obs_step, actions, t}
  updates: 0,
  framesLoaded: 0,
  plotsDrawn: 0,
  lastStatus: null,
  lastLoop: null,
  refused: null,      // requests the monitor refused: {total, by_reason, last}
};
window.monitor = monitor;

// name -> {img, shownSeq, loading}. A Map: a camera may be called "constructor" or "__proto__".
const cameras = new Map();

function connect() {
  const events = new EventSource("/events");
  events.addEventListener("hello", (e) => {
    Object.assign(monitor.config, JSON.parse(e.data));
    $("title").textContent = monitor.config.title || "policylink monitor";
    document.title = $("title").textContent;
    enableButtons(monitor.config.controls);
    const info = monitor.config.info || {};
    $("message").textContent = Object.entries(info).map(([k, v]) => `${k}: ${v}`).join(" · ");
    showReplay(monitor.config.replay);
  });
  events.addEventListener("update", (e) => onUpdate(JSON.parse(e.data)));
  events.onopen = () => $("conn").classList.add("live");
  events.onerror = () => $("conn").classList.remove("live");  // EventSource reconnects by itself
}

function enableButtons(controls) {
  monitor.config.controls = Boolean(controls);
  for (const id of ["btn-start", "btn-stop", "btn-reset"]) $(id).disabled = !controls;
}

// A replayed episode: the recorded actions are drawn dotted, and |served - recorded| is in the status.
function showReplay(replay) {
  monitor.config.replay = Boolean(replay);
  $("replay-stat").hidden = !replay;
  $("action-title").textContent = replay
    ? "Executed action · recorded (dotted) · latest chunk (dashed, ahead of now)"
    : "Executed action · latest chunk (dashed, ahead of now)";
}

function onUpdate(msg) {
  monitor.updates += 1;
  monitor.samples.push(...msg.samples);
  monitor.latencies.push(...msg.latencies);
  if (msg.chunk) monitor.chunk = msg.chunk;
  const newest = monitor.samples.length ? monitor.samples[monitor.samples.length - 1].t : Date.now() / 1000;
  const oldest = newest - monitor.config.window_s;
  while (monitor.samples.length && monitor.samples[0].t < oldest) monitor.samples.shift();
  while (monitor.latencies.length && monitor.latencies[0].t < oldest) monitor.latencies.shift();
  monitor.lastStatus = msg.status;
  monitor.lastLoop = msg.loop;
  monitor.refused = msg.refused || null;
  // The page connected before the loop was attached: the loop's status says the buttons work now.
  if (!monitor.config.controls && msg.loop && Object.keys(msg.loop).length) enableButtons(true);
  showStatus(msg.status, msg.loop);
  showWarnings(msg.status, msg.refused);
  showFrames(msg.frames);
  draw(newest);
}

function showStatus(status, loop) {
  $("episode").textContent = status.episode;
  $("step").textContent = status.step;
  const done = status.episodes_done ? ` (${status.successes}/${status.episodes_done} episodes)` : "";
  $("success").textContent = (status.success ? "yes" : "no") + done;
  $("success").className = status.success ? "success" : "";
  $("rate").textContent = status.loop_hz.toFixed(1);
  const lat = status.latencies || {};
  const last = monitor.latencies[monitor.latencies.length - 1] || {};
  const roundtrip = lat.roundtrip_ms ?? last.roundtrip_ms;
  const infer = lat.infer_ms ?? last.infer_ms;
  $("latency").textContent = roundtrip === undefined ? "–" : roundtrip.toFixed(1);
  $("infer").textContent = infer === undefined ? "–" : infer.toFixed(1);
  const replay = status.replay;
  if (replay && !monitor.config.replay) showReplay(true);  // the page connected before the replay was attached
  if (replay && replay.steps) {
    $("replay-error").textContent = `${replay.mean_abs_error.toFixed(4)} (max ${replay.max_abs_error.toFixed(4)})`;
  } else if (replay) {
    $("replay-error").textContent = "–";
  }
  // The loop's own state word (running, paused, waiting...) when it has one.
  if (loop && loop.state) $("running").textContent = loop.state;
  else if (loop && "running" in loop) $("running").textContent = loop.running ? "running" : "stopped";
}

// What the operator should know: requests the monitor refused, cameras it cannot show.
function showWarnings(status, refused) {
  const lines = [];
  if (refused && refused.total) lines.push(`refused ${refused.total} request(s) not from this page; last: ${refused.last}`);
  for (const [name, why] of Object.entries((status && status.cameras_refused) || {})) lines.push(`camera ${name} not shown: ${why}`);
  const text = lines.join(" · ");
  if ($("warnings").textContent !== text) $("warnings").textContent = text;
}

function showFrames(frames) {
  for (const [name, seq] of Object.entries(frames || {})) {
    let cam = cameras.get(name);
    if (!cam) {
      $("no-camera")?.remove();
      const figure = document.createElement("figure");
      const img = document.createElement("img");
      img.alt = name;
      img.dataset.camera = name;
      const caption = document.createElement("figcaption");
      caption.textContent = name;
      figure.append(img, caption);
      $("cameras").append(figure);
      cam = { img, shownSeq: -1, loading: false };
      cameras.set(name, cam);
      img.onload = () => { cam.loading = false; monitor.framesLoaded += 1; };
      img.onerror = () => { cam.loading = false; };
    }
    // One request at a time per camera: a slow link skips frames instead of queueing them.
    if (seq !== cam.shownSeq && !cam.loading) {
      cam.loading = true;
      cam.shownSeq = seq;
      // Percent-encoded: slashes, "..", spaces, quotes and non-ASCII names all stay one path segment.
      cam.img.src = `/frame/${encodeURIComponent(name)}.jpg?seq=${seq}`;
    }
  }
}

// -- plots ------------------------------------------------------------------

function stepPeriod() {
  if (monitor.config.fps) return 1 / monitor.config.fps;
  const s = monitor.samples;
  if (s.length > 2) return Math.max(1e-3, (s[s.length - 1].t - s[0].t) / (s.length - 1));
  return 1 / 30;
}

function draw(now) {
  const dt = stepPeriod();
  const chunk = monitor.chunk;
  // The latest chunk is drawn from the time of the observation it answers, so
  // the actions still to come lie right of "now".
  let chunkLines = null, ahead = monitor.config.window_s * 0.15;
  if (chunk && chunk.actions.length) {
    const origin = monitor.samples.find((s) => s.step === chunk.obs_step && s.episode === chunk.episode);
    const t0 = origin ? origin.t : chunk.t;
    chunkLines = chunk.actions.map((row, k) => ({ t: t0 + k * dt, v: row }));
    ahead = Math.max(ahead, chunkLines[chunkLines.length - 1].t - now);
  }
  const range = [now - monitor.config.window_s, now + ahead];
  const joints = (n) => Array.from({ length: n }, (_, i) => `${i}`);
  const last = monitor.samples[monitor.samples.length - 1] || {};
  plot($("plot-state"), range, now, [{ points: monitor.samples.filter((s) => s.state).map((s) => ({ t: s.t, v: s.state })) }], joints((last.state || []).length));
  plot($("plot-action"), range, now, [
    { points: monitor.samples.filter((s) => s.action).map((s) => ({ t: s.t, v: s.action })) },
    // A replayed episode: the recorded action each executed one is compared with.
    { points: monitor.samples.filter((s) => s.recorded).map((s) => ({ t: s.t, v: s.recorded })), dotted: true },
    { points: chunkLines || [], dashed: true },
  ], joints((last.action || []).length));
  plot($("plot-latency"), range, now, [
    { points: monitor.latencies.map((l) => ({ t: l.t, v: [l.roundtrip_ms, l.infer_ms ?? NaN] })), dots: true },
  ], ["round trip", "server infer"]);
  monitor.plotsDrawn += 1;
}

// A short axis label: values within a thousandth of the range of zero are zero.
function label(v, span) {
  return Math.abs(v) < span * 1e-3 ? "0" : String(Number(v.toPrecision(3)));
}

function plot(canvas, [t0, t1], now, series, legend = []) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth, height = canvas.clientHeight;
  if (canvas.width !== width * ratio) { canvas.width = width * ratio; canvas.height = height * ratio; }
  const g = canvas.getContext("2d");
  g.setTransform(ratio, 0, 0, ratio, 0, 0);
  g.clearRect(0, 0, width, height);
  let lo = Infinity, hi = -Infinity;
  for (const s of series) for (const p of s.points) for (const v of p.v) if (Number.isFinite(v)) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
  if (!Number.isFinite(lo)) { g.fillStyle = "#8b95a3"; g.fillText("waiting for data…", 8, 16); return; }
  if (hi - lo < 1e-6) { hi += 0.5; lo -= 0.5; }
  const pad = (hi - lo) * 0.08; lo -= pad; hi += pad;
  const left = 44, x = (t) => left + (t - t0) / (t1 - t0) * (width - left - 4), y = (v) => 4 + (hi - v) / (hi - lo) * (height - 20);
  // Axes: value labels, a line at "now", seconds below.
  g.font = "11px system-ui, sans-serif"; g.fillStyle = "#8b95a3"; g.strokeStyle = "#2b323c"; g.lineWidth = 1;
  for (const v of [lo + pad, (lo + hi) / 2, hi - pad]) { g.fillText(label(v, hi - lo), 2, y(v) + 4); g.beginPath(); g.moveTo(left, y(v)); g.lineTo(width, y(v)); g.stroke(); }
  g.strokeStyle = "#8b95a3"; g.beginPath(); g.moveTo(x(now), 0); g.lineTo(x(now), height - 14); g.stroke();
  g.fillText("now", x(now) + 3, height - 2);
  g.fillText(`-${(now - t0).toFixed(0)} s`, left, height - 2);
  for (const s of series) {
    const dims = s.points.length ? s.points[0].v.length : 0;
    g.setLineDash(s.dashed ? [5, 4] : s.dotted ? [1.5, 3] : []);
    g.lineWidth = s.dashed || s.dotted ? 1.2 : 1.5;
    for (let d = 0; d < dims; d++) {
      g.strokeStyle = g.fillStyle = COLORS[d % COLORS.length];
      g.beginPath();
      let pen = false;
      for (const p of s.points) {
        const v = p.v[d];
        if (!Number.isFinite(v) || p.t < t0) { pen = false; continue; }
        if (s.dots) g.fillRect(x(p.t) - 1.5, y(v) - 1.5, 3, 3);
        pen ? g.lineTo(x(p.t), y(v)) : g.moveTo(x(p.t), y(v));
        pen = true;
      }
      g.stroke();
    }
  }
  g.setLineDash([]);
  // Legend, right-aligned at the top: one coloured name per line (joint index or latency kind).
  g.textAlign = "right";
  let right = width - 6;
  for (let d = legend.length - 1; d >= 0; d--) {
    g.fillStyle = COLORS[d % COLORS.length];
    g.fillText(legend[d], right, 12);
    right -= g.measureText(legend[d]).width + 8;
  }
  g.textAlign = "left";
}

// -- buttons ----------------------------------------------------------------

async function act(action) {
  try {
    const response = await fetch(`/api/${action}`, { method: "POST", headers: { "X-Policylink-Token": TOKEN } });
    const body = await response.json();
    $("message").textContent = response.ok ? `${action}: ok` : `${action}: ${body.error}`;
    if (body.loop) showStatus(monitor.lastStatus || { episode: "–", step: "–", loop_hz: 0 }, body.loop);
  } catch (err) {
    $("message").textContent = `${action} failed: ${err}`;
  }
}
$("btn-start").onclick = () => act("start");
$("btn-stop").onclick = () => act("stop");
$("btn-reset").onclick = () => act("reset");

connect();
