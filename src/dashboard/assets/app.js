// vigil dashboard: fleet, device charts, alerts and commands over the JSON bridge.
//
// Data flow: bridge messages only update in-memory state and mark what changed; a render loop
// (a timer, then requestAnimationFrame) redraws at most RENDER_HZ times per second, so a busy
// fleet (thousands of messages per second, a thousand devices) never floods the DOM.
// Every text from the network goes to the DOM through textContent, never innerHTML.

import { VigilBridge } from "./vigil-bridge.js";

const RENDER_HZ = 4;
const WINDOW_MS = 5 * 60 * 1000; // chart history per metric
const RING_CAPACITY = 600; // points per metric, at most (2 Hz over 5 minutes)
const MAX_ALERTS = 200; // alerts feed
const MAX_DEVICE_ALERTS = 50; // per device, for chart markers
const MAX_NOTICES = 50;
const VALUES_SHOWN = 4; // metrics in the fleet table's "latest values"

const SUBSCRIPTIONS = [
  ["device/+/telemetry", 0],
  ["device/+/status", 1],
  ["device/+/alerts", 1],
  ["device/+/alerts/ack", 1],
  ["device/+/predictions", 0],
];

const $ = (id) => document.getElementById(id);

// ---- state -----------------------------------------------------------------------------------

/** A bounded ring of (time ms, value) points; it grows as needed, up to its capacity. */
class Ring {
  constructor(capacity) {
    this.cap = capacity;
    this.t = new Float64Array(16);
    this.v = new Float64Array(16);
    this.start = 0;
    this.len = 0;
  }
  push(t, v) {
    if (this.len === this.t.length && this.len < this.cap) {
      const n = Math.min(this.cap, this.len * 2);
      const nt = new Float64Array(n);
      const nv = new Float64Array(n);
      for (let k = 0; k < this.len; k++) {
        const i = (this.start + k) % this.t.length;
        nt[k] = this.t[i];
        nv[k] = this.v[i];
      }
      this.t = nt;
      this.v = nv;
      this.start = 0;
    }
    const size = this.t.length;
    const i = (this.start + this.len) % size;
    this.t[i] = t;
    this.v[i] = v;
    if (this.len < size) this.len++;
    else this.start = (this.start + 1) % size;
  }
  /** Calls fn(t, v) for each point, oldest first, from time `since` on. */
  forEach(since, fn) {
    const cap = this.t.length;
    for (let k = 0; k < this.len; k++) {
      const i = (this.start + k) % cap;
      if (this.t[i] >= since) fn(this.t[i], this.v[i]);
    }
  }
  last() {
    if (this.len === 0) return null;
    const i = (this.start + this.len - 1) % this.t.length;
    return { t: this.t[i], v: this.v[i] };
  }
}

/** id -> device */
const devices = new Map();
/** Alerts feed, newest first. */
let alerts = [];
let alertSeq = 0;
let selected = null;
let sortKey = "id";
let sortDesc = false;
let filterText = "";
let user = "";
let bridge = null;

const dirty = { fleet: true, alerts: true, device: true };

function device(id) {
  let d = devices.get(id);
  if (!d) {
    d = {
      id,
      lastSeen: 0,
      status: "",
      latest: new Map(), // metric -> value
      rings: new Map(), // metric -> Ring
      predictions: new Map(), // metric -> prediction payload
      alerts: [], // newest first, bounded
      open: 0,
      row: null,
    };
    devices.set(id, d);
  }
  return d;
}

function touch(d) {
  d.lastSeen = Date.now();
  dirty.fleet = true;
  if (selected === d.id) dirty.device = true;
}

/** The device id of `device/<id>/...`, or null. */
function parseTopic(topic) {
  const parts = topic.split("/");
  if (parts[0] !== "device" || parts.length < 3 || parts[1] === "") return null;
  return { id: parts[1], kind: parts.slice(2).join("/") };
}

/** A reading's time in unix ms: its `timestamp` when plausible, else now. */
function readingTime(ts, now) {
  let t = NaN;
  if (typeof ts === "number") t = ts >= 1e11 ? ts : ts * 1000;
  else if (typeof ts === "string") t = Date.parse(ts);
  return Number.isFinite(t) && Math.abs(t - now) < 24 * 3600 * 1000 ? t : now;
}

