// sensorgate dashboard: live overview, charts, event log and sensor management.
// A plain ES module with no build step, embedded in the daemon and served at
// /assets/app.js. Live data comes through the reconnecting reference client.

import { SensorgateClient } from "/sensorgate.js";

const API = "/api/v1";
const TOKEN_KEY = "sensorgate.token";
/** How much history a card's sparkline shows. */
const SPARK_MS = 15 * 60e3;
/** A sample older than this many intervals (plus some slack for jitter) is stale. */
const STALE_INTERVALS = 3;
const STALE_SLACK_MS = 2000;
/** A sensor fed over REST without an interval is stale after this long. */
const PUSHED_STALE_MS = 10 * 60e3;
/** The sampling interval the daemon uses when a sensor record names none. */
const DEFAULT_INTERVAL_S = 2;
/** Counters and last errors change without events: re-read them this often. */
const HEALTH_POLL_MS = 15e3;
const LOG_ROWS = 1000;
/** Readings listed under a sensor's charts, newest first, each with a Delete button. */
const HISTORY_ROWS = 20;
const LOG_HELD = 5000;
const EVENT_TYPES = new Set(["entity_event", "system_event", "test_event"]);
const TIPOS = {
  temperatura: "Temperature", humedad: "Humidity", presion: "Pressure", co2: "CO₂",
  punto_rocio: "Dew point", vpd: "VPD", humedad_absoluta: "Abs. humidity",
};
/** Values the gateway derives from a sample's temperature and humidity. */
const DERIVED = new Set(["punto_rocio", "vpd", "humedad_absoluta"]);
const RANGES = {
  "1h": { ms: 3600e3 },
  "24h": { ms: 86400e3, bucket: "minute", bucketMs: 60e3 },
  "7d": { ms: 7 * 86400e3, bucket: "hour", bucketMs: 3600e3 },
  "30d": { ms: 30 * 86400e3, bucket: "hour", bucketMs: 3600e3 },
};

// ---------------------------------------------------------------- small helpers

const $ = (id) => document.getElementById(id);

/** Builds an element: h("p", {class: "x", text: "hi"}, child, ...). */
function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "text") el.textContent = value;
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? "" : value);
  }
  el.append(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  return el;
}

function storedToken() {
  try {
    return localStorage.getItem(TOKEN_KEY) || "";
  } catch {
    return "";
  }
}

/** Calls the REST API; throws an Error with `status` and the parsed error body. */
async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  const token = storedToken();
  if (token) headers.Authorization = "Bearer " + token;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(API + path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const json = (response.headers.get("content-type") || "").includes("json")
    ? await response.json().catch(() => null)
    : null;
  if (!response.ok) {
    const detail = json && json.detail ? json.detail : `${response.status} ${response.statusText}`;
    throw Object.assign(new Error(detail), { status: response.status, body: json });
  }
  return json;
}

/** The gateway's clock, as learnt from the greeting on every connection: sample ages
 * are measured against it, so a phone with a wrong clock still tells fresh from stale. */
let clockOffset = 0;
const now = () => Date.now() + clockOffset;
const iso = (ms) => new Date(ms).toISOString();

function fmt(value) {
  if (typeof value !== "number" || !Number.isFinite(value)) return "–";
  return Number.isInteger(value) ? String(value) : value.toFixed(1);
}

function ago(ms) {
  const s = Math.max(0, Math.round(ms / 1000));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 172800) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} days ago`;
}

const clock = (ms) =>
  new Date(ms).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false });
const label = (tipo) => TIPOS[tipo] || tipo.charAt(0).toUpperCase() + tipo.slice(1);
const title = (s) => s.nombre || `${label(s.tipo)} #${s.id}`;
const css = (name) => getComputedStyle(document.documentElement).getPropertyValue(name).trim();

// ---------------------------------------------------------------- state

/** id → sensor record, with `salud` (health, null when not sampled) and `saludAt`. */
const sensors = new Map();
/** id → Map(tipo → latest reading). */
const latest = new Map();
/** id → Map(tipo → [{t, v, id}]) over the sparkline window, oldest first. */
const recent = new Map();
/** Sensors deleted while a REST answer that still lists them was on its way. */
const deleted = new Set();
let lastSeq = null;

function upsertSensor(record, saludAt) {
  if (deleted.has(record.id)) return;
  const known = sensors.get(record.id);
  const sensor = Object.assign(known || { salud: null, saludAt: 0 }, record);
  delete sensor.updated_fields;
  if ("salud" in record) {
    // An older answer must not undo a newer health event.
    if (known && saludAt < known.saludAt) sensor.salud = known.salud;
    else sensor.saludAt = saludAt;
  }
  sensors.set(sensor.id, sensor);
  changed(sensor.id);
}

function removeSensor(id) {
  deleted.add(id);
  sensors.delete(id);
  latest.delete(id);
  recent.delete(id);
  changed(id);
}

function addReading(r) {
  if (!sensors.has(r.sensor_id)) return;
  const t = Date.parse(r.timestamp);
  let byTipo = latest.get(r.sensor_id);
  if (!byTipo) latest.set(r.sensor_id, (byTipo = new Map()));
  const current = byTipo.get(r.tipo);
  if (!current || t >= Date.parse(current.timestamp)) byTipo.set(r.tipo, r);

  let series = recent.get(r.sensor_id);
  if (!series) recent.set(r.sensor_id, (series = new Map()));
  let points = series.get(r.tipo);
  if (!points) series.set(r.tipo, (points = []));
  const last = points[points.length - 1];
  if (!last || t > last.t) points.push({ t, v: r.valor, id: r.id });
  else if (!points.some((p) => p.id === r.id)) {
    points.push({ t, v: r.valor, id: r.id });
    points.sort((a, b) => a.t - b.t);
  }
  const horizon = now() - SPARK_MS;
  let old = 0;
  while (old < points.length && points[old].t < horizon) old++;
  if (old) points.splice(0, old);

  detail.reading(r);
  changed(r.sensor_id);
}

/** A stored reading was corrected (`updated`) or deleted: its old point goes, then the
 * corrected one is added like a new reading; a latest value it was is looked up again. */
function forgetReading(r, updated) {
  const series = recent.get(r.sensor_id);
  if (series) {
    for (const points of series.values()) {
      const at = points.findIndex((p) => p.id === r.id);
      if (at >= 0) points.splice(at, 1);
    }
  }
  const byTipo = latest.get(r.sensor_id);
  const stale = [];
  if (byTipo) {
    for (const [tipo, current] of byTipo) {
      if (current.id === r.id) {
        byTipo.delete(tipo);
        stale.push(tipo);
      }
    }
  }
  detail.forget(r.id);
  if (updated) addReading(r);
  for (const tipo of stale) quietly(refreshLatest(r.sensor_id, tipo));
  changed(r.sensor_id);
}

/** The newest stored reading of a sensor and tipo, after its latest one went. */
async function refreshLatest(sensorId, tipo) {
  const [newest] = await api("GET", `/lecturas/?sensor_id=${sensorId}&tipo=${encodeURIComponent(tipo)}&limit=1`);
  if (newest) addReading(newest);
  else changed(sensorId);
}

/** The sampling interval in ms, or null for a sensor fed over REST without one. */
function intervalMs(s) {
  if (s.intervalo) return s.intervalo * 1000;
  return s.fuente ? DEFAULT_INTERVAL_S * 1000 : null;
}

