// vigil dashboard: fleet, device charts, alerts and commands over the JSON bridge.
//
// Data flow: bridge messages only update in-memory state and mark what changed; a render loop
// (a timer, then requestAnimationFrame) redraws at most RENDER_HZ times per second, so a busy
// fleet (thousands of messages per second, a thousand devices) never floods the DOM. User
// actions (typing a filter, sorting, scrolling) render at the next frame instead. The fleet
// table holds rows only for the devices in view (plus a margin): its cost per frame does not
// grow with the fleet.
// Every text from the network goes to the DOM through textContent, never innerHTML.

import { VigilBridge } from "./vigil-bridge.js";

const RENDER_HZ = 4;
const WINDOW_MS = 5 * 60 * 1000; // chart history per metric
const FUTURE_MS = 2 * 60 * 1000; // the charts' forecast part, after "now"
const RING_CAPACITY = 600; // points per metric, at most (2 Hz over 5 minutes)
const SCORE_CAPACITY = 300; // anomaly scores (one per prediction) per metric
const FIT_READINGS = 120; // readings a prediction's trend is fitted on (docs/topics.md)
const MAX_METRICS = 32; // per device, as the detector's cap
const MAX_ALERTS = 200; // alerts feed
const MAX_DEVICE_ALERTS = 50; // per device, for chart markers
const MAX_NOTICES = 50;
const VALUES_SHOWN = 4; // metrics in the fleet table's "latest values"
const ROW_OVERSCAN = 10; // fleet rows rendered above and below the visible ones

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
/** The fleet table's order (filtered and sorted) must be computed again. */
let orderDirty = true;

function device(id) {
  let d = devices.get(id);
  if (!d) {
    d = {
      id,
      key: id.toLowerCase(), // what the filter matches
      lastSeen: 0,
      status: "",
      latest: new Map(), // metric -> value
      rings: new Map(), // metric -> Ring
      predictions: new Map(), // metric -> latest prediction payload
      rul: null, // latest remaining-useful-life estimate ("type": "RUL"), if the device has a model
      scores: new Map(), // metric -> Ring of (prediction time, anomaly_score)
      alerts: [], // newest first, bounded
      open: 0,
      row: null,
    };
    devices.set(id, d);
    orderDirty = true;
  }
  return d;
}

/** Marks `d` changed; its place in the table too when the table is sorted by what changed. */
function touch(d) {
  d.lastSeen = Date.now();
  dirty.fleet = true;
  if (sortKey !== "id") orderDirty = true;
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
  else if (typeof ts === "string") t = parseTime(ts);
  return Number.isFinite(t) && Math.abs(t - now) < 24 * 3600 * 1000 ? t : now;
}

/**
 * A timestamp string read as vigil reads it (analytics/src/telemetry.rs): RFC 3339 with `T`,
 * `t` or a space between date and time, `Z`/`z` or an offset, no offset meaning UTC; or a
 * numeric string (unix seconds, or milliseconds from 1e11). `Date.parse` alone differs between
 * browsers (Firefox refuses a lower-case `t`/`z`) and reads offset-less times as local time.
 */