/** The (metric, value) pairs of one flat or tagged reading (docs/topics.md). */
function readingMetrics(r, out) {
  if (!r || typeof r !== "object") return;
  if (Array.isArray(r.values)) {
    for (const v of r.values) {
      const name = v && (v.tag ?? v.name);
      if (typeof name === "string" && typeof v.value === "number" && Number.isFinite(v.value)) {
        out.push([name, v.value]);
      }
    }
    return;
  }
  for (const [k, v] of Object.entries(r)) {
    if (k !== "timestamp" && typeof v === "number" && Number.isFinite(v)) out.push([k, v]);
  }
}

function onTelemetry(d, p) {
  if (!p || typeof p !== "object") return;
  const now = Date.now();
  const readings = p.type === "batch" && Array.isArray(p.data) ? p.data : [p];
  for (const r of readings) {
    const pairs = [];
    readingMetrics(r, pairs);
    const t = readingTime(r?.timestamp ?? p.timestamp, now);
    for (const [metric, value] of pairs) {
      let ring = d.rings.get(metric);
      if (!ring) {
        if (d.rings.size >= 32) continue; // the detector's per-device cap, too
        ring = new Ring(RING_CAPACITY);
        d.rings.set(metric, ring);
      }
      ring.push(t, value);
      d.latest.set(metric, value);
    }
  }
  touch(d);
}

function onStatus(d, p) {
  const s = typeof p === "string" ? p : p && typeof p === "object" ? p.status : "";
  d.status = typeof s === "string" ? s.slice(0, 20) : "";
  touch(d);
}

function onAlert(d, p) {
  if (!p || typeof p !== "object") return;
  const a = {
    seq: ++alertSeq,
    device: d.id,
    severity: ["LOW", "MEDIUM", "HIGH", "CRITICAL"].includes(p.severity) ? p.severity : "LOW",
    kind: String(p.kind ?? ""),
    metric: String(p.metric ?? ""),
    value: p.value,
    message: String(p.message ?? ""),
    action: String(p.action ?? ""),
    timestamp: typeof p.timestamp === "number" ? p.timestamp : Date.now(),
    received: Date.now(),
    acked: null, // who acknowledged it
    ackState: "", // "", "sending", "error: ..."
    el: null,
  };
  alerts.unshift(a);
  if (alerts.length > MAX_ALERTS) alerts.length = MAX_ALERTS;
  d.alerts.unshift(a);
  if (d.alerts.length > MAX_DEVICE_ALERTS) d.alerts.length = MAX_DEVICE_ALERTS;
  d.open++;
  dirty.alerts = true;
  touch(d);
}

function markAcked(d, timestamp, by) {
  let changed = false;
  for (const a of d.alerts) {
    if (a.timestamp === timestamp && !a.acked) {
      a.acked = by || "?";
      a.ackState = "";
      d.open = Math.max(0, d.open - 1);
      changed = true;
    }
  }
  for (const a of alerts) {
    if (a.device === d.id && a.timestamp === timestamp && !a.acked) {
      a.acked = by || "?";
      a.ackState = "";
      changed = true;
    }
  }
  if (changed) {
    dirty.alerts = true;
    dirty.fleet = true;
  }
}

function onMessage(topic, payload) {
  const t = parseTopic(topic);
  if (!t) return;
  switch (t.kind) {
    case "telemetry":
      return onTelemetry(device(t.id), payload);
    case "status":
      return onStatus(device(t.id), payload);
    case "alerts":
      return onAlert(device(t.id), payload);
    case "alerts/ack":
      if (payload && payload.ack === true && typeof payload.alert_timestamp === "number") {
        markAcked(device(t.id), payload.alert_timestamp, String(payload.by ?? ""));
      }
      return;
    case "predictions": {
      if (!payload || typeof payload !== "object" || typeof payload.metric !== "string") return;
      const d = device(t.id);
      d.predictions.set(payload.metric, payload);
      if (selected === d.id) dirty.device = true;
      return;
    }
    default:
      return;
  }
}

// ---- connection ------------------------------------------------------------------------------