function lastSample(s) {
  let t = s.salud && s.salud.ultima_muestra ? Date.parse(s.salud.ultima_muestra) : 0;
  for (const r of (latest.get(s.id) || new Map()).values()) t = Math.max(t, Date.parse(r.timestamp));
  return t || null;
}

/** What a sensor's badge says: `key` is live, stale, offline, starting or idle. */
function health(s) {
  const salud = s.salud;
  const last = lastSample(s);
  const age = last === null ? null : now() - last;
  const every = intervalMs(s);
  if (!s.activo) return { key: "idle", text: "Paused", age };
  if (salud && !salud.conectado) return { key: "offline", text: "Disconnected", age };
  if (salud && salud.estado === "offline") return { key: "offline", text: "Failing", age };
  if (age === null) {
    return salud && salud.estado === "starting"
      ? { key: "starting", text: "Starting", age }
      : { key: "idle", text: "No data", age };
  }
  const staleAfter = every === null ? PUSHED_STALE_MS : STALE_INTERVALS * every + STALE_SLACK_MS;
  if (age > staleAfter) return { key: "stale", text: "Stale", age };
  return { key: "live", text: "Live", age };
}

/** The sensor's latest readings, its own tipo first. */
function orderedValues(s) {
  const byTipo = latest.get(s.id) || new Map();
  return [...byTipo.values()].sort(
    (a, b) => (b.tipo === s.tipo) - (a.tipo === s.tipo) || a.tipo.localeCompare(b.tipo)
  );
}

function renderValues(box, s, state) {
  const values = orderedValues(s);
  box.classList.toggle("old", state.key !== "live");
  const key = values.map((r) => r.tipo).join(",");
  if (box.dataset.tipos !== key || !values.length) {
    box.dataset.tipos = key;
    box.replaceChildren(
      ...(values.length
        ? values.map((r) =>
            h("div", { class: DERIVED.has(r.tipo) ? "value derived" : "value", "data-tipo": r.tipo },
              h("span", { class: "label", text: label(r.tipo) }),
              h("span", { class: "reading" }, h("span", { class: "num" }), h("span", { class: "unit" }))
            )
          )
        : [h("span", { class: "none", text: "No readings yet" })])
    );
  }
  for (const r of values) {
    const el = box.querySelector(`[data-tipo="${CSS.escape(r.tipo)}"]`);
    el.querySelector(".num").textContent = fmt(r.valor);
    el.querySelector(".unit").textContent = r.unidad || "";
    el.title = `${label(r.tipo)} at ${clock(Date.parse(r.timestamp))}`;
  }
}

/** The line under the values: age of the last sample and the last error. */
function renderStatus(p, s, state) {
  const parts = [];
  if (state.age === null) parts.push(h("span", { text: s.activo ? "waiting for the first sample" : "not sampled" }));
  else if (state.key === "live") parts.push(h("span", { text: `updated ${ago(state.age)}` }));
  else parts.push(h("span", { class: "warn", text: `last sample ${ago(state.age)}, at ${clock(now() - state.age)}` }));
  const salud = s.salud;
  if (salud && salud.ultimo_error && salud.ultimo_error_en) {
    const at = Date.parse(salud.ultimo_error_en);
    if (state.key === "offline" || now() - at < 10 * 60e3) {
      const cls = state.key === "offline" ? "err" : "warn";
      parts.push(h("span", { class: cls, text: `last error ${clock(at)}: ${salud.ultimo_error}` }));
    }
  }
  p.replaceChildren(...parts);
}

// ---------------------------------------------------------------- overview

const cards = new Map();
const dirty = new Set();
let frame = 0;

function changed(id) {
  dirty.add(id);
  if (!frame) frame = requestAnimationFrame(flush);
}

function flush() {
  frame = 0;
  for (const id of dirty) {
    const s = sensors.get(id);
    if (s) renderCard(s, true);
    else if (cards.has(id)) {
      cards.get(id).el.remove();
      cards.delete(id);
    }
  }
  dirty.clear();
  $("no-sensors").hidden = sensors.size > 0 || !everLive;
  // Once for the whole gateway, at the top: it is the gateway's clock, not a sensor's.
  $("clock-warning").hidden = ![...sensors.values()].some((s) => orderedValues(s).some((r) => r.hora_dudosa));
  if (view === "manage") renderRows();
  if (view === "sensor") detail.render();
}

function renderCard(s, withSpark) {
  let card = cards.get(s.id);
  if (!card) {
    const el = h("a", { class: "card", href: `#/sensor/${s.id}`, "data-sensor": s.id },
      h("div", { class: "card-head" },
        h("div", {}, h("h2"), h("p", { class: "sub" })),
        h("span", { class: "badge" })),
      h("div", { class: "values" }),
      h("canvas", { class: "spark", "aria-hidden": "true" }),
      h("p", { class: "status" }));
    card = { el, name: el.querySelector("h2"), sub: el.querySelector(".sub"), badge: el.querySelector(".badge"),
      values: el.querySelector(".values"), spark: el.querySelector(".spark"), status: el.querySelector(".status") };
    cards.set(s.id, card);
    const next = [...cards.keys()].filter((id) => id > s.id).sort((a, b) => a - b)[0];
    $("cards").insertBefore(el, next === undefined ? null : cards.get(next).el);
  }
  const state = health(s);
  card.name.textContent = title(s);
  card.sub.textContent = [s.ubicacion, s.modelo].filter(Boolean).join(" · ");
  card.badge.textContent = state.text;
  card.badge.dataset.health = state.key;
  card.el.dataset.health = state.key;
  renderValues(card.values, s, state);
  renderStatus(card.status, s, state);
  if (withSpark) drawSpark(card.spark, s, state.key === "live");
}

function drawSpark(canvas, s, live) {
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  if (!width) return;
  const dpr = window.devicePixelRatio || 1;
  canvas.width = Math.round(width * dpr);
  canvas.height = Math.round(height * dpr);
  const g = canvas.getContext("2d");
  g.scale(dpr, dpr);
  const first = orderedValues(s)[0];
  const points = first ? (recent.get(s.id) || new Map()).get(first.tipo) || [] : [];
  if (points.length < 2) return;
  // A young history fills the width rather than huddling at the right edge.
  const t1 = now();
  const t0 = Math.min(t1 - 60e3, Math.max(t1 - SPARK_MS, points[0].t));
  let lo = Infinity;
  let hi = -Infinity;
  for (const p of points) {
    lo = Math.min(lo, p.v);
    hi = Math.max(hi, p.v);
  }
  if (hi - lo < 0.2) {
    lo -= 0.1;
    hi += 0.1;
  }
  const x = (t) => ((t - t0) / (t1 - t0)) * width;
  const y = (v) => height - 4 - ((v - lo) / (hi - lo)) * (height - 8);
  const color = live ? css("--accent") : css("--muted");
  g.beginPath();
  points.forEach((p, i) => (i ? g.lineTo(x(p.t), y(p.v)) : g.moveTo(x(p.t), y(p.v))));
  g.lineWidth = 2;
  g.lineJoin = "round";
  g.strokeStyle = color;
  g.stroke();
  g.lineTo(x(points[points.length - 1].t), height);
  g.lineTo(x(points[0].t), height);
  g.closePath();
  g.globalAlpha = 0.12;
  g.fillStyle = color;
  g.fill();
}

