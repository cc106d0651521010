// The dashboard: reads /v1/unique, /v1/series, /v1/keys, /v1/reach, /v1/overlap and /v1/rolling
// with a read-scoped API key, and charts with uPlot (vendored beside this file: VENDORED.md).
"use strict";
const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];
const $ = (id) => document.getElementById(id);
const state = { keys: [null], timer: null };
const charts = {};  // the uPlot charts by holder id, each {u, meta}
window.impressions = { charts };  // for a look from the browser's console (and the tests)

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
    const said = body && body.error ? body.error : r.statusText || "HTTP " + r.status;
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
function chosenKeys() { return state.keys.filter((k) => k !== null); }

function rangeParams() {
  const v = $("range").value;
  if (v !== "custom") return { last: v };
  const s = $("start").value, e = $("end").value;
  if (!s) throw new Error("Choose a start time for the custom range.");
  return { start: s + ":00Z", end: e ? e + ":00Z" : null };
}

function rangeText(params) {
  if (params.last) return $("range").selectedOptions[0].textContent;
  return params.start.slice(0, 16).replace("T", " ") + " to " + (params.end ? params.end.slice(0, 16).replace("T", " ") : "now") + " UTC";
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

function fmt(n) { return n === null || n === undefined ? "?" : Number(n).toLocaleString("en-US"); }
function pct(x, digits) { return x === null || x === undefined ? "?" : (100 * x).toFixed(digits === undefined ? 1 : digits) + " %"; }
function utc(t) { return new Date(t * 1000).toISOString().slice(0, 16).replace("T", " "); }

function errText(r) {
  if (r.exact) return "exact";
  const [lo, hi] = r.interval || [];
  const rel = r.relative_error === null || r.relative_error === undefined ? "" : "± " + pct(1.96 * r.relative_error, 2) + " ";
  return rel + "(95 %: " + fmt(lo) + " to " + fmt(hi) + ")";
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

function renderTotals(results) {
  const el = $("totals");
  el.innerHTML = "";
  results.forEach((r) => {
    const d = document.createElement("div");
    d.className = "total";
    d.dataset.key = label(r.key);
    d.innerHTML = '<div class="name"></div><div class="big unique"></div><div class="small err"></div>' +
      '<div class="small">impressions <span class="impressions"></span></div>' +
      '<div class="small when"></div>';
    d.querySelector(".name").textContent = label(r.key);
    d.querySelector(".unique").textContent = fmt(r.unique_visitors);
    d.querySelector(".unique").dataset.value = r.unique_visitors;
    d.querySelector(".err").textContent = errText(r) + (r.partial ? " — partial: some shards did not answer" : "");
    d.querySelector(".impressions").textContent = fmt(r.impressions);
    d.querySelector(".impressions").dataset.value = r.impressions;
    d.querySelector(".when").textContent = utc(r.start) + " to " + utc(r.end) + " UTC";
    el.appendChild(d);
  });
}

// ---- charts (uPlot) ----
// A chart draws lines, each {label, color, points: [{x, span: [start, end], y, lo, hi, open}]}:
// the line, its 95 % interval as a band, and its open points (a step or window still filling)
// as hollow markers labelled "in progress", off the line.  Series per line: value, low, high.

function rgba(hex, a) {
  const n = parseInt(hex.slice(1), 16);
  return "rgba(" + (n >> 16) + "," + ((n >> 8) & 255) + "," + (n & 255) + "," + a + ")";
}

function chartMeta(lines) {
  const xs = [...new Set(lines.flatMap((l) => l.points.map((p) => p.x)))].sort((a, b) => a - b);
  const spans = new Map(lines.flatMap((l) => l.points.map((p) => [p.x, p.span])));
  const data = [xs];
  const metaLines = lines.map((l) => {
    const at = new Map(l.points.map((p) => [p.x, p]));
    const col = (f) => xs.map((x) => (at.has(x) ? f(at.get(x)) : null));
    const open = col((p) => !!p.open);
    let solid = xs.length;  // the line stops before the run of open points at the end
    while (solid > 0 && open[solid - 1]) solid--;
    data.push(col((p) => p.y), col((p) => (p.open ? null : p.lo)), col((p) => (p.open ? null : p.hi)));
    return { label: l.label, color: l.color, open, solid, openIdx: open.flatMap((o, i) => (o && i >= solid ? [i] : [])) };
  });
  return { signature: lines.map((l) => l.label + l.color).join("|"), spans: xs.map((x) => spans.get(x)), lines: metaLines, data };
}

function lineSeries(chart, li, line) {
  const linear = uPlot.paths.linear();
  const meta = () => chart.meta.lines[li];
  const value = (u, v, si, i) => {
    if (v === null || v === undefined) return "–";
    const lo = u.data[si + 1][i], hi = u.data[si + 2][i];
    if (meta().open[i]) return fmt(v) + " so far (in progress)";
    return fmt(v) + (lo !== null && hi !== null && (lo !== v || hi !== v) ? " (95 %: " + fmt(lo) + " to " + fmt(hi) + ")" : "");
  };
  const solid = (u, si, i0, i1) => {  // the line up to the last point that is not open
    const end = Math.min(i1, meta().solid - 1);
    return end < i0 ? null : linear(u, si, i0, end);
  };
  const edge = (name) => ({ label: line.label + " " + name, class: "band-edge", stroke: rgba(line.color, 0.35), width: 0.5,
    points: { show: false } });
  return [
    { label: line.label, class: "series", stroke: line.color, width: 2, value,
      paths: solid,
      points: { show: false, filter: () => (meta().openIdx.length ? meta().openIdx : null), size: 9, width: 2, fill: "#fff" } },
    edge("95 % low"), edge("95 % high"),
  ];
}

function drawInProgress(u, chart) {
  const ctx = u.ctx, pr = uPlot.pxRatio;
  chart.meta.lines.forEach((line, li) => {
    const si = 1 + 3 * li;
    if (!u.series[si].show) return;
    line.openIdx.forEach((i) => {
      const v = u.data[si][i];
      if (v === null || v === undefined) return;
      const x = u.valToPos(u.data[0][i], "x", true), y = u.valToPos(v, "y", true);
      ctx.save();
      ctx.font = 11 * pr + "px system-ui, sans-serif";
      ctx.fillStyle = line.color;
      ctx.textAlign = "right";
      ctx.textBaseline = "bottom";
      ctx.fillText("in progress", x - 8 * pr, y - 6 * pr);
      ctx.restore();
    });
  });
}

function chartSize(holder) { return { width: Math.max(300, holder.clientWidth - 2), height: holder.dataset.height ? +holder.dataset.height : 300 }; }

function chartOptions(holder, chart, meta, xLabel) {
  const series = [{ label: xLabel.legend, value: (u, v, si, i) => {
    const s = i === null || i === undefined ? null : chart.meta.spans[i];
    return s ? utc(s[0]) + " to " + utc(s[1]).slice(11) + " UTC" : "–";
  } }];
  meta.lines.forEach((line, li) => series.push(...lineSeries(chart, li, line)));
  return {
    ...chartSize(holder),
    series,
    bands: meta.lines.map((line, li) => ({ series: [3 + 3 * li, 2 + 3 * li], fill: rgba(line.color, 0.18) })),
    tzDate: (ts) => uPlot.tzDate(new Date(ts * 1e3), "Etc/UTC"),
    scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(1, max) * 1.08] } },
    axes: [
      { label: xLabel.axis, labelSize: 22, stroke: "#555", grid: { stroke: "#eee" } },
      { label: "unique visitors", labelSize: 22, stroke: "#555", grid: { stroke: "#eee" },
        values: (u, splits) => splits.map((v) => (Number.isInteger(v) ? fmt(v) : "")),  // visitors are whole
        size: (u, values) => (values ? Math.max(50, 20 + 7.5 * Math.max(...values.map((s) => String(s).length))) : 50) },
    ],
    cursor: { points: { size: 8 } },
    legend: { live: true },
    hooks: {
      draw: [(u) => drawInProgress(u, chart)],
      setSeries: [(u, si, opts) => {  // a line hidden from the legend hides its band too
        if (!opts || !("show" in opts) || (si - 1) % 3 !== 0) return;
        u.setSeries(si + 1, { show: opts.show });
        u.setSeries(si + 2, { show: opts.show });
      }],
    },
  };
}