function notice(text, isError = false) {
  const li = document.createElement("li");
  li.textContent = `${new Date().toLocaleTimeString()} ${text}`;
  if (isError) li.className = "error";
  const list = $("notices");
  list.prepend(li);
  while (list.children.length > MAX_NOTICES) list.lastChild.remove();
}

function setState(state, detail) {
  const el = $("conn-state");
  el.textContent = state;
  el.className = `state ${state}`;
  if (detail !== undefined) $("conn-detail").textContent = detail;
  document.body.dataset.state = state;
}

function bridgeUrl() {
  const q = new URLSearchParams(location.search).get("url");
  if (q) return q;
  return `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}/ws`;
}

async function connect(creds) {
  if (bridge) {
    const old = bridge;
    bridge = null;
    old.disconnect().catch(() => {});
  }
  user = creds.username || "";
  const opts = { clean: true, keepAlive: 30 };
  if (creds.username) opts.username = creds.username;
  if (creds.password) opts.password = creds.password;
  if (creds.token) opts.token = creds.token;
  const b = new VigilBridge(bridgeUrl(), opts);
  bridge = b;
  b.on("state", (s) => bridge === b && setState(s));
  b.on("message", (topic, payload) => bridge === b && onMessage(topic, payload));
  b.on("connect", (ack) => {
    if (bridge !== b) return;
    setState("connected", `as ${user || "anonymous"} (${ack.client_id})`);
  });
  b.on("close", (info) => {
    if (bridge !== b) return;
    const why = info.reason ? `${info.code} ${info.reason}` : `${info.code}`;
    const next = info.reconnectIn === null ? "" : `, retrying in ${(info.reconnectIn / 1000).toFixed(1)} s`;
    $("conn-detail").textContent = `closed (${why})${next}`;
  });
  b.on("error", (f) => {
    if (bridge !== b) return;
    notice(`bridge error ${f.code}: ${f.message ?? ""}`, true);
    if (f.op === "connack" && f.code === "not_authorized") {
      $("conn-detail").textContent = "not authorized: log in";
      $("login-user").focus();
    }
  });
  setState("connecting", "");
  try {
    await b.connect();
  } catch (e) {
    if (bridge === b) {
      setState("closed", `refused: ${e.code ?? e.message}`);
    }
    return;
  }
  for (const [filter, qos] of SUBSCRIPTIONS) {
    b.subscribe(filter, qos).catch((e) => {
      if (bridge === b) notice(`subscription to ${filter} refused: ${e.code ?? e.message}`, true);
    });
  }
}

// ---- fleet view ------------------------------------------------------------------------------

function ago(ms, now) {
  if (!ms) return "never";
  const s = Math.max(0, Math.round((now - ms) / 1000));
  if (s < 2) return "just now";
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  return `${Math.floor(s / 3600)} h ago`;
}

function fmt(v) {
  if (typeof v !== "number") return String(v);
  const a = Math.abs(v);
  return a !== 0 && (a >= 1e6 || a < 1e-3) ? v.toExponential(2) : String(Math.round(v * 1000) / 1000);
}

function valuesText(d) {
  const parts = [];
  for (const [k, v] of d.latest) {
    if (parts.length === VALUES_SHOWN) {
      parts.push(`+${d.latest.size - VALUES_SHOWN}`);
      break;
    }
    parts.push(`${k} ${fmt(v)}`);
  }
  return parts.join("  ");
}

function setText(el, text) {
  if (el.textContent !== text) el.textContent = text;
}

function makeRow(d) {
  const tr = document.createElement("tr");
  tr.dataset.device = d.id;
  const cells = {};
  for (const k of ["id", "status", "seen", "values", "alerts"]) {
    const td = document.createElement("td");
    td.className = k;
    tr.append(td);
    cells[k] = td;
  }
  cells.id.textContent = d.id;
  const badge = document.createElement("span");
  badge.className = "badge";
  cells.alerts.append(badge);
  cells.badge = badge;
  tr.addEventListener("click", () => select(d.id));
  d.row = { tr, cells };
  return d.row;
}