/** Badges and ages move with time even when nothing arrives; sparklines slide along
 * every few seconds. */
let ticks = 0;
function tick() {
  const redrawSparks = ++ticks % 5 === 0;
  for (const s of sensors.values()) renderCard(s, redrawSparks);
  if (view === "sensor") detail.render();
}

// ---------------------------------------------------------------- loading over REST

async function loadSensors() {
  const asked = now();
  const list = await api("GET", "/sensores/?limit=1000");
  for (const record of list) upsertSensor(record, asked);
  return list;
}

/** Recent readings of every sensor, for the sparklines. */
async function loadRecent() {
  const rows = await api("GET", `/lecturas/?desde=${encodeURIComponent(iso(now() - SPARK_MS))}&order=desc&limit=10000`);
  for (let i = rows.length - 1; i >= 0; i--) addReading(rows[i]);
}

/** Replaces all state with what the REST API says: after a `resync`, events were lost. */
async function reload() {
  const list = await api("GET", "/sensores/?limit=1000");
  const ids = new Set(list.map((s) => s.id));
  for (const id of [...sensors.keys()]) if (!ids.has(id)) removeSensor(id);
  deleted.clear();
  const asked = now();
  for (const record of list) upsertSensor(record, asked);
  const newest = await Promise.all(
    list.map((s) => api("GET", `/lecturas/?sensor_id=${s.id}&limit=20`).catch(() => []))
  );
  for (const rows of newest) rows.reverse().forEach(addReading);
  await loadRecent();
}

function quietly(promise) {
  promise.catch((e) => console.warn("sensorgate:", e.message));
}

// ---------------------------------------------------------------- live connection

let everLive = false;
let offlineSince = null;

function applySnapshot(snapshot) {
  const ids = new Set(snapshot.sensors.map((s) => s.id));
  for (const id of [...sensors.keys()]) if (!ids.has(id)) removeSensor(id);
  for (const s of snapshot.sensors) upsertSensor(s, 0);
  for (const r of snapshot.readings) addReading(r);
  showSeq(snapshot.seq);
  alerts.changed();
  quietly(loadSensors());
  quietly(loadRecent());
}

function applyEvent(e) {
  showSeq(e.seq);
  if (e.type === "entity_event" && e.entity_type === "reading") {
    if (e.event_type === "updated" || e.event_type === "deleted") forgetReading(e.data, e.event_type === "updated");
    else addReading(e.data);
    detail.history(e.event_type, e.data);
  } else if (e.type === "entity_event" && e.entity_type === "sensor") {
    if (e.event_type === "deleted") removeSensor(e.entity_id);
    else upsertSensor(e.data, 0);
  } else if (e.type === "system_event" && /^(alert|silence)_/.test(e.event_type)) {
    alerts.changed();
  } else if (e.type === "system_event" && e.data && sensors.has(e.data.sensor_id) && e.data.salud) {
    const s = sensors.get(e.data.sensor_id);
    const at = Date.parse(e.timestamp);
    if (at >= s.saludAt) {
      s.salud = e.data.salud;
      s.saludAt = at;
      changed(s.id);
    }
  }
}

function showSeq(seq) {
  if (typeof seq !== "number") return;
  lastSeq = seq;
  $("seq").textContent = seq;
}

function showConnection(state) {
  const pill = $("conn");
  pill.dataset.state = state;
  pill.textContent = { live: "Live", connecting: "Connecting", offline: "Offline" }[state];
  if (state === "live") {
    if (offlineSince !== null) quietly(loadSensors()); // health restarts with the daemon
    everLive = true;
    offlineSince = null;
  } else if (offlineSince === null && (state === "offline" || everLive)) {
    offlineSince = Date.now();
  }
  const banner = $("offline");
  banner.hidden = state === "live" || offlineSince === null;
  $("offline-text").textContent = everLive
    ? `Offline since ${clock(offlineSince)}: reconnecting… values may be out of date.`
    : "Cannot reach the gateway: retrying…";
  document.body.classList.toggle("is-offline", !banner.hidden);
}

const client = new SensorgateClient({
  channels: ["sensors", "readings", "general"],
  snapshot: true,
  token: storedToken() || null,
  onSnapshot: applySnapshot,
  onEvent: applyEvent,
  onResync: () => quietly(reload()),
  onState: showConnection,
  onMessage: (m) => {
    if (m.type === "connection" && m.timestamp) clockOffset = Date.parse(m.timestamp) - Date.now();
  },
});

// ---------------------------------------------------------------- sensor detail and charts

let uplotLoading = null;

/** The chart library is only fetched when a chart is first shown. */
function loadUPlot() {
  if (!uplotLoading) {
    uplotLoading = new Promise((resolve, reject) => {
      document.head.append(h("link", { rel: "stylesheet", href: "/assets/uPlot.min.css" }));
      const script = h("script", { src: "/assets/uPlot.iife.min.js" });
      script.onload = () => resolve(window.uPlot);
      script.onerror = () => {
        uplotLoading = null;
        reject(new Error("the chart library did not load"));
      };
      document.head.append(script);
    });
  }
  return uplotLoading;
}

function chartOptions(width, name, unit, banded) {
  const axis = {
    stroke: css("--muted"),
    grid: { stroke: css("--line"), width: 1 },
    ticks: { stroke: css("--line"), width: 1 },
    font: "12px system-ui, sans-serif",
  };
  const show = (u, v) => (v === null || v === undefined ? "–" : `${fmt(v)} ${unit}`);
  const series = [{}, { label: banded ? "average" : name, stroke: css("--accent"), width: 2, value: show }];
  if (banded) {
    series.push(
      { label: "min", stroke: css("--band-line"), width: 1, value: show },
      { label: "max", stroke: css("--band-line"), width: 1, value: show }
    );
  }
  return {
    width,
    height: 240,
    series,
    bands: banded ? [{ series: [3, 2], fill: css("--band") }] : [],
    scales: { x: { time: true } },
    axes: [axis, Object.assign({}, axis, { size: 52, values: (u, ticks) => ticks.map(fmt) })],
    cursor: { drag: { x: true, y: false } },
  };
}

/** An entry of a list in a source: a modbus register by what it measures. */
function listed(entry) {
  if (entry === null || typeof entry !== "object") return entry;
  return entry.tipo ?? JSON.stringify(entry);
}

/** `sim · profile dht22 · base_temperature 22`: the kind first, unset options left out. */
function describeSource(fuente) {
  const { kind, ...options } = fuente;
  const shown = Object.entries(options)
    .filter(([, v]) => v !== null && v !== undefined)
    .map(([k, v]) => `${k} ${Array.isArray(v) ? v.map(listed).join(", ") : typeof v === "object" ? JSON.stringify(v) : v}`);
  return [kind, ...shown].join(" · ");
}