function parseTime(s) {
  const t = s.trim();
  const m = /^(\d{4}-\d\d-\d\d)[Tt ](\d\d:\d\d(?::\d\d(?:\.\d+)?)?)([Zz]|[+-]\d\d:\d\d)?$/.exec(t);
  if (m) return Date.parse(`${m[1]}T${m[2]}${m[3] ? m[3].toUpperCase() : "Z"}`);
  const n = t === "" ? NaN : Number(t);
  return Number.isFinite(n) ? (n >= 1e11 ? n : n * 1000) : Date.parse(t);
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
        if (d.rings.size >= MAX_METRICS) continue;
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

/** Adds an alert. `received` is when the server got it for one replayed from `recent_alerts`
 *  (which does not count as the device being seen now); an alert already shown (same time,
 *  metric, kind and severity) is not added twice. */
function onAlert(d, p, received) {
  if (!p || typeof p !== "object") return;
  const replayed = typeof received === "number";
  const now = replayed ? received : Date.now();
  const a = {
    seq: ++alertSeq,
    device: d.id,
    severity: ["LOW", "MEDIUM", "HIGH", "CRITICAL"].includes(p.severity) ? p.severity : "LOW",
    kind: String(p.kind ?? ""),
    metric: String(p.metric ?? ""),
    value: p.value,
    message: String(p.message ?? ""),
    action: String(p.action ?? ""),
    timestamp: typeof p.timestamp === "number" ? p.timestamp : now,
    received: now,
    acked: null, // who acknowledged it
    ackState: "", // "", "sending", "error: ..."
    el: null,
  };
  const same = (b) =>
    b.timestamp === a.timestamp && b.metric === a.metric && b.kind === a.kind && b.severity === a.severity;
  if (d.alerts.some(same)) return;
  alerts.unshift(a);
  if (alerts.length > MAX_ALERTS) alerts.length = MAX_ALERTS;
  d.alerts.unshift(a);
  if (d.alerts.length > MAX_DEVICE_ALERTS) d.alerts.length = MAX_DEVICE_ALERTS;
  d.open++;
  dirty.alerts = true;
  if (replayed) {
    dirty.fleet = true;
    if (sortKey !== "id") orderDirty = true;
    if (selected === d.id) dirty.device = true;
  } else {
    touch(d);
  }
}

/** Shows the alerts and acknowledgements the server saw before this page connected (or while
 *  it was reconnecting), in the order the server received them, then keeps the feed newest
 *  first. */
async function replayRecentAlerts(b) {
  let messages;
  try {
    messages = await b.recentAlerts(MAX_ALERTS);
  } catch (e) {
    if (bridge === b && e.code !== "connection_lost") notice(`recent alerts: ${e.code ?? e.message}`, true);
    return;
  }
  if (bridge !== b) return;
  for (const m of messages) {
    const t = parseTopic(String(m.topic));
    if (!t) continue;
    if (t.kind === "alerts") onAlert(device(t.id), m.payload, m.t);
    else if (t.kind === "alerts/ack") onMessage(m.topic, m.payload);
  }
  const newestFirst = (x, y) => y.timestamp - x.timestamp || y.seq - x.seq;
  alerts.sort(newestFirst);
  for (const d of devices.values()) d.alerts.sort(newestFirst);
  dirty.alerts = true;
  schedule();
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
    if (sortKey === "alerts") orderDirty = true;
  }
}

/** Keeps the latest prediction of a metric, and its anomaly score for the score strip; or the
 *  latest remaining-useful-life estimate. */