function compare(a, b) {
  let c = 0;
  if (sortKey === "seen") c = a.lastSeen - b.lastSeen;
  else if (sortKey === "alerts") c = a.open - b.open;
  else if (sortKey === "status") c = a.status.localeCompare(b.status);
  if (c === 0) c = a.id < b.id ? -1 : a.id > b.id ? 1 : 0;
  return sortDesc ? -c : c;
}

let shownOrder = [];

function renderFleet(now) {
  const f = filterText;
  const list = [];
  for (const d of devices.values()) {
    if (!f || d.id.toLowerCase().includes(f)) list.push(d);
  }
  list.sort(compare);
  for (const d of list) {
    const r = d.row ?? makeRow(d);
    setText(r.cells.status, d.status || "-");
    const cls = `status ${d.status === "online" || d.status === "offline" ? d.status : ""}`;
    if (r.cells.status.className !== cls) r.cells.status.className = cls;
    setText(r.cells.seen, ago(d.lastSeen, now));
    setText(r.cells.values, valuesText(d));
    setText(r.cells.badge, String(d.open));
    const bcls = d.open > 0 ? "badge some" : "badge";
    if (r.cells.badge.className !== bcls) r.cells.badge.className = bcls;
    const sel = selected === d.id;
    if (r.tr.classList.contains("selected") !== sel) r.tr.classList.toggle("selected", sel);
  }
  const same = list.length === shownOrder.length && list.every((d, i) => shownOrder[i] === d);
  if (!same) {
    $("fleet-body").replaceChildren(...list.map((d) => d.row.tr));
    shownOrder = list;
  }
  const n = devices.size;
  setText($("fleet-count"), f ? `${list.length} of ${n} devices` : `${n} device${n === 1 ? "" : "s"}`);
  $("fleet-empty").hidden = n > 0;
  for (const th of document.querySelectorAll("#fleet-table th[data-sort]")) {
    th.classList.toggle("sorted-asc", th.dataset.sort === sortKey && !sortDesc);
    th.classList.toggle("sorted-desc", th.dataset.sort === sortKey && sortDesc);
  }
}

// ---- alerts feed -----------------------------------------------------------------------------

function alertElement(a) {
  const li = document.createElement("li");
  const meta = document.createElement("div");
  meta.className = "meta";
  const sev = document.createElement("span");
  sev.className = "sev";
  sev.textContent = a.severity;
  const dev = document.createElement("span");
  dev.className = "dev";
  dev.textContent = a.device;
  dev.addEventListener("click", () => select(a.device));
  const what = document.createElement("span");
  what.textContent = `${a.kind} ${a.metric}${a.value !== undefined ? ` = ${fmt(a.value)}` : ""}`;
  const when = document.createElement("span");
  when.className = "muted";
  when.textContent = new Date(a.timestamp).toLocaleTimeString();
  const state = document.createElement("span");
  state.className = "ack-state";
  const btn = document.createElement("button");
  btn.type = "button";
  btn.textContent = "acknowledge";
  btn.addEventListener("click", () => acknowledge(a));
  meta.append(sev, dev, what, when, state, btn);
  const msg = document.createElement("div");
  msg.className = "msg";
  msg.textContent = a.action ? `${a.message}: ${a.action}` : a.message;
  li.append(meta, msg);
  a.el = { li, state, btn };
  return a.el;
}

function renderAlerts() {
  const items = alerts.map((a) => {
    const el = a.el ?? alertElement(a);
    const cls = `sev-${a.severity}${a.acked ? " acked" : ""}`;
    if (el.li.className !== cls) el.li.className = cls;
    setText(el.state, a.acked ? `acknowledged by ${a.acked}` : a.ackState);
    el.state.classList.toggle("error", a.ackState.startsWith("refused"));
    el.btn.hidden = !!a.acked;
    el.btn.disabled = a.ackState === "sending...";
    return el.li;
  });
  const list = $("alerts-list");
  const same = list.children.length === items.length && items.every((li, i) => list.children[i] === li);
  if (!same) list.replaceChildren(...items);
  $("alerts-empty").hidden = alerts.length > 0;
  const open = alerts.filter((a) => !a.acked).length;
  setText($("alerts-count"), alerts.length ? `${open} open, ${alerts.length} shown` : "");
}