const detail = {
  id: null,
  range: "1h",
  charts: new Map(), // tipo → {box, plot, data, unit}
  live: new Map(), // tipo → {t: [], v: [], ids: Set}
  loadId: 0,
  refresh: 0,
  pending: 0,

  open(id) {
    if (this.id !== id) {
      this.id = id;
      this.range = "1h";
    }
    this.render();
    this.load();
    quietly(this.loadRows(id));
  },

  close() {
    this.id = null;
    this.rows = [];
    $("d-readings").replaceChildren();
    this.loadId++;
    clearInterval(this.refresh);
    for (const c of this.charts.values()) if (c.plot) c.plot.destroy();
    this.charts.clear();
    this.live.clear();
    $("d-charts").replaceChildren();
  },

  render() {
    const s = sensors.get(this.id);
    if (!s) {
      $("d-name").textContent = this.id === null || !everLive ? "" : `Sensor ${this.id} not found`;
      return;
    }
    const state = health(s);
    $("d-name").textContent = title(s);
    $("d-sub").textContent = [s.ubicacion, s.modelo, `#${s.id}`].filter(Boolean).join(" · ");
    $("d-badge").textContent = state.text;
    $("d-badge").dataset.health = state.key;
    $("d-edit").href = `#/manage/${s.id}`;
    renderValues($("d-values"), s, state);
    renderStatus($("d-status"), s, state);
    const every = intervalMs(s);
    const facts = [
      ["Tipo", s.tipo],
      ["Every", every ? `${every / 1000} s` : "when pushed"],
      ["Source", s.fuente ? describeSource(s.fuente) : "readings posted over REST"],
    ];
    if (s.salud) {
      facts.push(["Reads", Object.entries(s.salud.conteo || {}).map(([k, n]) => `${k} ${n}`).join(" · ") || "none yet"]);
      facts.push(["Device", s.salud.conectado ? "connected" : "not found"]);
    }
    $("d-facts").replaceChildren(...facts.flatMap(([k, v]) => [h("dt", { text: k }), h("dd", { text: v })]));
    for (const b of document.querySelectorAll("[data-range]")) b.setAttribute("aria-pressed", String(b.dataset.range === this.range));
  },

  tipos() {
    const s = sensors.get(this.id);
    const seen = orderedValues(s || { id: this.id, tipo: "" }).map((r) => r.tipo);
    return seen.length ? seen : s ? [s.tipo] : [];
  },

  /** Tipos in card order: the sensor's own first. */
  order(tipos) {
    const own = (sensors.get(this.id) || {}).tipo;
    return [...tipos].sort((a, b) => (b === own) - (a === own) || a.localeCompare(b));
  },

  chart(tipo) {
    let c = this.charts.get(tipo);
    if (!c) {
      const box = h("div", { class: "plot" });
      const el = h("section", { class: "panel chart", "data-tipo": tipo }, h("h3", { text: label(tipo) }), box);
      $("d-charts").append(el);
      c = { el, box, plot: null, unit: "", banded: false };
      this.charts.set(tipo, c);
    }
    return c;
  },

  message(tipo, text) {
    const c = this.chart(tipo);
    if (c.plot) c.plot.destroy();
    c.plot = null;
    c.box.replaceChildren(h("div", { class: "msg", text }));
  },

  async draw(tipo, unit, banded, data) {
    const uPlot = await loadUPlot();
    const c = this.chart(tipo);
    c.el.querySelector("h3").textContent = unit ? `${label(tipo)} (${unit})` : label(tipo);
    if (c.plot && c.banded === banded && c.unit === unit) {
      c.plot.setData(data);
      return;
    }
    if (c.plot) c.plot.destroy();
    c.box.replaceChildren();
    c.unit = unit;
    c.banded = banded;
    c.plot = new uPlot(chartOptions(c.box.clientWidth || 600, label(tipo), unit, banded), data, c.box);
  },

  async load() {
    const id = this.id;
    const range = this.range;
    const loadId = ++this.loadId;
    clearInterval(this.refresh);
    for (const c of this.charts.values()) if (c.plot) c.plot.destroy();
    this.charts.clear();
    this.live.clear();
    $("d-charts").replaceChildren();
    const tipos = this.tipos();
    for (const tipo of tipos) this.message(tipo, "Loading…");
    const current = () => loadId === this.loadId;
    try {
      if (range === "1h") {
        await this.loadHour(id, current);
      } else {
        const answers = await Promise.all(tipos.map((tipo) => this.loadHistory(id, tipo, RANGES[range], current)));
        if (current() && answers.includes("unavailable")) {
          for (const c of this.charts.values()) if (c.plot) c.plot.destroy();
          this.charts.clear();
          $("d-charts").replaceChildren(
            h("p", { class: "panel msg", text: "History not available on this gateway yet. The last hour is, live." })
          );
          return;
        }
        this.refresh = setInterval(() => {
          if (current()) for (const tipo of this.tipos()) quietly(this.loadHistory(id, tipo, RANGES[range], current));
        }, 60e3);
      }
    } catch (e) {
      if (current()) for (const tipo of tipos) this.message(tipo, `Could not load the chart: ${e.message}`);
    }
  },

  async loadHour(id, current) {
    const since = iso(now() - RANGES["1h"].ms);
    const rows = await api("GET", `/lecturas/?sensor_id=${id}&desde=${encodeURIComponent(since)}&order=asc&limit=10000`);
    if (!current()) return;
    for (const r of rows) this.collect(r);
    for (const [key, r] of latest.get(id) || new Map()) if (!this.live.has(key)) this.collect(r);
    if (!this.live.size) for (const tipo of this.tipos()) this.message(tipo, "No readings in the last hour.");
    for (const tipo of this.order(this.live.keys())) await this.drawLive(tipo);
  },

  collect(r) {
    let series = this.live.get(r.tipo);
    if (!series) this.live.set(r.tipo, (series = { points: [], ids: new Set(), unit: r.unidad || "" }));
    if (series.ids.has(r.id)) return false;
    series.ids.add(r.id);
    const t = Date.parse(r.timestamp) / 1000;
    const points = series.points;
    const point = [t, r.valor, r.id];
    if (!points.length || t >= points[points.length - 1][0]) points.push(point);
    else points.splice(points.findIndex((p) => p[0] > t), 0, point);
    const horizon = (now() - RANGES["1h"].ms) / 1000;
    while (points.length && points[0][0] < horizon) series.ids.delete(points.shift()[2]);
    return true;
  },

  drawLive(tipo) {
    const series = this.live.get(tipo);
    const data = [series.points.map((p) => p[0]), series.points.map((p) => p[1])];
    return this.draw(tipo, series.unit, false, data);
  },

  /** A live reading: the hour chart grows, at most once a frame. */
  reading(r) {
    if (r.sensor_id !== this.id || this.range !== "1h" || view !== "sensor") return;
    if (this.collect(r)) this.redrawLive();
  },

  /** A stored reading corrected or deleted: its point leaves the hour chart. */
  forget(id) {
    let found = false;
    for (const series of this.live.values()) {
      const at = series.points.findIndex((p) => p[2] === id);
      if (at < 0) continue;
      series.points.splice(at, 1);
      series.ids.delete(id);
      found = true;
    }
    if (found) this.redrawLive();
  },

  redrawLive() {
    if (!this.pending) {
      this.pending = requestAnimationFrame(() => {
        this.pending = 0;
        for (const tipo of this.live.keys()) quietly(this.drawLive(tipo));
      });
    }
  },

  rows: [],

  async loadRows(id) {
    const rows = await api("GET", `/lecturas/?sensor_id=${id}&limit=${HISTORY_ROWS}`);
    if (id !== this.id) return;
    this.rows = rows;
    this.renderRows();
  },

  /** Keeps the list of latest readings in step with reading events. */
  history(kind, r) {
    if (r.sensor_id !== this.id) return;
    this.rows = this.rows.filter((row) => row.id !== r.id);
    if (kind !== "deleted") this.rows.push(r);
    this.rows.sort((a, b) => Date.parse(b.timestamp) - Date.parse(a.timestamp) || b.id - a.id);
    this.rows.length = Math.min(this.rows.length, HISTORY_ROWS);
    this.renderRows();
  },

  renderRows() {
    $("d-no-readings").hidden = this.rows.length > 0;
    const tbody = $("d-readings");
    const existing = new Map([...tbody.children].map((tr) => [Number(tr.dataset.reading), tr]));
    tbody.replaceChildren(
      ...this.rows.map((r) => {
        const key = JSON.stringify([r.tipo, r.valor, r.unidad, r.timestamp]);
        const known = existing.get(r.id);
        if (known && known.dataset.key === key) return known;
        const taken = new Date(Date.parse(r.timestamp));
        return h(
          "tr",
          { "data-reading": r.id, "data-key": key },
          h("td", { text: `${taken.toLocaleDateString()} ${clock(taken.getTime())}`, title: r.timestamp }),
          h("td", { class: "wide", text: label(r.tipo) }),
          h("td", { text: r.unidad ? `${fmt(r.valor)} ${r.unidad}` : fmt(r.valor) }),
          h("td", { class: "actions" },
            h("button", {
              class: "btn small danger",
              type: "button",
              text: "Delete",
              title: `Delete the reading taken at ${r.timestamp}`,
              onclick: (e) => deleteReading(r, e.currentTarget),
            }))
        );
      })
    );
  },

  async loadHistory(id, tipo, range, current) {
    const to = now();
    const query = new URLSearchParams({
      sensor_id: id,
      tipo,
      bucket: range.bucket,
      desde: iso(to - range.ms),
      hasta: iso(to),
    });
    let rows;
    try {
      rows = await api("GET", `/lecturas/agregadas?${query}`);
    } catch (e) {
      if (!current()) return;
      if (e.status === 404 || e.status === 405) return "unavailable";
      this.message(tipo, `History could not be loaded: ${e.message}`);
      return;
    }
    if (!current()) return;
    if (!rows.length) {
      this.message(tipo, "No readings in this range.");
      return;
    }
    // Empty buckets are left out of the answer; a null breaks the line there.
    const xs = [];
    const avg = [];
    const min = [];
    const max = [];
    let previous = null;
    for (const row of rows) {
      const t = Date.parse(row.inicio);
      if (previous !== null && t - previous > 1.5 * range.bucketMs) {
        xs.push((previous + range.bucketMs) / 1000);
        avg.push(null);
        min.push(null);
        max.push(null);
      }
      xs.push(t / 1000);
      avg.push(row.avg);
      min.push(row.min);
      max.push(row.max);
      previous = t;
    }
    const unit = ((latest.get(id) || new Map()).get(tipo) || {}).unidad || "";
    await this.draw(tipo, unit, true, [xs, avg, min, max]);
  },

  resize() {
    for (const c of this.charts.values()) {
      if (c.plot && c.box.clientWidth) c.plot.setSize({ width: c.box.clientWidth, height: 240 });
    }
  },
};

