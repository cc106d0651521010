// The dashboard: reads /v1/unique, /v1/series and /v1/keys with a read-scoped API key.
"use strict";
const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];
const $ = (id) => document.getElementById(id);
const state = { keys: [null], timer: null };

function apiKey() { return localStorage.getItem("impressions.apiKey") || ""; }

async function api(path, params) {
  const url = new URL(path, window.location.href);
  for (const [k, v] of Object.entries(params || {})) {
    if (v === null || v === undefined) continue;
    (Array.isArray(v) ? v : [v]).forEach((x) => url.searchParams.append(k, x));
  }
  let r;
  try {
    r = await fetch(url, { headers: apiKey() ? { "Authorization": "Bearer " + apiKey() } : {} });
  } catch (e) {
    throw new Error("The API cannot be reached (" + e.message + "). Is the cluster running?");
  }
  let body = null;
  try { body = await r.json(); } catch (e) { /* not JSON */ }
  if (!r.ok) {
    const said = body && body.error ? body.error : r.statusText;
    if (r.status === 401) throw new Error("This page needs an API key with the read scope: " + said);
    if (r.status === 403) throw new Error("This API key may not read: " + said);
    if (r.status === 503) throw new Error("Some of the cluster is not answering yet: " + said);
    throw new Error("The API refused the request: " + said);
  }
  return body;
}

function showError(msg) {
  const el = $("error");
  el.textContent = msg || "";
  el.hidden = !msg;
}

function label(key) { return key === null ? "site-wide" : key; }

function rangeParams() {
  const v = $("range").value;
  if (v !== "custom") return { last: v };
  const s = $("start").value, e = $("end").value;
  if (!s) throw new Error("Choose a start time for the custom range.");
  return { start: s + ":00Z", end: e ? e + ":00Z" : null };
}

function stepFor(params) {
  const chosen = $("step").value;
  if (chosen !== "auto") return chosen;
  const spans = { "15m": 15, "1h": 60, "6h": 360, "24h": 1440, "7d": 10080, "30d": 43200 };
  let minutes = spans[params.last];
  if (!minutes) {
    const end = params.end ? Date.parse(params.end) : Date.now();
    minutes = Math.max(1, (end - Date.parse(params.start)) / 60000);
  }
  for (const [s, m] of [["1m", 1], ["5m", 5], ["15m", 15], ["1h", 60], ["6h", 360], ["1d", 1440]]) {
    if (minutes / m <= 120) return s;
  }
  return "1d";
}

function renderChips() {
  const el = $("chosen");
  el.innerHTML = "";
  state.keys.forEach((k, i) => {
    const chip = document.createElement("span");
    chip.className = "chip";
    chip.dataset.key = label(k);
    chip.textContent = label(k);
    const x = document.createElement("button");
    x.textContent = "×";
    x.title = "remove";
    x.onclick = () => { state.keys.splice(i, 1); if (!state.keys.length) state.keys.push(null); renderChips(); refresh(); };
    chip.appendChild(x);
    el.appendChild(chip);
  });
}

function fmt(n) { return n === null || n === undefined ? "?" : Number(n).toLocaleString("en-US"); }

function renderTotals(results) {
  const el = $("totals");
  el.innerHTML = "";
  results.forEach((r) => {
    const d = document.createElement("div");
    d.className = "total";
    d.dataset.key = label(r.key);
    const err = r.exact ? "exact" : "± " + (1.96 * r.relative_error * 100).toFixed(2) + " % (95 %: " +
      fmt(r.interval[0]) + " to " + fmt(r.interval[1]) + ")";
    d.innerHTML = '<div class="name"></div><div class="big unique"></div><div class="small err"></div>' +
      '<div class="small">impressions <span class="impressions"></span></div>' +
      '<div class="small when"></div>';
    d.querySelector(".name").textContent = label(r.key);
    d.querySelector(".unique").textContent = fmt(r.unique_visitors);
    d.querySelector(".unique").dataset.value = r.unique_visitors;
    d.querySelector(".err").textContent = err + (r.partial ? " — partial: some shards did not answer" : "");
    d.querySelector(".impressions").textContent = fmt(r.impressions);
    d.querySelector(".impressions").dataset.value = r.impressions;
    d.querySelector(".when").textContent = new Date(r.start * 1000).toISOString().slice(0, 16).replace("T", " ") +
      " to " + new Date(r.end * 1000).toISOString().slice(0, 16).replace("T", " ") + " UTC";
    el.appendChild(d);
  });
}