async function acknowledge(a) {
  if (!bridge) return;
  a.ackState = "sending...";
  dirty.alerts = true;
  const payload = { ack: true, alert_timestamp: a.timestamp, by: user || "anonymous" };
  try {
    await bridge.publish(`device/${a.device}/alerts/ack`, payload, { qos: 1 });
    a.ackState = "";
    // Our own ack comes back through the device/+/alerts/ack subscription too; mark it now in
    // case that subscription was refused.
    markAcked(device(a.device), a.timestamp, payload.by);
  } catch (e) {
    a.ackState = `refused: ${e.code ?? e.message}`;
    notice(`acknowledge on device/${a.device}/alerts/ack: ${e.message}`, true);
  }
  dirty.alerts = true;
}

// ---- device view -----------------------------------------------------------------------------

const SEVERITY_COLOUR = { LOW: "#2563eb", MEDIUM: "#d97706", HIGH: "#dc2626", CRITICAL: "#7f1d1d" };
const charts = new Map(); // metric -> {canvas, box}

function select(id) {
  selected = id;
  charts.clear();
  $("charts").replaceChildren();
  $("device").hidden = id === null;
  if (id !== null) {
    setText($("device-id"), id);
    $("command-device").value = id;
  }
  dirty.device = true;
  dirty.fleet = true;
  if (id !== null) backfill(id);
}

/**
 * Fills the selected device's charts with the readings vigil stored before this page saw any
 * (the bridge's `history` request). Live points already drawn are kept; older stored ones go
 * in front of them.
 */
async function backfill(id) {
  const b = bridge;
  if (!b) return;
  let points;
  try {
    points = await b.history(id, RING_CAPACITY);
  } catch (e) {
    // No right to read it, or no store reachable now: the charts fill from live data.
    if (e.code !== "not_authorized") notice(`history of ${id}: ${e.code ?? e.message}`, true);
    return;
  }
  if (bridge !== b || !Array.isArray(points) || points.length === 0) return;
  const d = device(id);
  const merged = new Map(); // metric -> Ring
  const firstLive = new Map();
  for (const [metric, ring] of d.rings) {
    const first = ring.len > 0 ? ring.t[ring.start] : Infinity;
    firstLive.set(metric, first);
  }
  for (const p of points) {
    if (!p || typeof p.t !== "number" || !p.v || typeof p.v !== "object") continue;
    for (const [metric, value] of Object.entries(p.v)) {
      if (typeof value !== "number" || !Number.isFinite(value)) continue;
      if (p.t >= (firstLive.get(metric) ?? Infinity)) continue;
      let ring = merged.get(metric);
      if (!ring) {
        if (merged.size >= 32) continue;
        ring = new Ring(RING_CAPACITY);
        merged.set(metric, ring);
      }
      ring.push(p.t, value);
      if (!d.latest.has(metric)) d.latest.set(metric, value);
    }
  }
  for (const [metric, ring] of d.rings) {
    let into = merged.get(metric);
    if (!into) {
      into = new Ring(RING_CAPACITY);
      merged.set(metric, into);
    }
    ring.forEach(-Infinity, (t, v) => into.push(t, v));
  }
  d.rings = merged;
  if (d.lastSeen === 0) d.lastSeen = points[points.length - 1].t;
  dirty.device = true;
  dirty.fleet = true;
}

function renderDevice(now) {
  const d = selected === null ? null : devices.get(selected);
  if (!d) return;
  const st = $("device-status");
  setText(st, d.status);
  st.className = `status ${d.status}`;
  setText($("device-seen"), `last seen ${ago(d.lastSeen, now)}; ${d.open} open alert${d.open === 1 ? "" : "s"}`);
  const preds = [];
  for (const [metric, p] of d.predictions) {
    let s = `${metric}: ${String(p.trend ?? "?")}`;
    if (typeof p.slope === "number") s += ` (${fmt(p.slope)}/s`;
    if (typeof p.confidence === "number") s += `, confidence ${fmt(p.confidence)}`;
    if (typeof p.slope === "number") s += ")";
    if (typeof p.seconds_to_limit === "number") s += `, limit in ${fmtDuration(p.seconds_to_limit)}`;
    else s += ", no limit ahead";
    preds.push(s);
  }
  setText($("device-predictions"), preds.length ? `Predictions: ${preds.join("; ")}` : "No prediction yet.");
  for (const [metric, ring] of d.rings) {
    let c = charts.get(metric);
    if (!c) {
      const box = document.createElement("div");
      box.className = "chart";
      const h = document.createElement("h3");
      h.textContent = metric;
      const canvas = document.createElement("canvas");
      box.append(h, canvas);
      $("charts").append(box);
      c = { canvas, box };
      charts.set(metric, c);
    }
    drawChart(c.canvas, ring, d.alerts.filter((a) => a.metric === metric), now);
  }
}