function plot(holderId, lines, xLabel) {
  const holder = $(holderId);
  const meta = chartMeta(lines);
  let chart = charts[holderId];
  holder.hidden = false;
  if (!meta.data[0].length) {
    clearChart(holderId);
    holder.textContent = "No data in this range.";
    holder.classList.add("nodata");
    return;
  }
  holder.classList.remove("nodata");
  if (chart && chart.meta.signature === meta.signature) {
    chart.meta = meta;
    chart.u.setData(meta.data);
  } else {
    clearChart(holderId);
    holder.textContent = "";
    chart = charts[holderId] = { meta };
    chart.u = new uPlot(chartOptions(holder, chart, meta, xLabel), meta.data, holder);
  }
  markLegend(chart);
}

function markLegend(chart) {  // the legend rows name their key (for a look at the page, and the tests)
  const rows = chart.u.root.querySelectorAll(".u-legend tr.u-series");
  chart.meta.lines.forEach((line, li) => {
    const row = rows[1 + 3 * li];
    if (!row) return;
    row.dataset.key = line.label;
    row.dataset.points = JSON.stringify(chart.meta.data[1 + 3 * li]);
    row.dataset.inProgress = String(line.openIdx.length);
  });
}

function clearChart(holderId) {
  if (charts[holderId]) { charts[holderId].u.destroy(); delete charts[holderId]; }
}