for (const button of document.querySelectorAll("[data-range]")) {
  button.addEventListener("click", () => {
    detail.range = button.dataset.range;
    detail.render();
    detail.load();
  });
}

// ---------------------------------------------------------------- event log

const log = {
  client: null,
  paused: false,
  held: [],
  dropped: 0,
  shown: 0,

  filters() {
    const form = $("log-form");
    const channels = [...form.querySelectorAll("[name=channel]:checked")].map((c) => c.value);
    const list = (name) => {
      const items = form.elements[name].value.split(/[\s,]+/).filter(Boolean);
      return items.length ? items : null;
    };
    // Ids go out as numbers; anything else as typed, for the server to name.
    const ids = list("sensor_id");
    const sensorIds = ids && ids.map((id) => (/^\d+$/.test(id) ? Number(id) : id));
    return { channels, sensor_id: sensorIds, tipo: list("tipo"), event_type: list("event_type") };
  },

  start() {
    if (this.client) return;
    const { channels, ...filters } = this.filters();
    this.client = new SensorgateClient({
      channels,
      filters,
      token: storedToken() || null,
      onEvent: (e) => this.add(e),
      onMessage: (m) => {
        if (!EVENT_TYPES.has(m.type)) this.add(m);
      },
      onState: (state) => {
        const pill = $("log-state");
        pill.dataset.state = state;
        pill.textContent = { live: "Live", connecting: "Connecting", offline: "Offline" }[state];
      },
    });
    this.client.connect();
  },

  /** New channels and filters: told to the server when connected, used on the next
   * connection otherwise. */
  async apply() {
    const { channels, ...filters } = this.filters();
    const error = $("log-error");
    error.textContent = "";
    if (!channels.length) {
      error.textContent = "Pick at least one channel.";
      return;
    }
    const c = this.client;
    const leaving = c.options.channels.filter((name) => !channels.includes(name));
    try {
      await c.subscribe(Object.assign({ channels }, filters));
      if (leaving.length) await c.unsubscribe(leaving);
    } catch (e) {
      if (e.code) error.textContent = e.detail || e.message;
      c.options.channels = channels;
      Object.assign(c.options.filters, filters);
    }
  },

  add(message) {
    if (this.paused) {
      this.held.push(message);
      if (this.held.length > LOG_HELD) {
        this.held.shift();
        this.dropped++;
      }
      this.showHeld();
      return;
    }
    this.show([message]);
  },

  show(messages) {
    const list = $("log");
    const rows = messages.map((m) => this.row(m)).reverse();
    list.prepend(...rows);
    while (list.childElementCount > LOG_ROWS) list.lastElementChild.remove();
    this.shown = list.childElementCount;
    $("log-count").textContent = this.shown;
    const seq = messages.reduce((s, m) => (typeof m.seq === "number" ? m.seq : s), null);
    if (seq !== null) $("log-seq").textContent = seq;
  },

  row(m) {
    const event = EVENT_TYPES.has(m.type);
    let kind = m.type;
    let what = "";
    if (m.type === "entity_event") {
      kind = `${m.entity_type} ${m.event_type}`;
      what = m.entity_type === "reading"
        ? `sensor ${m.data.sensor_id} · ${m.data.tipo} ${fmt(m.data.valor)} ${m.data.unidad || ""}`
        : `#${m.entity_id} ${m.data && m.data.nombre ? m.data.nombre : ""}`;
      if (m.data && m.data.updated_fields) what += ` · ${m.data.updated_fields.join(", ")}`;
    } else if (m.type === "system_event") {
      kind = m.event_type;
      what = m.data && m.data.sensor_id !== undefined ? `sensor ${m.data.sensor_id}` : "";
    } else if (m.type === "test_event") {
      what = JSON.stringify(m.data);
    } else if (m.type === "resync") {
      what = `${m.reason}: events from ${m.oldest_seq} follow`;
    } else if (m.type === "error") {
      what = `${m.code}: ${m.detail}`;
    } else if (m.type === "result") {
      const sub = m.subscription || {};
      what = `${m.action}: ${(sub.channels || []).join(", ")}`;
    } else if (m.type === "stats" && m.data) {
      what = `${m.data.total_connections} connections`;
    } else if (m.type === "connection") {
      what = `${m.channel} · client ${m.client_id}`;
    }
    const cls = event ? "" : m.type === "error" || m.type === "resync" ? "problem" : "meta";
    const at = m.timestamp ? Date.parse(m.timestamp) : Date.now();
    return h("li", { class: cls, "data-seq": event ? m.seq : null },
      h("details", {},
        h("summary", {},
          h("span", { class: "seq", text: event ? `#${m.seq}` : "" }),
          h("time", { text: clock(at) + "." + String(at % 1000).padStart(3, "0") }),
          h("span", { class: "kind", text: kind }),
          h("span", { class: "what", text: what })),
        h("pre", { text: JSON.stringify(m, null, 2) })));
  },

  showHeld() {
    const el = $("log-held");
    el.hidden = !this.paused;
    el.textContent = `${this.held.length} waiting` + (this.dropped ? `, ${this.dropped} dropped` : "");
  },

  togglePause() {
    this.paused = !this.paused;
    $("log-pause").setAttribute("aria-pressed", String(this.paused));
    $("log-pause").textContent = this.paused ? "Resume" : "Pause";
    if (!this.paused && this.held.length) this.show(this.held.splice(0));
    this.dropped = 0;
    this.showHeld();
  },

  clear() {
    $("log").replaceChildren();
    this.held = [];
    this.dropped = 0;
    this.shown = 0;
    $("log-count").textContent = "0";
    this.showHeld();
  },
};