function fmtDuration(s) {
  if (s <= 0) return "now (at the limit)";
  if (s < 90) return `${Math.round(s)} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

function drawChart(canvas, ring, marks, now) {
  const dpr = window.devicePixelRatio || 1;
  const w = Math.max(50, Math.round(canvas.clientWidth * dpr));
  const h = Math.max(40, Math.round(canvas.clientHeight * dpr));
  if (canvas.width !== w) canvas.width = w;
  if (canvas.height !== h) canvas.height = h;
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, w, h);
  const since = now - WINDOW_MS;
  let lo = Infinity;
  let hi = -Infinity;
  let count = 0;
  ring.forEach(since, (_, v) => {
    if (v < lo) lo = v;
    if (v > hi) hi = v;
    count++;
  });
  // What the chart shows, for tests and for anyone inspecting the page.
  canvas.dataset.points = String(count);
  const pad = { l: 50 * dpr, r: 8 * dpr, t: 8 * dpr, b: 16 * dpr };
  const pw = w - pad.l - pad.r;
  const ph = h - pad.t - pad.b;
  ctx.font = `${10 * dpr}px system-ui, sans-serif`;
  ctx.fillStyle = "#6b7280";
  ctx.strokeStyle = "#e5e7eb";
  ctx.lineWidth = 1;
  ctx.strokeRect(pad.l, pad.t, pw, ph);
  ctx.textBaseline = "top";
  ctx.fillText("-5 min", pad.l, h - 13 * dpr);
  ctx.textAlign = "right";
  ctx.fillText("now", w - pad.r, h - 13 * dpr);
  if (lo === Infinity) {
    ctx.textAlign = "left";
    ctx.fillText("no data in the last 5 minutes", pad.l + 6 * dpr, pad.t + 6 * dpr);
    return;
  }
  if (hi - lo < 1e-9) {
    hi += 1;
    lo -= 1;
  } else {
    const m = (hi - lo) * 0.08;
    hi += m;
    lo -= m;
  }
  const x = (t) => pad.l + ((t - since) / WINDOW_MS) * pw;
  const y = (v) => pad.t + (1 - (v - lo) / (hi - lo)) * ph;
  ctx.fillText(fmt(hi), pad.l - 4 * dpr, pad.t);
  ctx.textBaseline = "bottom";
  ctx.fillText(fmt(lo), pad.l - 4 * dpr, pad.t + ph);
  // alert markers: a vertical line at the reading that raised the alert
  for (const a of marks) {
    if (a.timestamp < since || a.timestamp > now + 60000) continue;
    const ax = Math.min(x(a.timestamp), pad.l + pw);
    ctx.strokeStyle = SEVERITY_COLOUR[a.severity] ?? "#dc2626";
    ctx.lineWidth = 2 * dpr;
    ctx.globalAlpha = a.acked ? 0.35 : 0.9;
    ctx.beginPath();
    ctx.moveTo(ax, pad.t);
    ctx.lineTo(ax, pad.t + ph);
    ctx.stroke();
    ctx.globalAlpha = 1;
  }
  ctx.save();
  ctx.beginPath();
  ctx.rect(pad.l, pad.t, pw, ph);
  ctx.clip();
  ctx.strokeStyle = "#2563eb";
  ctx.lineWidth = 1.5 * dpr;
  ctx.beginPath();
  let first = true;
  ring.forEach(since, (t, v) => {
    if (first) ctx.moveTo(x(t), y(v));
    else ctx.lineTo(x(t), y(v));
    first = false;
  });
  ctx.stroke();
  if (count === 1) {
    const p = ring.last();
    ctx.fillStyle = "#2563eb";
    ctx.fillRect(x(p.t) - 2 * dpr, y(p.v) - 2 * dpr, 4 * dpr, 4 * dpr);
  }
  ctx.restore();
}

// ---- command form ----------------------------------------------------------------------------

let commandSeq = 0;

function defaultCommand() {
  commandSeq++;
  return JSON.stringify({ type: "COMMAND", id: `c-${Date.now()}-${commandSeq}`, action: "stop" });
}

async function sendCommand(ev) {
  ev.preventDefault();
  const out = $("command-result");
  const id = $("command-device").value.trim();
  if (!id || /[/+#]/.test(id)) {
    out.className = "error";
    out.textContent = "a device id is one topic level: no '/', '+' or '#'";
    return;
  }
  let payload;
  try {
    payload = JSON.parse($("command-payload").value);
  } catch (e) {
    out.className = "error";
    out.textContent = `not JSON: ${e.message}`;
    return;
  }
  if (payload && typeof payload === "object" && !Array.isArray(payload) && payload.timestamp === undefined) {
    payload.timestamp = Date.now();
  }
  if (!bridge) {
    out.className = "error";
    out.textContent = "not connected";
    return;
  }
  const topic = `device/${id}/commands`;
  out.className = "muted";
  out.textContent = `publishing to ${topic}...`;
  const started = performance.now();
  try {
    await bridge.publish(topic, payload, { qos: 1 });
    out.className = "ok";
    out.textContent = `puback for ${topic} in ${Math.round(performance.now() - started)} ms`;
    $("command-payload").value = defaultCommand();
  } catch (e) {
    out.className = "error";
    out.textContent = `refused: ${e.code ?? "error"}${e.frame?.message ? ` (${e.frame.message})` : ""}`;
  }
}

// ---- render loop -----------------------------------------------------------------------------

let frameRequested = false;
let lastChartTick = 0;

function render() {
  frameRequested = false;
  const now = Date.now();
  // relative times and the chart window move on even without messages
  if (now - lastChartTick >= 1000) {
    lastChartTick = now;
    dirty.fleet = true;
    dirty.device = true;
  }
  if (dirty.fleet) {
    dirty.fleet = false;
    renderFleet(now);
  }
  if (dirty.alerts) {
    dirty.alerts = false;
    renderAlerts();
  }
  if (dirty.device && !document.hidden) {
    dirty.device = false;
    renderDevice(now);
  }
}

function schedule() {
  if (frameRequested) return;
  frameRequested = true;
  // requestAnimationFrame does not run in background tabs: fall back to the timer there.
  if (document.hidden) render();
  else requestAnimationFrame(render);
}

// ---- wiring ----------------------------------------------------------------------------------

function main() {
  $("noscript").remove();
  $("command-payload").value = defaultCommand();
  $("filter").addEventListener("input", (e) => {
    filterText = e.target.value.trim().toLowerCase();
    dirty.fleet = true;
  });
  for (const th of document.querySelectorAll("#fleet-table th[data-sort]")) {
    th.addEventListener("click", () => {
      if (sortKey === th.dataset.sort) sortDesc = !sortDesc;
      else {
        sortKey = th.dataset.sort;
        sortDesc = sortKey === "seen" || sortKey === "alerts";
      }
      dirty.fleet = true;
    });
  }
  $("device-close").addEventListener("click", () => select(null));
  $("command-form").addEventListener("submit", sendCommand);
  $("login").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const creds = {
      username: $("login-user").value.trim(),
      password: $("login-pass").value,
      token: $("login-token").value.trim(),
    };
    // Held by the bridge client (in memory) for reconnects; cleared from the form.
    $("login-pass").value = "";
    $("login-token").value = "";
    connect(creds);
  });
  $("login-disconnect").addEventListener("click", () => {
    if (!bridge) return;
    const b = bridge;
    bridge = null;
    b.disconnect().then(() => setState("closed", "disconnected"));
  });
  setInterval(schedule, 1000 / RENDER_HZ);
  // Anonymous first: works in local-only mode; a server with credentials answers
  // not_authorized and the login form takes over.
  connect({});
}

main();