function onPrediction(d, p) {
  if (p && p.type === "RUL") {
    if (typeof p.remaining_cycles === "number" && Number.isFinite(p.remaining_cycles)) {
      d.rul = p;
      if (selected === d.id) dirty.device = true;
    }
    return;
  }
  if (!p || typeof p !== "object" || typeof p.metric !== "string") return;
  if (!d.predictions.has(p.metric) && d.predictions.size >= MAX_METRICS) return;
  d.predictions.set(p.metric, p);
  const score = p.anomaly_score;
  if (typeof p.timestamp === "number" && typeof score === "number" && Number.isFinite(score)) {
    let ring = d.scores.get(p.metric);
    if (!ring) {
      ring = new Ring(SCORE_CAPACITY);
      d.scores.set(p.metric, ring);
    }
    // A score covers the readings since the previous prediction: keep them in time order.
    const last = ring.last();
    if (!last || p.timestamp > last.t) ring.push(p.timestamp, Math.min(1, Math.max(0, score)));
  }
  if (selected === d.id) dirty.device = true;
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
    case "predictions":
      return onPrediction(device(t.id), payload);
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
  let reconnected = false;
  b.on("connect", (ack) => {
    if (bridge !== b) return;
    setState("connected", `as ${user || "anonymous"} (${ack.client_id})`);
    // After a reconnection, fill in what came while the page was away (the first time, once
    // subscribed, below).
    if (reconnected) replayRecentAlerts(b);
    reconnected = true;
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
  replayRecentAlerts(b);
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
  return parts.join(", ");
}

/** Sets `el`'s text; true when it changed. */
function setText(el, text) {
  if (el.textContent === text) return false;
  el.textContent = text;
  return true;
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
  cells.id.title = d.id;
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

/** A table row standing in for the rows above or below the rendered ones. */
function spacerRow() {
  const tr = document.createElement("tr");
  tr.className = "spacer";
  tr.setAttribute("aria-hidden", "true");
  const td = document.createElement("td");
  td.colSpan = 5;
  tr.append(td);
  return { tr, td, px: -1 };
}

const fleet = {
  order: [], // the devices the table lists, filtered and sorted
  shown: [], // the tbody's children now
  rowPx: 0, // a row's height, measured once rows exist
  above: spacerRow(),
  below: spacerRow(),
};

function setSpacer(s, px) {
  if (s.px !== px) {
    s.td.style.height = `${px}px`;
    s.px = px;
  }
}

function updateRow(d, now) {
  const r = d.row ?? makeRow(d);
  setText(r.cells.status, d.status || "-");
  const cls = `status ${d.status === "online" || d.status === "offline" ? d.status : ""}`;
  if (r.cells.status.className !== cls) r.cells.status.className = cls;
  setText(r.cells.seen, ago(d.lastSeen, now));
  const values = valuesText(d);
  if (setText(r.cells.values, values)) r.cells.values.title = values;
  setText(r.cells.badge, String(d.open));
  const bcls = d.open > 0 ? "badge some" : "badge";
  if (r.cells.badge.className !== bcls) r.cells.badge.className = bcls;
  const sel = selected === d.id;
  if (r.tr.classList.contains("selected") !== sel) r.tr.classList.toggle("selected", sel);
  return r.tr;
}

function renderFleet(now) {
  const f = filterText;
  if (orderDirty) {
    orderDirty = false;
    const list = [];
    for (const d of devices.values()) {
      if (!f || d.key.includes(f)) list.push(d);
    }
    list.sort(compare);
    fleet.order = list;
  }
  const list = fleet.order;
  // Rows exist only for the devices in view, plus ROW_OVERSCAN on each side; two spacer rows
  // give the table the height of all the others, so the scroll bar stays true.
  const wrap = $("fleet-wrap");
  const px = fleet.rowPx || 26;
  const visible = Math.ceil((wrap.clientHeight || 600) / px);
  // Clamped so that a list that became shorter than the scroll position still shows its end.
  const first = Math.max(0, Math.min(Math.floor(wrap.scrollTop / px), list.length - visible) - ROW_OVERSCAN);
  const last = Math.min(list.length, first + visible + 2 * ROW_OVERSCAN);
  const rows = [];
  for (let i = first; i < last; i++) rows.push(updateRow(list[i], now));
  setSpacer(fleet.above, first * px);
  setSpacer(fleet.below, (list.length - last) * px);
  const children = [];
  if (first > 0) children.push(fleet.above.tr);
  children.push(...rows);
  if (last < list.length) children.push(fleet.below.tr);
  const same = children.length === fleet.shown.length && children.every((tr, i) => fleet.shown[i] === tr);
  if (!same) {
    $("fleet-body").replaceChildren(...children);
    fleet.shown = children;
  }
  if (!fleet.rowPx && rows.length > 0) {
    const h = rows[0].getBoundingClientRect().height;
    if (h > 0) {
      fleet.rowPx = h;
      if (Math.abs(h - px) > 0.5) dirty.fleet = true; // redo the spacers with the real height
    }
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
  schedule();
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
  // Metrics keep the order they are drawn in: those already live first, new ones after.
  const merged = new Map(); // metric -> Ring
  for (const metric of d.rings.keys()) merged.set(metric, new Ring(RING_CAPACITY));
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
  setText(
    $("device-seen"),
    `last seen ${ago(d.lastSeen, now)}; ${d.open} open alert${d.open === 1 ? "" : "s"}${rulText(d.rul)}`,
  );
  for (const [metric, ring] of d.rings) {
    const c = charts.get(metric) ?? makeChart(metric);
    const p = d.predictions.get(metric);
    setText(c.latest, d.latest.has(metric) ? fmt(d.latest.get(metric)) : "");
    setText(c.pred, predictionText(p));
    drawChart(c.canvas, {
      ring,
      prediction: p,
      scores: d.scores.get(metric),
      marks: d.alerts.filter((a) => a.metric === metric),
      now,
    });
  }
}

function makeChart(metric) {
  const box = document.createElement("div");
  box.className = "chart";
  const head = document.createElement("div");
  head.className = "chart-head";
  const h = document.createElement("h3");
  h.textContent = metric;
  const latest = document.createElement("span");
  latest.className = "latest";
  const pred = document.createElement("span");
  pred.className = "pred muted";
  head.append(h, latest, pred);
  const canvas = document.createElement("canvas");
  box.append(head, canvas);
  $("charts").append(box);
  const c = { canvas, box, latest, pred };
  charts.set(metric, c);
  return c;
}

/** A device's remaining-useful-life estimate in words (empty without a model). */
function rulText(r) {
  if (!r) return "";
  if (typeof r.cap === "number" && r.remaining_cycles >= r.cap) return "; useful life: no wear visible yet";
  const time = typeof r.remaining_seconds === "number" ? ` (${fmtDuration(r.remaining_seconds)})` : "";
  return `; about ${Math.round(r.remaining_cycles)} cycles${time} of useful life left`;
}

/** The latest prediction of a metric in words, for the chart's heading. */
function predictionText(p) {
  if (!p) return "no prediction yet";
  let s = String(p.trend ?? "?");
  if (typeof p.slope === "number") s += ` ${p.slope > 0 ? "+" : ""}${fmt(p.slope)}/s`;
  if (typeof p.confidence === "number") s += `, R\u00b2 ${p.confidence.toFixed(2)}`;
  if (typeof p.seconds_to_limit === "number") s += `; limit ${limitIn(p.seconds_to_limit)}`;
  else s += "; no limit ahead";
  return s;
}

function fmtDuration(s) {
  if (s < 90) return `${Math.round(s)} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

function limitIn(s) {
  return s <= 0 ? "reached" : `in ${fmtDuration(s)}`;
}

/** About `count` round values spanning lo..hi. */
function niceTicks(lo, hi, count) {
  const raw = (hi - lo) / count;
  if (!(raw > 0) || !Number.isFinite(raw)) return [];
  const mag = 10 ** Math.floor(Math.log10(raw));
  const n = raw / mag;
  const step = (n < 1.5 ? 1 : n < 3 ? 2 : n < 7 ? 5 : 10) * mag;
  const ticks = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi && ticks.length < 20; v += step) {
    ticks.push(Math.round(v / step) * step);
  }
  return ticks;
}

const INK = {
  series: "#2563eb",
  trend: "#334155",
  limit: "#dc2626",
  score: "234, 88, 12", // rgb of the anomaly score bars, drawn with an alpha
  axis: "#6b7280",
  grid: "#eef0f3",
  frame: "#d9dde3",
  future: "#f5f6f8",
  now: "#9ca3af",
};

/**
 * Draws one metric's chart: its readings over the last WINDOW_MS, the latest prediction's
 * trend line (dashed, from the readings it was fitted on into the next FUTURE_MS) with the
 * predicted limit crossing, the metric's alerts (anomalies as points on the series, threshold
 * and forecast incidents as vertical lines), and under it the anomaly score strip (0..1, one
 * bar per prediction, covering the readings since the previous one).
 *
 * What was drawn is left in the canvas's data attributes, for tests and for anyone inspecting
 * the page: `points` (readings in the window), `trend` ("1" or "0"), `limit` ("line",
 * "beyond", "reached" or ""), `scores` (score bars), `anomalies` and `incidents` (alert marks).
 */
function drawChart(canvas, { ring, prediction: p, scores, marks, now }) {
  const dpr = window.devicePixelRatio || 1;
  const w = Math.max(50, Math.round(canvas.clientWidth * dpr));
  const h = Math.max(40, Math.round(canvas.clientHeight * dpr));
  if (canvas.width !== w) canvas.width = w;
  if (canvas.height !== h) canvas.height = h;
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, w, h);
  const u = dpr; // one CSS pixel
  const t0 = now - WINDOW_MS;
  const t1 = now + FUTURE_MS;
  // Layout: value plot, a gap, the score strip, the time axis' labels.
  const left = 52 * u;
  const right = w - 10 * u;
  const top = 8 * u;
  const axisH = 16 * u;
  const stripH = Math.min(40 * u, Math.max(16 * u, h * 0.2));
  const gap = 8 * u;
  const plotH = Math.max(10 * u, h - top - gap - stripH - axisH);
  const stripTop = top + plotH + gap;
  const pw = right - left;
  const x = (t) => left + ((t - t0) / (t1 - t0)) * pw;
  const xNow = x(now);
  const font = (px) => `${px * u}px system-ui, sans-serif`;

  // ---- what is there to draw
  let lo = Infinity;
  let hi = -Infinity;
  const include = (v) => {
    if (v < lo) lo = v;
    if (v > hi) hi = v;
  };
  let count = 0;
  ring.forEach(t0, (_, v) => {
    include(v);
    count++;
  });
  // The trend line of the latest prediction: y = fitted + slope * (t - timestamp).
  let trend = null;
  if (
    p &&
    typeof p.fitted === "number" &&
    typeof p.slope === "number" &&
    typeof p.timestamp === "number" &&
    Number.isFinite(p.fitted) &&
    Number.isFinite(p.slope) &&
    p.timestamp >= t0 &&
    p.timestamp <= t1
  ) {
    const at = (t) => p.fitted + (p.slope * (t - p.timestamp)) / 1000;
    const stl = typeof p.seconds_to_limit === "number" && p.seconds_to_limit >= 0 ? p.seconds_to_limit : null;
    const cross = stl !== null && stl > 0 ? p.timestamp + stl * 1000 : null;
    const from = Math.max(t0, fitStart(ring, p.timestamp));
    const to = cross !== null && cross < t1 ? cross : t1;
    trend = { at, from, to, stl, cross, level: cross !== null ? at(cross) : null };
    // The value axis covers the fitted part and the limit when the line reaches it in view;
    // beyond that the forecast may leave the plot (clipped) rather than flatten the readings.
    include(at(from));
    include(at(Math.max(from, Math.min(to, now))));
    if (trend.level !== null && cross < t1) include(trend.level);
  }
  const anomalies = [];
  const incidents = [];
  for (const a of marks) {
    if (a.timestamp < t0 || a.timestamp > t1) continue;
    if (a.kind === "anomaly") {
      anomalies.push(a);
      if (typeof a.value === "number" && Number.isFinite(a.value)) include(a.value);
    } else incidents.push(a);
  }

  canvas.dataset.points = String(count);
  canvas.dataset.trend = trend ? "1" : "0";
  canvas.dataset.limit = "";
  canvas.dataset.anomalies = "0";
  canvas.dataset.incidents = "0";

  // ---- frame: the future part shaded, minute grid, time labels, "now"
  ctx.fillStyle = INK.future;
  ctx.fillRect(xNow, top, right - xNow, plotH);
  ctx.fillRect(xNow, stripTop, right - xNow, stripH);
  ctx.lineWidth = u;
  ctx.strokeStyle = INK.grid;
  ctx.beginPath();
  for (let k = -WINDOW_MS / 60000 + 1; k < FUTURE_MS / 60000; k++) {
    if (k === 0) continue;
    const gx = Math.round(x(now + k * 60000)) + 0.5;
    ctx.moveTo(gx, top);
    ctx.lineTo(gx, top + plotH);
    ctx.moveTo(gx, stripTop);
    ctx.lineTo(gx, stripTop + stripH);
  }
  ctx.stroke();
  ctx.font = font(10);
  ctx.fillStyle = INK.axis;
  ctx.textBaseline = "top";
  const axisY = stripTop + stripH + 3 * u;
  for (let k = -WINDOW_MS / 60000; k <= FUTURE_MS / 60000; k++) {
    const first = k === -WINDOW_MS / 60000;
    const lastK = k === FUTURE_MS / 60000;
    ctx.textAlign = first ? "left" : lastK ? "right" : "center";
    const label = k === 0 ? "now" : `${k > 0 ? "+" : ""}${k}${first || lastK ? " min" : ""}`;
    ctx.fillText(label, x(now + k * 60000), axisY);
  }

  // ---- value axis
  const empty = lo === Infinity;
  if (!empty) {
    if (hi - lo < 1e-9) {
      hi += 1;
      lo -= 1;
    } else {
      const m = (hi - lo) * 0.08;
      hi += m;
      lo -= m;
    }
  }
  const y = (v) => top + (1 - (v - lo) / (hi - lo)) * plotH;
  if (!empty) {
    ctx.strokeStyle = INK.grid;
    ctx.beginPath();
    const ticks = niceTicks(lo, hi, Math.max(2, Math.floor(plotH / (28 * u))));
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    // The limit's level gets a label of its own (drawLimit): no tick label under it.
    const limitY = trend && trend.level !== null && trend.cross < t1 ? y(trend.level) : -Infinity;
    for (const v of ticks) {
      const gy = Math.round(y(v)) + 0.5;
      ctx.moveTo(left, gy);
      ctx.lineTo(right, gy);
      if (Math.abs(gy - limitY) > 11 * u) ctx.fillText(fmt(v), left - 5 * u, gy);
    }
    ctx.stroke();
  }

  // ---- alert incidents (threshold: solid line, forecast: dashed), behind the data
  for (const a of incidents) {
    const ax = x(a.timestamp);
    ctx.strokeStyle = SEVERITY_COLOUR[a.severity] ?? "#dc2626";
    ctx.fillStyle = ctx.strokeStyle;
    ctx.globalAlpha = a.acked ? 0.35 : 0.9;
    ctx.lineWidth = 2 * u;
    ctx.setLineDash(a.kind === "forecast" ? [5 * u, 4 * u] : []);
    ctx.beginPath();
    ctx.moveTo(ax, top + 6 * u);
    ctx.lineTo(ax, top + plotH);
    ctx.stroke();
    ctx.setLineDash([]);
    // a flag at the top: filled for a threshold crossed, hollow for a forecast
    ctx.beginPath();
    ctx.moveTo(ax - 4 * u, top);
    ctx.lineTo(ax + 4 * u, top);
    ctx.lineTo(ax, top + 6 * u);
    ctx.closePath();
    if (a.kind === "forecast") {
      ctx.lineWidth = 1.5 * u;
      ctx.stroke();
    } else ctx.fill();
    ctx.globalAlpha = 1;
  }
  canvas.dataset.incidents = String(incidents.length);

  ctx.save();
  ctx.beginPath();
  ctx.rect(left, top, pw, plotH);
  ctx.clip();
  if (!empty) {
    // ---- the trend line, under the readings it was fitted on
    if (trend) {
      // A "stable" trend's slope is not significant: its line is drawn faintly.
      ctx.globalAlpha = p.trend === "stable" ? 0.4 : 0.9;
      ctx.strokeStyle = INK.trend;
      ctx.lineWidth = 1.5 * u;
      ctx.setLineDash([6 * u, 4 * u]);
      ctx.beginPath();
      ctx.moveTo(x(trend.from), y(trend.at(trend.from)));
      ctx.lineTo(x(trend.to), y(trend.at(trend.to)));
      ctx.stroke();
      ctx.setLineDash([]);
      ctx.fillStyle = INK.trend;
      ctx.beginPath();
      ctx.arc(x(p.timestamp), y(p.fitted), 2.5 * u, 0, 2 * Math.PI);
      ctx.fill();
      ctx.globalAlpha = 1;
    }
    // ---- the readings
    ctx.strokeStyle = INK.series;
    ctx.lineWidth = 1.5 * u;
    ctx.lineJoin = "round";
    ctx.beginPath();
    let first = true;
    ring.forEach(t0, (t, v) => {
      if (first) ctx.moveTo(x(t), y(v));
      else ctx.lineTo(x(t), y(v));
      first = false;
    });
    ctx.stroke();
    if (count === 1) {
      const q = ring.last();
      ctx.fillStyle = INK.series;
      ctx.fillRect(x(q.t) - 2 * u, y(q.v) - 2 * u, 4 * u, 4 * u);
    }
  }
  ctx.restore();
  if (trend && !empty) drawLimit(ctx, canvas, trend, { x, y, left, right, top, plotH, u, t1, font });

  // ---- anomaly alerts: points on the series, drawn last so nothing hides them
  for (const a of anomalies) {
    const onSeries = typeof a.value === "number" && Number.isFinite(a.value) && !empty;
    const ax = x(a.timestamp);
    const ay = onSeries ? Math.min(top + plotH, Math.max(top, y(a.value))) : top + 6 * u;
    ctx.globalAlpha = a.acked ? 0.4 : 1;
    ctx.beginPath();
    ctx.arc(ax, ay, 5 * u, 0, 2 * Math.PI);
    ctx.fillStyle = SEVERITY_COLOUR[a.severity] ?? "#dc2626";
    ctx.fill();
    ctx.lineWidth = 1.5 * u;
    ctx.strokeStyle = "#fff";
    ctx.stroke();
    ctx.beginPath();
    ctx.arc(ax, ay, 8 * u, 0, 2 * Math.PI);
    ctx.strokeStyle = SEVERITY_COLOUR[a.severity] ?? "#dc2626";
    ctx.lineWidth = u;
    ctx.stroke();
    ctx.globalAlpha = 1;
  }
  canvas.dataset.anomalies = String(anomalies.length);

  // ---- "now" across both plots, and the frames
  ctx.strokeStyle = INK.now;
  ctx.lineWidth = u;
  ctx.beginPath();
  ctx.moveTo(Math.round(xNow) + 0.5, top);
  ctx.lineTo(Math.round(xNow) + 0.5, stripTop + stripH);
  ctx.stroke();
  ctx.strokeStyle = INK.frame;
  ctx.strokeRect(left + 0.5, top + 0.5, pw - 1, plotH - 1);
  ctx.strokeRect(left + 0.5, stripTop + 0.5, pw - 1, stripH - 1);
  if (empty) {
    ctx.fillStyle = INK.axis;
    ctx.font = font(11);
    ctx.textAlign = "left";
    ctx.textBaseline = "top";
    ctx.fillText("no data in the last 5 minutes", left + 8 * u, top + 8 * u);
  }

  canvas.dataset.scores = String(drawScores(ctx, scores, { x, t0, now, left, right, stripTop, stripH, u, font }));
}

/**
 * The time of the oldest of the FIT_READINGS newest readings up to `until`: where the
 * prediction's trend was fitted from (as far as this page has the readings).
 */
function fitStart(ring, until) {
  const cap = ring.t.length;
  let n = 0;
  let from = until;
  for (let k = ring.len - 1; k >= 0 && n < FIT_READINGS; k--) {
    const t = ring.t[(ring.start + k) % cap];
    if (t > until) continue;
    from = t;
    n++;
  }
  return from;
}

/** The predicted limit: its level, and a marker where the trend line reaches it. */
function drawLimit(ctx, canvas, trend, { x, y, left, right, top, plotH, u, t1, font }) {
  if (trend.stl === null) return;
  ctx.font = font(10.5);
  ctx.fillStyle = INK.limit;
  if (trend.stl === 0) {
    canvas.dataset.limit = "reached";
    ctx.textAlign = "right";
    ctx.textBaseline = "top";
    ctx.fillText("limit reached", right - 4 * u, top + 3 * u);
    return;
  }
  const label = `limit in ${fmtDuration(trend.stl)}`;
  if (trend.cross >= t1) {
    // Beyond the chart: say when, at the edge the line leaves by.
    canvas.dataset.limit = "beyond";
    ctx.textAlign = "right";
    ctx.textBaseline = "top";
    ctx.fillText(`${label} \u2192`, right - 4 * u, top + 3 * u);
    return;
  }
  canvas.dataset.limit = "line";
  const ly = y(trend.level);
  const cx = x(trend.cross);
  ctx.strokeStyle = INK.limit;
  ctx.globalAlpha = 0.75;
  ctx.lineWidth = u;
  ctx.beginPath();
  ctx.moveTo(left, Math.round(ly) + 0.5);
  ctx.lineTo(right, Math.round(ly) + 0.5);
  ctx.stroke();
  ctx.globalAlpha = 1;
  // the level, in the value axis' column
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  ctx.fillText(fmt(trend.level), left - 5 * u, ly);
  // the crossing: a diamond on the line, labelled
  const r = 5 * u;
  ctx.beginPath();
  ctx.moveTo(cx, ly - r);
  ctx.lineTo(cx + r, ly);
  ctx.lineTo(cx, ly + r);
  ctx.lineTo(cx - r, ly);
  ctx.closePath();
  ctx.fill();
  ctx.strokeStyle = "#fff";
  ctx.lineWidth = u;
  ctx.stroke();
  const width = ctx.measureText(label).width;
  const above = ly - top > 16 * u;
  ctx.textBaseline = above ? "bottom" : "top";
  ctx.textAlign = "left";
  const lx = Math.min(Math.max(cx - width / 2, left + 2 * u), right - width - 2 * u);
  const lyText = above ? ly - 7 * u : Math.min(ly + 7 * u, top + plotH - 12 * u);
  ctx.fillStyle = "rgba(255, 255, 255, 0.85)";
  ctx.fillRect(lx - 2 * u, above ? lyText - 12 * u : lyText, width + 4 * u, 12 * u);
  ctx.fillStyle = INK.limit;
  ctx.fillText(label, lx, lyText);
}

/** The anomaly score strip: a bar per prediction in the window; returns how many. */
function drawScores(ctx, scores, { x, t0, now, left, right, stripTop, stripH, u, font }) {
  ctx.font = font(9.5);
  ctx.fillStyle = INK.axis;
  ctx.textAlign = "right";
  ctx.textBaseline = "top";
  ctx.fillText("1", left - 5 * u, stripTop);
  ctx.textBaseline = "bottom";
  ctx.fillText("0", left - 5 * u, stripTop + stripH);
  ctx.textBaseline = "middle";
  ctx.fillText("anomaly", left - 12 * u, stripTop + stripH / 2);
  // the middle of the scale, dotted
  ctx.strokeStyle = INK.grid;
  ctx.lineWidth = u;
  ctx.setLineDash([2 * u, 3 * u]);
  ctx.beginPath();
  ctx.moveTo(left, Math.round(stripTop + stripH / 2) + 0.5);
  ctx.lineTo(right, Math.round(stripTop + stripH / 2) + 0.5);
  ctx.stroke();
  ctx.setLineDash([]);
  let bars = 0;
  if (scores) {
    const inner = stripH - 2 * u;
    const base = stripTop + stripH - u;
    let prev = null;
    scores.forEach(-Infinity, (t, s) => {
      // A score covers the readings since the previous prediction (at most a minute back).
      const from = prev === null ? t : Math.max(prev, t - 60000);
      prev = t;
      if (t < t0 || t > now + 60000) return;
      const x0 = Math.max(left, x(Math.max(from, t0)));
      const x1 = Math.max(x0 + 2 * u, x(t));
      const bh = Math.max(u, s * inner);
      ctx.fillStyle = `rgba(${INK.score}, ${0.35 + 0.65 * s})`;
      ctx.fillRect(x0, base - bh, Math.max(u, x1 - x0 - 0.5 * u), bh);
      bars++;
    });
  }
  if (bars === 0) {
    ctx.fillStyle = INK.axis;
    ctx.textAlign = "left";
    ctx.textBaseline = "middle";
    ctx.fillText("no anomaly score yet (one comes with each prediction)", left + 8 * u, stripTop + stripH / 2);
  }
  return bars;
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
    const ack = await bridge.publish(topic, payload, { qos: 1 });
    out.className = "ok";
    out.textContent = `puback for ${topic} in ${Math.round(performance.now() - started)} ms`;
    if (ack?.noSubscribers) out.textContent += "; no device is subscribed to it";
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
  // What the user does shows at the next frame, not at the next tick of the render timer.
  const renderSoon = () => {
    dirty.fleet = true;
    schedule();
  };
  $("filter").addEventListener("input", (e) => {
    filterText = e.target.value.trim().toLowerCase();
    orderDirty = true;
    $("fleet-wrap").scrollTop = 0; // a new filter's matches, from the first
    renderSoon();
  });
  for (const th of document.querySelectorAll("#fleet-table th[data-sort]")) {
    th.addEventListener("click", () => {
      if (sortKey === th.dataset.sort) sortDesc = !sortDesc;
      else {
        sortKey = th.dataset.sort;
        sortDesc = sortKey === "seen" || sortKey === "alerts";
      }
      orderDirty = true;
      renderSoon();
    });
  }
  $("fleet-wrap").addEventListener("scroll", renderSoon, { passive: true });
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