$("log-form").addEventListener("submit", (e) => {
  e.preventDefault();
  quietly(log.apply());
});
$("log-pause").addEventListener("click", () => log.togglePause());
$("log-clear").addEventListener("click", () => log.clear());

// ---------------------------------------------------------------- sensor management

const form = $("sensor-form");
let editing = null;

function renderRows() {
  const list = [...sensors.values()].sort((a, b) => a.id - b.id);
  $("no-rows").hidden = list.length > 0;
  const rows = $("sensor-rows");
  const existing = new Map([...rows.children].map((tr) => [Number(tr.dataset.sensor), tr]));
  rows.replaceChildren(
    ...list.map((s) => {
      const tr = existing.get(s.id) || h("tr", { "data-sensor": s.id });
      const key = JSON.stringify([s.nombre, s.tipo, s.modelo, s.intervalo, s.fuente, s.activo]);
      if (tr.dataset.key !== key) {
        tr.dataset.key = key;
        const every = intervalMs(s);
        tr.replaceChildren(
          h("td", { text: s.id }),
          h("td", {}, h("a", { href: `#/sensor/${s.id}`, text: title(s) }), s.activo ? null : h("span", { class: "hint", text: " paused" })),
          h("td", { class: "wide", text: s.tipo }),
          h("td", { class: "wide", text: s.modelo }),
          h("td", { class: "wide", text: every ? `${every / 1000} s` : "–" }),
          h("td", { class: "actions" },
            h("a", { class: "btn small", href: `#/manage/${s.id}`, text: "Edit" }),
            h("button", { class: "btn small danger", type: "button", text: "Delete", onclick: (e) => remove(s.id, e.currentTarget) }))
        );
      }
      return tr;
    })
  );
}

/** Deleting asks once more on the same button instead of a modal dialog: true on the
 * second click within 4 s. */
function confirmed(button) {
  if (button.classList.contains("armed")) return true;
  button.classList.add("armed");
  button.textContent = "Confirm";
  setTimeout(() => {
    button.classList.remove("armed");
    button.textContent = "Delete";
  }, 4000);
  return false;
}

/** Deletes a bad reading from a sensor's history; the deleted event updates every view. */
async function deleteReading(r, button) {
  if (!confirmed(button)) return;
  const error = $("d-readings-error");
  error.hidden = true;
  button.disabled = true;
  try {
    await api("DELETE", `/lecturas/${r.id}`);
    detail.history("deleted", r);
  } catch (e) {
    button.disabled = false;
    const auth = e.status === 401 || e.status === 403;
    error.textContent = auth ? `Not allowed: ${e.message}. Check the access token.` : e.message;
    error.hidden = false;
  }
}

async function remove(id, button) {
  if (!confirmed(button)) return;
  try {
    const gone = await api("DELETE", `/sensores/${id}`);
    removeSensor(id);
    if (editing === id) resetForm();
    notice(`Sensor #${id} (${title(gone)}) deleted. Its readings stay until retention removes them.`);
  } catch (e) {
    failure(e);
  }
}

function notice(text) {
  $("form-error").hidden = true;
  $("form-notice").textContent = text;
  $("form-notice").hidden = false;
}

function failure(e) {
  $("form-notice").hidden = true;
  const auth = e.status === 401 || e.status === 403;
  $("form-error").textContent = auth ? `Not allowed: ${e.message}. Check the access token.` : e.message;
  $("form-error").hidden = false;
}