function renderChart(series) {
  const now = Date.now() / 1000;
  const lines = series.map((s, i) => ({
    label: label(s.key), color: COLORS[i % COLORS.length],
    points: s.points.map((p, j) => ({ x: (p.start + p.end) / 2, span: [p.start, p.end], y: p.unique_visitors,
      lo: p.interval[0], hi: p.interval[1], open: j === s.points.length - 1 && p.end > now })),
  }));
  plot("chart", lines, { axis: "time (UTC)", legend: "step" });
  const open = lines.some((l) => l.points.length && l.points[l.points.length - 1].open);
  $("chart-note").hidden = !lines.some((l) => l.points.length);
  $("chart-note").textContent = "The shaded band around a line is the 95 % interval of each estimate (none where " +
    "counted exactly). Hover the chart for the values of a step." + (open ? " The last step has not ended yet: its " +
    "count so far is the hollow point marked \u201cin progress\u201d, not part of the line." : "");
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

// ---- views: each loads on its own, shows its own error, and marks data-loaded / data-failed ----

const seqs = {};
async function loadView(id, load) {
  const view = $(id);
  const seq = (seqs[id] = (seqs[id] || 0) + 1);
  try {
    const done = await load(view);
    if (seq !== seqs[id]) return;  // a newer load started meanwhile: its answer counts
    done();
    viewError(view, "");
    view.dataset.loaded = String(Date.now());
  } catch (e) {
    if (seq !== seqs[id]) return;
    viewError(view, e.message || String(e));
    view.dataset.failed = String(Date.now());
  }
}

function viewError(view, msg) {
  const el = view.querySelector(".view-error");
  el.textContent = msg || "";
  el.hidden = !msg;
  if (msg) { const r = view.querySelector(".result"); if (r) r.hidden = true; }
}

function showEmpty(view, msg) {
  const el = view.querySelector(".empty");
  el.textContent = msg || "";
  el.hidden = !msg;
  view.querySelector(".result").hidden = !!msg;
}

function setText(view, sel, text, value) {
  const el = view.querySelector(sel);
  el.textContent = text;
  if (value !== undefined) el.dataset.value = value === null ? "" : value;
}

function loadReach(params) {
  return loadView("reach", async (view) => {
    const keys = chosenKeys(), prefix = $("reach-prefix").value.trim() || null;
    const shown = () => { view.dataset.keys = keys.join(","); view.dataset.prefix = prefix || ""; };
    if (!keys.length && !prefix) {
      return () => { shown(); showEmpty(view, "Add keys above (or give a prefix) to see how many visitors they reached together."); };
    }
    const r = await api("v1/reach", { ...params, key: keys, prefix });
    return () => {
      shown();
      showEmpty(view, "");
      setText(view, ".unique", fmt(r.unique_visitors), r.unique_visitors);
      setText(view, ".err", errText(r) + (r.partial ? " — partial: some shards did not answer" : ""));
      setText(view, ".impressions", fmt(r.impressions), r.impressions);
      setText(view, ".frequency", r.frequency === null ? "–" : r.frequency.toFixed(2), r.frequency);
      const what = [keys.join(" + "), prefix ? "keys starting with \u201c" + prefix + "\u201d" : ""].filter(Boolean).join(" and ");
      setText(view, ".scope", what + " (" + fmt(r.keys) + (r.keys === 1 ? " key" : " keys") + " with data), " +
        utc(r.start) + " to " + utc(r.end) + " UTC");
    };
  });
}

function selection(side) {
  const keys = $(side + "-keys").value.split(",").map((s) => s.trim()).filter(Boolean);
  const prefix = $(side + "-prefix").value.trim() || null;
  return { keys, prefix };
}

function loadOverlap(params) {
  return loadView("overlap", async (view) => {
    const a = selection("a"), b = selection("b");
    const shown = () => { view.dataset.query = JSON.stringify({ a, b }); };
    if ((!a.keys.length && !a.prefix) || (!b.keys.length && !b.prefix)) {
      return () => { shown(); showEmpty(view, "Give each selection keys or a prefix, then compare."); };
    }
    const r = await api("v1/overlap", { ...params, a: a.keys, b: b.keys, a_prefix: a.prefix, b_prefix: b.prefix });
    return () => { shown(); showEmpty(view, ""); renderOverlap(view, r); };
  });
}

function renderOverlap(view, r) {
  const both = r.both;
  const note = view.querySelector(".note");
  note.textContent = r.note || "";
  note.hidden = !r.note;
  note.classList.toggle("warn", !r.distinguishable);
  view.dataset.distinguishable = String(r.distinguishable);
  setText(view, ".both", fmt(both.unique_visitors), both.unique_visitors);
  setText(view, ".both-err", "95 %: " + fmt(both.interval[0]) + " to " + fmt(both.interval[1]) +
    " · method: " + both.method + (r.partial ? " — partial: some shards did not answer" : ""));
  const ji = r.jaccard_interval || [];
  setText(view, ".jaccard", r.jaccard.toFixed(4) + " (95 %: " + (ji[0] ?? 0).toFixed(4) + " to " + (ji[1] ?? 0).toFixed(4) + ")", r.jaccard);
  setText(view, ".share-a", pct(r.share_of_a), r.share_of_a);
  setText(view, ".share-b", pct(r.share_of_b), r.share_of_b);
  setText(view, ".only-a", fmt(r.a.unique_visitors) + " " + errText(r.a), r.a.unique_visitors);
  setText(view, ".only-b", fmt(r.b.unique_visitors) + " " + errText(r.b), r.b.unique_visitors);
  setText(view, ".union", fmt(r.union.unique_visitors) + " " + errText(r.union), r.union.unique_visitors);
  drawBars(view, r);
}

function drawBars(view, r) {  // A and B on one scale (A or B), overlapping by the visitors of both
  const u = Math.max(1, r.union.unique_visitors, r.a.unique_visitors, r.b.unique_visitors);
  const a = r.a.unique_visitors / u, b = r.b.unique_visitors / u;
  const both = Math.min(r.both.unique_visitors / u, a, b);
  const bStart = Math.min(Math.max(0, a - both), 1 - b);
  const barA = view.querySelector(".bar.a"), barB = view.querySelector(".bar.b");
  barA.style.left = "0%";
  barA.style.width = (100 * a).toFixed(2) + "%";
  barB.style.left = (100 * bStart).toFixed(2) + "%";
  barB.style.width = (100 * b).toFixed(2) + "%";
}

function rollingParams() {
  const cumulative = $("rolling-cumulative").checked;
  $("rolling-window").disabled = cumulative;
  return { step: $("rolling-step").value, ...(cumulative ? { cumulative: "true" } : { window: $("rolling-window").value }) };
}

function loadRolling(params) {
  return loadView("rolling", async (view) => {
    const keys = chosenKeys(), q = rollingParams();
    setText(view, ".scope", keys.length ? (keys.length > 1 ? keys.join(" + ") + " as one set" : keys[0]) : "site-wide");
    let r;
    try {
      r = await api("v1/rolling", { ...params, ...q, key: keys.length ? keys : null });
    } catch (e) {
      clearChart("rolling-chart");
      $("rolling-chart").textContent = "";
      $("rolling-chart").hidden = true;  // the message says why there is no chart
      throw e;
    }
    return () => {
      view.dataset.query = JSON.stringify({ keys, ...q });
      const name = (keys.length ? keys.join(" + ") : "site-wide") + (r.cumulative ? " (since the start)" : " (trailing window)");
      plot("rolling-chart", [{ label: name, color: COLORS[0], points: r.points.map((p) => ({ x: p.end, span: [p.start, p.end],
        y: p.unique_visitors, lo: p.interval[0], hi: p.interval[1], open: !p.complete })) }],
      { axis: "window end (UTC)", legend: "window" });
    };
  });
}

function loadViews(params) {
  return Promise.all([loadReach(params), loadOverlap(params), loadRolling(params)]);
}

function withRange(load) {  // a view's own control: reload that view alone
  return () => {
    let params;
    try { params = rangeParams(); } catch (e) { showError(e.message); return; }
    load(params);
  };
}

let running = null;
let again = false;  // asked while a refresh was running: run once more after it
async function refresh() {
  if (running) { again = true; return running; }
  running = (async () => {
    let params = null;
    try {
      params = rangeParams();
      const step = stepFor(params);
      const keyParams = chosenKeys();
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
        (keyParams.length ? "" : "; site-wide") + "; " + rangeText(params);
      document.body.dataset.loaded = String(Date.now());
    } catch (e) {
      showError(e.message);
      document.body.dataset.failed = String(Date.now());
    }
    try {
      if (params) await loadViews(params);
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

function resizeCharts() {
  for (const [id, c] of Object.entries(charts)) c.u.setSize(chartSize($(id)));
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
  $("reach-prefix").addEventListener("change", withRange(loadReach));
  $("compare").onclick = withRange(loadOverlap);
  for (const side of ["a", "b"]) {
    $(side + "-chosen").onclick = () => { $(side + "-keys").value = chosenKeys().join(", "); };
    for (const f of ["-keys", "-prefix"]) {
      $(side + f).addEventListener("keydown", (e) => { if (e.key === "Enter") withRange(loadOverlap)(); });
    }
  }
  for (const id of ["rolling-window", "rolling-step", "rolling-cumulative"]) $(id).onchange = withRange(loadRolling);
  window.addEventListener("resize", resizeCharts);
  rollingParams();
  renderChips();
  refresh();
});