function renderChart(series) {
  const svg = $("chart");
  const W = 960, H = 320, L = 70, R = 16, T = 14, B = 34;
  const all = series.flatMap((s) => s.points);
  svg.innerHTML = "";
  $("legend").innerHTML = "";
  if (!all.length) return;
  const x0 = Math.min(...all.map((p) => p.start)), x1 = Math.max(...all.map((p) => p.end));
  const ymax = Math.max(1, ...all.map((p) => p.unique_visitors));
  const X = (t) => L + (W - L - R) * (t - x0) / Math.max(1, x1 - x0);
  const Y = (v) => H - B - (H - T - B) * v / ymax;
  const ns = "http://www.w3.org/2000/svg";
  const add = (tag, attrs, text) => {
    const e = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    svg.appendChild(e);
    return e;
  };
  for (let i = 0; i <= 4; i++) {
    const v = ymax * i / 4;
    add("line", { x1: L, x2: W - R, y1: Y(v), y2: Y(v), class: "grid" });
    add("text", { x: L - 6, y: Y(v) + 4, "text-anchor": "end" }, fmt(Math.round(v)));
  }
  add("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" });
  add("line", { x1: L, x2: L, y1: T, y2: H - B, class: "axis" });
  for (let i = 0; i <= 4; i++) {
    const t = x0 + (x1 - x0) * i / 4;
    add("text", { x: X(t), y: H - B + 16, "text-anchor": i === 0 ? "start" : i === 4 ? "end" : "middle" },
      new Date(t * 1000).toISOString().slice(5, 16).replace("T", " "));
  }
  series.forEach((s, i) => {
    const color = COLORS[i % COLORS.length];
    const d = s.points.map((p, j) => (j ? "L" : "M") + X((p.start + p.end) / 2).toFixed(1) + " " + Y(p.unique_visitors).toFixed(1)).join(" ");
    const path = add("path", { d, class: "series", stroke: color });
    path.dataset.key = label(s.key);
    path.dataset.points = JSON.stringify(s.points.map((p) => p.unique_visitors));
    const lg = document.createElement("span");
    lg.innerHTML = '<i style="background:' + color + '"></i>';
    lg.appendChild(document.createTextNode(label(s.key)));
    $("legend").appendChild(lg);
  });
}

function renderTop(keys) {
  const body = $("top-keys").querySelector("tbody");
  body.innerHTML = "";
  keys.forEach((k) => {
    const tr = document.createElement("tr");
    tr.dataset.key = k.key;
    tr.innerHTML = '<td class="key"></td><td class="num"></td><td><button type="button">chart it</button></td>';
    tr.querySelector(".key").textContent = k.key;
    tr.querySelector(".num").textContent = fmt(k.impressions);
    tr.querySelector(".num").dataset.value = k.impressions;
    tr.querySelector("button").onclick = () => addKey(k.key);
    body.appendChild(tr);
  });
}

function addKey(key) {
  key = (key || "").trim();
  const k = key === "" || key === "site-wide" ? null : key;
  if (!state.keys.includes(k)) state.keys.push(k);
  if (k !== null && state.keys.includes(null) && state.keys.length === 2 && state.keys[0] === null) state.keys.shift();
  $("key-search").value = "";
  renderChips();
  refresh();
}

let running = null;
let again = false;  // asked while a refresh was running: run once more after it
async function refresh() {
  if (running) { again = true; return running; }
  running = (async () => {
    try {
      const params = rangeParams();
      const step = stepFor(params);
      const keyParams = state.keys.filter((k) => k !== null);
      const totals = [];
      for (const k of state.keys) {
        totals.push(await api("v1/unique", k === null ? { ...params } : { ...params, key: k }));
      }
      const series = [];
      for (const k of state.keys) {
        series.push(await api("v1/series", { ...params, step, key: k === null ? null : k }));
      }
      const top = await api("v1/keys", { ...params, limit: 15 });
      renderTotals(totals);
      renderChart(series);
      renderTop(top.keys);
      showError("");
      $("status").textContent = "updated " + new Date().toISOString().slice(11, 19) + " UTC; step " + step +
        (keyParams.length ? "" : "; site-wide");
      document.body.dataset.loaded = String(Date.now());
    } catch (e) {
      showError(e.message);
      document.body.dataset.failed = String(Date.now());
    } finally {
      running = null;
      if (again) { again = false; refresh(); }
    }
  })();
  return running;
}

async function suggest() {
  const prefix = $("key-search").value.trim();
  try {
    const r = await api("v1/keys", { prefix, limit: 20, last: "30d" });
    const list = $("key-options");
    list.innerHTML = "";
    r.keys.forEach((k) => { const o = document.createElement("option"); o.value = k.key; list.appendChild(o); });
  } catch (e) { showError(e.message); }
}

function setAuto() {
  if (state.timer) clearInterval(state.timer);
  state.timer = $("auto").checked ? setInterval(refresh, 5000) : null;
}

window.addEventListener("DOMContentLoaded", () => {
  $("api-key").value = apiKey();
  $("api-key").addEventListener("change", (e) => { localStorage.setItem("impressions.apiKey", e.target.value.trim()); refresh(); });
  $("key-search").addEventListener("input", suggest);
  $("key-search").addEventListener("keydown", (e) => { if (e.key === "Enter") addKey(e.target.value); });
  $("add-key").onclick = () => addKey($("key-search").value);
  $("range").onchange = () => { $("custom").hidden = $("range").value !== "custom"; if ($("range").value !== "custom") refresh(); };
  $("start").onchange = $("end").onchange = refresh;
  $("step").onchange = refresh;
  $("refresh").onclick = refresh;
  $("auto").onchange = setAuto;
  renderChips();
  refresh();
});