function clearErrors() {
  for (const el of form.querySelectorAll("[data-error-for]")) el.textContent = "";
  for (const el of form.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
  $("form-error").hidden = true;
  $("form-notice").hidden = true;
}

/** Puts each of the server's validation messages next to its field; one about an entry
 * of a field (`calibracion.temperatura.scale`) goes next to that field, naming the entry. */
function fieldErrors(errors) {
  const unplaced = [];
  for (const error of errors) {
    let { field, message } = error;
    const dot = field.indexOf(".");
    if (dot > 0) {
      message = `${field.slice(dot + 1)}: ${message}`;
      field = field.slice(0, dot);
    }
    const slot = form.querySelector(`[data-error-for="${CSS.escape(field)}"]`);
    const input = field === "calibracion" ? form.querySelector(".cal-tipo") : form.elements[field];
    if (!slot) {
      unplaced.push(`${field}: ${message}`);
      continue;
    }
    slot.textContent = slot.textContent ? `${slot.textContent}; ${message}` : message;
    if (input) {
      input.setAttribute("aria-invalid", "true");
      input.setAttribute("aria-describedby", slot.id || (slot.id = `err-${field}`));
    }
  }
  const first = form.querySelector("[aria-invalid=true]");
  if (first) first.focus();
  if (unplaced.length) failure(new Error(unplaced.join("; ")));
}

/** One row of the calibration editor: a tipo and its offset and scale. */
function calibrationRow(tipo = "", adjustment = {}) {
  const input = (cls, label, value, mode) =>
    h("input", { class: cls, "aria-label": label, autocomplete: "off", inputmode: mode, value: value ?? "" });
  const row = h("div", { class: "cal-row" },
    input("cal-tipo", "Calibrated tipo", tipo),
    input("cal-offset", "Offset", adjustment.offset, "decimal"),
    input("cal-scale", "Scale", adjustment.scale, "decimal"),
    h("button", { class: "btn small", type: "button", text: "Remove", onclick: () => row.remove() }));
  row.querySelector(".cal-tipo").setAttribute("list", "tipos");
  row.querySelector(".cal-offset").placeholder = "offset, 0";
  row.querySelector(".cal-scale").placeholder = "scale, 1";
  $("s-calibration").append(row);
  return row;
}

function resetForm() {
  editing = null;
  form.reset();
  $("s-calibration").replaceChildren();
  clearErrors();
  $("form-title").textContent = "New sensor";
  $("form-submit").textContent = "Create sensor";
  $("form-cancel").hidden = true;
}

function editSensor(id) {
  const s = sensors.get(id);
  if (!s) return;
  resetForm();
  editing = id;
  $("form-title").textContent = `Edit sensor #${id}`;
  $("form-submit").textContent = "Save changes";
  $("form-cancel").hidden = false;
  const f = form.elements;
  f.nombre.value = s.nombre || "";
  f.tipo.value = s.tipo;
  f.modelo.value = s.modelo;
  f.ubicacion.value = s.ubicacion || "";
  f.intervalo.value = s.intervalo ?? "";
  f.fuente.value = s.fuente ? JSON.stringify(s.fuente, null, 2) : "";
  f.activo.checked = s.activo;
  for (const [tipo, adjustment] of Object.entries(s.calibracion || {})) calibrationRow(tipo, adjustment);
  const derived = new Set(s.derivados || []);
  for (const box of form.querySelectorAll("input[name=derivados]")) box.checked = derived.has(box.value);
}

/** The calibration the editor holds: numbers as typed, so the server names what is
 * wrong; a row without a tipo is ignored. */
function calibrationBody() {
  const calibration = {};
  for (const row of $("s-calibration").children) {
    const tipo = row.querySelector(".cal-tipo").value.trim();
    if (!tipo) continue;
    const entry = {};
    for (const key of ["offset", "scale"]) {
      const text = row.querySelector(`.cal-${key}`).value.trim();
      if (text !== "") entry[key] = Number.isFinite(Number(text)) ? Number(text) : text;
    }
    calibration[tipo] = entry;
  }
  return calibration;
}

/** The request body. Values are sent as typed so that the server's validation, the one
 * source of truth, names what is wrong; only JSON syntax is checked here. */
function formBody() {
  const f = form.elements;
  const body = { tipo: f.tipo.value.trim(), modelo: f.modelo.value.trim(), activo: f.activo.checked };
  const optional = (name, value) => {
    if (value !== "") body[name] = value;
    else if (editing !== null) body[name] = null;
  };
  optional("nombre", f.nombre.value.trim());
  optional("ubicacion", f.ubicacion.value.trim());
  const interval = f.intervalo.value.trim();
  optional("intervalo", interval === "" || !Number.isFinite(Number(interval)) ? interval : Number(interval));
  const calibration = calibrationBody();
  if (Object.keys(calibration).length || editing !== null) body.calibracion = calibration;
  const derived = [...form.querySelectorAll("input[name=derivados]:checked")].map((box) => box.value);
  if (derived.length || editing !== null) body.derivados = derived;
  const source = f.fuente.value.trim();
  if (source === "") optional("fuente", "");
  else {
    try {
      body.fuente = JSON.parse(source);
    } catch (e) {
      fieldErrors([{ field: "fuente", message: `not valid JSON: ${e.message}` }]);
      return null;
    }
  }
  return body;
}

form.addEventListener("submit", async (e) => {
  e.preventDefault();
  clearErrors();
  const body = formBody();
  if (!body) return;
  const button = $("form-submit");
  button.disabled = true;
  try {
    const wasEditing = editing;
    const saved = wasEditing === null
      ? await api("POST", "/sensores/", body)
      : await api("PUT", `/sensores/${wasEditing}`, body);
    upsertSensor(saved, 0);
    resetForm();
    if (wasEditing === null) {
      notice(`Sensor #${saved.id} (${title(saved)}) created.`);
    } else {
      notice(`Sensor #${saved.id} saved.`);
      location.hash = "#/manage";
    }
  } catch (err) {
    if (err.status === 422 && err.body && Array.isArray(err.body.errors)) fieldErrors(err.body.errors);
    else failure(err);
  } finally {
    button.disabled = false;
  }
});

$("s-calibration-add").addEventListener("click", () => calibrationRow().querySelector("input").focus());
$("form-cancel").addEventListener("click", () => {
  resetForm();
  location.hash = "#/manage";
});
$("s-example").addEventListener("change", (e) => {
  if (e.target.value) form.elements.fuente.value = JSON.stringify(JSON.parse(e.target.value), null, 2);
  e.target.value = "";
});
$("token").value = storedToken();
$("token-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const token = $("token").value.trim();
  try {
    if (token) localStorage.setItem(TOKEN_KEY, token);
    else localStorage.removeItem(TOKEN_KEY);
  } catch {
    // Private browsing without storage: the token lasts until the page is closed.
  }
  client.options.token = token || null;
  if (log.client) log.client.options.token = token || null;
  notice(token ? "Token saved in this browser." : "Token removed.");
});

// ---------------------------------------------------------------- alerts

/** Alert rules: a banner of the firing ones at the top of every view, and the rules
 * view where an admin creates, edits and deletes them. The rules are re-read over REST
 * whenever an alert or silence event arrives (they are few), so the banner follows the
 * gateway's own state machine rather than rebuilding it from events. */
const alerts = (() => {
  let rules = [];
  let editingRule = null;
  let loading = null;
  let again = false;
  const ruleForm = $("rule-form");

  async function load() {
    try {
      rules = await api("GET", "/alertas");
      $("rules-error").hidden = true;
    } catch (e) {
      $("rules-error").textContent = `Alert rules unavailable: ${e.message}`;
      $("rules-error").hidden = false;
    }
    banner();
    if (view === "alerts") rows();
  }

  /** Reloads, at most one request at a time; a change during one asks for another. */
  function changed() {
    if (loading) {
      again = true;
      return;
    }
    loading = load().finally(() => {
      loading = null;
      if (again) {
        again = false;
        changed();
      }
    });
  }

  function watches(r) {
    const sensor = r.sensor ?? `#${r.sensor_id}`;
    const what = {
      above: `> ${r.threshold}`,
      below: `< ${r.threshold}`,
      outside: `outside ${r.min}…${r.max}`,
      no_reading: `no reading for ${r.seconds} s`,
      rate: `changes > ${r.per_minute}/min`,
    }[r.condition];
    return `${sensor} ${r.tipo} ${what}${r.for_s ? ` for ${r.for_s} s` : ""}`;
  }

  function banner() {
    const firing = rules.filter((r) => r.state.phase === "firing");
    const box = $("alerts-banner");
    box.hidden = firing.length === 0;
    const items = firing.map((r) => {
      const since = r.state.fired_at ? ` since ${clock(Date.parse(r.state.fired_at))}` : "";
      const ack = r.state.acknowledged ? ` · acknowledged by ${r.state.acknowledged.by}` : "";
      return h("li", { "data-rule": r.id }, h("b", { text: r.name }), ` ${fmt(r.state.value)}${since}${ack}`);
    });
    $("alerts-text").replaceChildren(
      h("span", { text: firing.length === 1 ? "Alert firing: " : `${firing.length} alerts firing: ` }),
      h("ul", {}, items)
    );
  }

  function failed(e, slot) {
    const auth = e.status === 401 || e.status === 403;
    slot.textContent = auth ? `Not allowed: ${e.message}. Check the access token (Sensors view).` : e.message;
    slot.hidden = false;
  }

  function rows() {
    $("no-rules").hidden = rules.length > 0;
    $("rule-rows").replaceChildren(
      ...rules.map((r) => {
        const fromFile = r.origin === "config";
        const actions = h("td", { class: "actions" });
        if (r.state.phase === "firing" && !r.state.acknowledged) {
          actions.append(
            h("button", {
              class: "btn small",
              type: "button",
              text: "Acknowledge",
              onclick: () => acknowledge(r),
            })
          );
        }
        if (!fromFile) {
          actions.append(
            h("button", { class: "btn small", type: "button", text: "Edit", onclick: () => edit(r) }),
            h("button", {
              class: "btn small danger",
              type: "button",
              text: "Delete",
              onclick: (e) => remove(r, e.currentTarget),
            })
          );
        } else {
          actions.append(h("span", { class: "hint", text: "from the config file" }));
        }
        return h(
          "tr",
          { "data-rule": r.id },
          h("td", { text: r.id }),
          h("td", { text: r.name }),
          h("td", { class: "wide", text: watches(r) }),
          h("td", {}, h("span", { class: "phase", "data-phase": r.state.phase, text: r.state.phase })),
          actions
        );
      })
    );
  }

  async function acknowledge(r) {
    const by = prompt(`Acknowledge "${r.name}": your name`);
    if (!by) return;
    try {
      await api("POST", `/alertas/${r.id}/ack`, { by, comment: "" });
      changed();
    } catch (e) {
      failed(e, $("rules-error"));
    }
  }

  async function remove(r, button) {
    if (!confirmed(button)) return;
    try {
      await api("DELETE", `/alertas/${r.id}`);
      if (editingRule === r.id) reset();
      changed();
    } catch (e) {
      failed(e, $("rules-error"));
    }
  }

  function showCondition() {
    const condition = ruleForm.elements.condition.value;
    for (const box of ruleForm.querySelectorAll("[data-for]")) {
      box.hidden = !box.dataset.for.split(" ").includes(condition);
    }
  }

  function clear() {
    for (const el of ruleForm.querySelectorAll("[data-rule-error]")) el.textContent = "";
    for (const el of ruleForm.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
    $("rule-error").hidden = true;
    $("rule-notice").hidden = true;
  }

  function reset() {
    editingRule = null;
    ruleForm.reset();
    clear();
    showCondition();
    $("rule-title").textContent = "New alert rule";
    $("rule-submit").textContent = "Create rule";
    $("rule-cancel").hidden = true;
  }

  const NUMBERS = ["threshold", "min", "max", "seconds", "per_minute", "for_s", "hysteresis", "repeat_s"];

  function edit(r) {
    reset();
    editingRule = r.id;
    $("rule-title").textContent = `Edit alert rule #${r.id}`;
    $("rule-submit").textContent = "Save changes";
    $("rule-cancel").hidden = false;
    const f = ruleForm.elements;
    f.name.value = r.name;
    f.sensor.value = r.sensor ?? `#${r.sensor_id}`;
    f.tipo.value = r.tipo;
    f.condition.value = r.condition;
    for (const key of NUMBERS) f[key].value = r[key] ?? "";
    f.webhook.value = r.webhook ?? "";
    showCondition();
  }

  /** The request body: the condition's own parameters only, numbers as typed so that
   * the server's validation names what is wrong. */
  function body() {
    const f = ruleForm.elements;
    const sensor = f.sensor.value.trim();
    const out = { name: f.name.value.trim(), tipo: f.tipo.value.trim(), condition: f.condition.value };
    const byId = /^#\d+$/.test(sensor);
    out.sensor_id = byId ? Number(sensor.slice(1)) : null;
    out.sensor = byId ? null : sensor;
    const wanted = { above: ["threshold"], below: ["threshold"], outside: ["min", "max"], no_reading: ["seconds"], rate: ["per_minute"] }[out.condition];
    for (const key of NUMBERS) {
      const text = f[key].value.trim();
      const used = wanted.includes(key) || ["for_s", "hysteresis", "repeat_s"].includes(key);
      if (!used || text === "") out[key] = null;
      else out[key] = Number.isFinite(Number(text)) ? Number(text) : text;
    }
    out.webhook = f.webhook.value.trim() || null;
    if (editingRule === null) {
      for (const [key, value] of Object.entries(out)) if (value === null) delete out[key];
    }
    return out;
  }

  ruleForm.elements.condition.addEventListener("change", showCondition);
  $("rule-cancel").addEventListener("click", reset);
  ruleForm.addEventListener("submit", async (e) => {
    e.preventDefault();
    clear();
    try {
      if (editingRule === null) await api("POST", "/alertas", body());
      else await api("PUT", `/alertas/${editingRule}`, body());
      reset();
      $("rule-notice").textContent = "Rule saved.";
      $("rule-notice").hidden = false;
      changed();
    } catch (err) {
      const errors = (err.body && err.body.errors) || [];
      const unplaced = [];
      for (const { field, message } of errors) {
        const slot = ruleForm.querySelector(`[data-rule-error="${CSS.escape(field)}"]`);
        if (!slot) {
          unplaced.push(`${field}: ${message}`);
          continue;
        }
        slot.textContent = slot.textContent ? `${slot.textContent}; ${message}` : message;
        const input = ruleForm.elements[field === "sensor_id" ? "sensor" : field];
        if (input) input.setAttribute("aria-invalid", "true");
      }
      if (errors.length === 0 || unplaced.length) failed(unplaced.length ? new Error(unplaced.join("; ")) : err, $("rule-error"));
    }
  });
  showCondition();

  return { changed, render: () => { rows(); changed(); } };
})();

// ---------------------------------------------------------------- views

let view = "overview";

function route() {
  const [name = "", arg] = location.hash.replace(/^#\/?/, "").split("/");
  const next = { "": "overview", sensor: "sensor", events: "events", manage: "manage", alerts: "alerts" }[name] || "overview";
  if (view === "sensor" && (next !== "sensor" || Number(arg) !== detail.id)) detail.close();
  view = next;
  for (const section of document.querySelectorAll("main > section")) section.hidden = section.id !== `view-${view}`;
  for (const a of document.querySelectorAll("nav a")) {
    if (a.dataset.view === (view === "sensor" ? "overview" : view)) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  if (view === "overview") for (const s of sensors.values()) renderCard(s, true);
  if (view === "sensor") detail.open(Number(arg));
  if (view === "events") log.start();
  if (view === "manage") {
    renderRows();
    if (arg) editSensor(Number(arg));
    else if (editing !== null) resetForm();
  }
  if (view === "alerts") alerts.render();
  document.title = { overview: "sensorgate", sensor: "sensor · sensorgate", events: "events · sensorgate", manage: "sensors · sensorgate", alerts: "alerts · sensorgate" }[view];
}

window.addEventListener("hashchange", route);
window.addEventListener("resize", () => {
  detail.resize();
  for (const s of sensors.values()) renderCard(s, true);
});
matchMedia("(prefers-color-scheme: dark)").addEventListener("change", () => {
  for (const s of sensors.values()) renderCard(s, true);
  if (view === "sensor") detail.load();
});
// Back from a pocket or a dead Wi-Fi: do not wait out the back-off.
window.addEventListener("online", () => client.reconnectNow());
document.addEventListener("visibilitychange", () => {
  if (document.visibilityState === "visible") client.reconnectNow();
});
$("retry").addEventListener("click", () => {
  client.reconnectNow();
  if (log.client) log.client.reconnectNow();
});

setInterval(tick, 1000);
setInterval(() => {
  if (client.state === "live" && document.visibilityState === "visible") quietly(loadSensors());
}, HEALTH_POLL_MS);
fetch("/healthz")
  .then((r) => r.json())
  .then((health) => ($("version").textContent = `sensorgate ${health.version}`))
  .catch(() => {});

route();
client.connect();
