// tunesmith ui: one page, five views, drawn from the server's JSON. Every value from the server is inserted as
// text (textContent / text nodes), never as HTML, so run names or metric values holding markup stay inert.
"use strict";

const state = { runs: [], columns: [], selected: new Set(), sort: { key: "name", dir: 1 }, filter: "",
                compareIds: [], compare: null, view: "runs" };
const charts = {};
window.tunesmith = { state, charts };  // read by the browser test (chart data, series counts)

const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"];

// ------------------------------------------------------------------------------------------------ helpers
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "dataset") Object.assign(node.dataset, v);
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function fmt(value) {
  if (value === null || value === undefined) return "-";
  if (typeof value === "number") return Number.isInteger(value) ? String(value) : value.toPrecision(5);
  if (typeof value === "object") return JSON.stringify(value);
  return String(value);
}

function say(text) { document.getElementById("message").textContent = text || ""; }

function key() { return sessionStorage.getItem("tunesmith-admin-key") || ""; }

async function api(path, options) {
  const headers = { "Accept": "application/json" };
  if (key()) headers["Authorization"] = "Bearer " + key();
  if (options && options.body) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { ...(options || {}), headers });
  const body = await response.json().catch(() => ({ error: response.statusText }));
  if (!response.ok) throw new Error(body.error || (body.detail && JSON.stringify(body.detail)) || response.statusText);
  return body;
}

function qs(params) {
  const search = new URLSearchParams();
  for (const [k, v] of params) search.append(k, v);
  return search.toString();
}

const tickets = {};
async function latest(name, promise) {
  // Only the newest request of each kind may draw: an older answer arriving late is dropped.
  const ticket = (tickets[name] = (tickets[name] || 0) + 1);
  const value = await promise;
  return ticket === tickets[name] ? value : null;
}

function fillSelect(select, options, keep, defaultIndex) {
  const signature = JSON.stringify(options);
  if (select.dataset.options === signature) return;  // unchanged: leave the DOM (and an open dropdown) alone
  select.dataset.options = signature;
  const current = keep ? select.value : null;
  select.replaceChildren(...options.map(([value, label]) => el("option", { value }, label)));
  if (current && options.some(([v]) => v === current)) select.value = current;
  else if (defaultIndex && options.length > defaultIndex) select.selectedIndex = defaultIndex;
}

// -------------------------------------------------------------------------------------------------- runs
const FIXED = [["name", "run"], ["version", "version"], ["aliases", "aliases"], ["method", "method"],
               ["base_model", "base model"], ["data_hash", "data"], ["status", "status"]];

function cellValue(run, keyName) {
  if (keyName.startsWith("m:")) return run.headline[keyName.slice(2)];
  if (keyName === "aliases") return run.aliases.join(",");
  if (keyName === "data_hash") return run.data_hash ? run.data_hash.replace("sha256:", "").slice(0, 12) : null;
  return run[keyName];
}

function compareValues(a, b) {
  if (a === b) return 0;
  if (a === null || a === undefined || a === "") return 1;
  if (b === null || b === undefined || b === "") return -1;
  if (typeof a === "number" && typeof b === "number") return a - b;
  if (typeof a === "number" || typeof b === "number") return typeof a === "number" ? -1 : 1;  // numbers first
  return String(a).localeCompare(String(b), undefined, { numeric: true });
}

function renderRuns() {
  const table = document.getElementById("runs-table");
  const columns = [["select", ""], ...FIXED, ...state.columns.map((c) => ["m:" + c, c])];
  table.tHead.replaceChildren(el("tr", {}, columns.map(([k, label]) => el("th", {
    dataset: { key: k },
    onclick: () => { if (k === "select") return; state.sort = { key: k, dir: state.sort.key === k ? -state.sort.dir : 1 }; renderRuns(); },
  }, label + (state.sort.key === k ? (state.sort.dir > 0 ? " ▲" : " ▼") : "")))));
  const needle = state.filter.trim().toLowerCase();
  const rows = state.runs.filter((run) => !needle || columns.some(([k]) => k !== "select" &&
    fmt(cellValue(run, k)).toLowerCase().includes(needle)));
  rows.sort((a, b) => state.sort.dir * compareValues(cellValue(a, state.sort.key), cellValue(b, state.sort.key)));
  table.tBodies[0].replaceChildren(...rows.map((run) => el("tr", { class: run.live ? "live" : "", dataset: { id: run.id } },
    el("td", {}, el("input", { type: "checkbox", class: "pick", checked: state.selected.has(run.id), "aria-label": "select " + run.id,
      onchange: (e) => { e.target.checked ? state.selected.add(run.id) : state.selected.delete(run.id); } })),
    FIXED.map(([k]) => el("td", { class: k === "status" ? "status-" + run.status : "", title: k === "data_hash" ? run.data_hash : null },
      fmt(cellValue(run, k)) + (k === "name" && !run.registered ? " (unregistered)" : ""))),
    state.columns.map((c) => el("td", { class: typeof run.headline[c] === "number" ? "num" : "" }, fmt(run.headline[c]))))));
  const live = state.runs.filter((r) => r.live).length;
  document.getElementById("live-note").textContent = live ? `${live} run(s) training: updating every 2 s` : "";
}

async function loadRuns() {
  const data = await latest("runs", api("/api/runs"));
  if (!data) return null;
  const signature = JSON.stringify(data);
  if (signature === state.runsSignature) return data;  // a poll that found nothing new redraws nothing
  state.runsSignature = signature;
  state.runs = data.runs;
  state.columns = data.metric_columns;
  renderRuns();
  const all = state.runs.map((r) => [r.id, r.id + (r.registered ? "" : " (unregistered)")]);
  const withEval = state.runs.filter((r) => Object.keys(r.headline).some((k) => k.includes("."))).map((r) => [r.id, r.id]);
  const registered = state.runs.filter((r) => r.registered).map((r) => [r.id, r.id]);
  fillSelect(document.getElementById("ex-a"), withEval.length ? withEval : all, true);
  fillSelect(document.getElementById("ex-b"), withEval.length ? withEval : all, true, 1);
  fillSelect(document.getElementById("data-run"), all, true);
  fillSelect(document.getElementById("promote-ref"), registered, true);
  fillSelect(document.getElementById("archive-ref"), registered, true);
  return data;
}

// ----------------------------------------------------------------------------------------------- compare
function aligned(seriesList) {
  // uPlot wants one shared x array: join each (x, y) table, leaving nulls where a series has no point.
  const tables = seriesList.map((s) => [s.x, s.y]);
  return tables.length ? uPlot.join(tables) : [[]];
}

function drawChart(target, name, seriesList, yLabel, logY) {
  const node = document.getElementById(target);
  if (charts[name]) { charts[name].destroy(); delete charts[name]; }
  node.replaceChildren();
  const drawn = seriesList.filter((s) => s.x.length > 0);
  node.dataset.series = String(drawn.length);
  node.dataset.labels = JSON.stringify(drawn.map((s) => s.label));
  if (!drawn.length) { node.append(el("p", { class: "muted" }, "no points to draw")); return; }
  const positive = drawn.every((s) => s.y.every((v) => v > 0));
  if (logY && !positive) say("log y needs positive values: drawn on a linear axis");
  const opts = {
    width: Math.min(1000, Math.max(600, node.parentElement.clientWidth - 40)), height: 300,
    scales: { x: { time: false }, y: logY && positive ? { distr: 3 } : {} },
    axes: [{ label: document.getElementById("x-axis").value }, { label: yLabel, size: 70 }],
    series: [{ label: document.getElementById("x-axis").value },
             ...drawn.map((s) => ({ label: s.label, stroke: s.color, width: s.dash ? 2 : 1.5, dash: s.dash,
                                    spanGaps: true, points: { show: s.points } }))],
  };
  charts[name] = new uPlot(opts, aligned(drawn), node);
}

function renderCompare() {
  const data = state.compare;
  if (!data) return;
  const logY = document.getElementById("log-y").checked;
  const loss = [], lr = [];
  data.runs.forEach((run, i) => {
    const color = COLORS[i % COLORS.length];
    const s = run.series;
    loss.push({ label: `${run.label} train loss`, x: s.train_loss.x, y: s.train_loss.y, color, points: false });
    loss.push({ label: `${run.label} eval loss`, x: s.eval_loss.x, y: s.eval_loss.y, color, dash: [6, 4], points: true });
    lr.push({ label: `${run.label} lr`, x: s.lr.x, y: s.lr.y, color, points: false });
  });
  drawChart("loss-chart", "loss", loss, "loss", logY);
  drawChart("lr-chart", "lr", lr, "learning rate", false);
  document.getElementById("compare-runs").textContent = data.runs.map((r) => r.label).join("  vs  ");

  document.getElementById("diagnoses").replaceChildren(...data.diagnoses.map((d) => el("div", { class: "diag" },
    el("b", {}, d.id), fmt(d.diagnosis), d.best_step !== null && d.best_step !== undefined ? ` (best eval step ${d.best_step})` : "",
    d.computed_by ? el("span", { class: "muted" }, ` [${d.computed_by}]`) : "",
    el("ul", {}, (d.advice || []).map((a) => el("li", {}, a))))));

  const m = data.metrics;
  document.getElementById("metrics-table").replaceChildren(
    el("tr", {}, el("th", {}, "model"), el("th", {}, "from"), m.columns.map((c) => el("th", {}, c))),
    ...m.rows.map((r) => el("tr", { class: r.kind }, el("td", {}, r.model), el("td", {}, r.source),
      m.columns.map((c) => el("td", { class: "num" }, fmt(r.metrics[c]))))));

  const f = data.forgetting;
  const fcols = [...new Set(f.flatMap((r) => Object.keys(r.measures)))];
  document.getElementById("forgetting-table").replaceChildren(...(f.length ? [
    el("tr", {}, el("th", {}, "model"), fcols.map((c) => el("th", {}, c))),
    ...f.map((r) => el("tr", {}, el("td", {}, r.model), fcols.map((c) => el("td", { class: "num" }, fmt(r.measures[c])))))]
    : [el("tr", {}, el("td", { class: "muted" }, "no forgetting measures recorded (tunesmith eval --forgetting, or eval.forgetting while training)"))]));

  const cfg = data.config;
  document.getElementById("config-table").replaceChildren(
    el("tr", {}, el("th", {}, "key"), cfg.labels.map((l) => el("th", {}, l))),
    ...(cfg.differences.length ? cfg.differences.map((d) => el("tr", {}, el("td", {}, d.key), d.values.map((v) => el("td", {}, fmt(v)))))
      : [el("tr", {}, el("td", { colspan: cfg.labels.length + 1, class: "muted" }, "identical configs"))]));
}

async function loadCompare() {
  if (state.compareIds.length < 2) { say("select two or more runs in the Runs view, then Compare selected"); return; }
  const x = document.getElementById("x-axis").value;
  const data = await latest("compare", api("/api/compare?" + qs([...state.compareIds.map((id) => ["id", id]), ["x", x]])));
  if (!data) return;
  state.compare = data;
  renderCompare();
}

// ---------------------------------------------------------------------------------------------- examples
function turns(prompt) {
  return (prompt || []).map((m) => el("div", {}, el("b", {}, m.role + ": "), m.content));
}

function scores(s) { return Object.entries(s || {}).map(([k, v]) => `${k}=${fmt(v)}`).join("  "); }

async function loadExamples(split) {
  const a = document.getElementById("ex-a").value, b = document.getElementById("ex-b").value;
  if (!a || !b || a === b) { say("choose two different runs"); return; }
  const params = [["a", a], ["b", b]];
  if (split) params.push(["split", split]);
  const data = await latest("examples", api("/api/examples?" + qs(params)));
  if (!data) return;
  fillSelect(document.getElementById("ex-split"), data.splits.map((s) => [s, s]), false);
  document.getElementById("ex-split").value = data.split;
  document.getElementById("ex-summary").textContent =
    `${data.differing_count} of ${data.common} shared test items differ (split ${data.split}; ${data.a}: ${data.n_a} items, ` +
    `${data.b}: ${data.n_b}); showing ${data.shown}`;
  document.getElementById("ex-list").replaceChildren(...data.differing.map((d) => el("div", { class: "example" },
    el("div", { class: "muted" }, `${d.source_file || ""}:${d.line ?? ""} (item ${d.index_a})`),
    el("h3", {}, "input"), el("div", { class: "input" }, turns(d.prompt)),
    el("h3", {}, "reference"), el("pre", { class: "reference" }, d.reference),
    el("div", { class: "pair" },
      el("div", {}, el("h3", {}, data.a), el("pre", { class: "output-a" }, d.a.prediction === "" ? "(empty output)" : d.a.prediction), el("div", { class: "muted" }, scores(d.a.scores))),
      el("div", {}, el("h3", {}, data.b), el("pre", { class: "output-b" }, d.b.prediction === "" ? "(empty output)" : d.b.prediction), el("div", { class: "muted" }, scores(d.b.scores)))))));
}

// -------------------------------------------------------------------------------------------------- data
function kvTable(rows, head) {
  return el("table", { class: "grid" }, head ? el("tr", {}, head.map((h) => el("th", {}, h))) : null,
    rows.map((r) => el("tr", {}, r.map((c) => el("td", { class: typeof c === "number" ? "num" : "" }, fmt(c))))));
}

function barChart(node, name, xs, ys, label) {
  if (charts[name]) { charts[name].destroy(); delete charts[name]; }
  charts[name] = new uPlot({ width: 600, height: 220, scales: { x: { time: false } },
    series: [{ label: "x" }, { label, stroke: "#1f77b4", fill: "#1f77b455", paths: uPlot.paths.bars({ size: [0.8] }), points: { show: false } }] },
    [xs, ys], node);
}

async function loadData() {
  const id = document.getElementById("data-run").value;
  if (!id) return;
  const d = await latest("data", api("/api/data?" + qs([["id", id]])));
  if (!d) return;
  const body = document.getElementById("data-body");
  const parts = [el("p", {}, `snapshot hash ${d.hash || "-"}`)];
  parts.push(el("h2", {}, "Files"), kvTable(d.files.map((f) => [f.path || f, f.split || "", f.records ?? ""]), ["file", "split", "records"]));
  if (Object.keys(d.records).length) parts.push(el("h2", {}, "Records used"), kvTable(Object.entries(d.records)));
  if (d.render) {
    const cols = [...new Set(Object.values(d.render).flatMap((r) => Object.keys(r).filter((k) => !Array.isArray(r[k]))))];
    parts.push(el("h2", {}, "Rendering (truncation)"), kvTable(Object.entries(d.render).map(([s, r]) => [s, ...cols.map((c) => r[c])]), ["split", ...cols]));
  }
  if (d.mixture) {
    parts.push(el("h2", {}, `Realised mixture (${fmt(d.mixture.total)} records, seed ${fmt(d.mixture.seed)})`),
      kvTable(d.mixture.tasks.map((t) => [t.task, ...d.mixture.columns.map((c) => t[c])]), ["task", ...d.mixture.columns]),
      el("p", { class: "muted" }, `sampling: ${fmt(d.mixture.sampling)}`));
    if (Object.keys(d.mixture.replayed_from).length) {
      parts.push(kvTable(Object.entries(d.mixture.replayed_from), ["replayed from", "records"]));
    }
  }
  if (!d.prepared) {
    parts.push(el("p", { class: "muted" }, "this run did not prepare its data (data.prepare: false): no quarantine, PII or cluster report"));
  } else {
    parts.push(el("h2", {}, "Counts"), kvTable(d.counts.map((c) => [c.count, c.records]), ["count", "records"]));
    if (d.identity) parts.push(el("p", { class: "identity" }, `identity ${d.identity.holds ? "holds" : "BROKEN"}: ${d.identity.formula}`));
    parts.push(el("h2", {}, "Quarantine reasons"), Object.keys(d.quarantine_reasons).length
      ? kvTable(Object.entries(d.quarantine_reasons), ["reason", "records"]) : el("p", { class: "muted" }, "none"));
    parts.push(el("h2", {}, `PII (mode ${d.pii_mode})`), Object.keys(d.pii).length
      ? kvTable(Object.entries(d.pii), ["kind", "count"]) : el("p", { class: "muted" }, "none found"));
    const lengths = d.lengths || {}, before = lengths.before_trim || {};
    parts.push(el("h2", {}, "Lengths"), el("p", {}, `unit: ${lengths.unit}; min ${fmt(before.min)}, mean ${fmt(before.mean)}, ` +
      `p50 ${fmt(before.p50)}, p90 ${fmt(before.p90)}, p99 ${fmt(before.p99)}, max ${fmt(before.max)}; trim limit ${fmt(lengths.trim_limit)}`));
    const hist = el("div", { id: "length-chart", class: "chart" });
    parts.push(hist);
    const clusters = d.clusters || {};
    parts.push(el("h2", {}, "Clusters"), el("p", {}, `${fmt(clusters.clusters)} clusters (${fmt(clusters.embedder)}); largest share ` +
      `${fmt(clusters.largest_share)}; near-empty: ${fmt(clusters.near_empty)}; leakage pairs: ${fmt(d.leakage_pairs)}`));
    const cchart = el("div", { id: "cluster-chart", class: "chart" });
    parts.push(cchart, el("ul", {}, (clusters.examples || []).map((e, i) => el("li", {}, `cluster ${i}: ${e}`))));
    body.replaceChildren(...parts);
    if (before.histogram) barChart(hist, "lengths", before.histogram.edges.slice(0, -1), before.histogram.counts, "records");
    if (clusters.sizes) barChart(cchart, "clusters", clusters.sizes.map((_, i) => i), clusters.sizes, "records");
    return;
  }
  body.replaceChildren(...parts);
}

// ---------------------------------------------------------------------------------------------- registry
async function loadAliases() {
  const data = await api("/api/aliases");
  const blocks = data.aliases.map((a) => el("div", {},
    el("h2", {}, `${a.alias} → ${a.ref} (revision ${a.revision})`),
    kvTable(a.history.map((e) => [e.revision, e.action, e.ref, e.previous || "-", e.at]),
            ["revision", "action", "run", "previous", "at"])));
  document.getElementById("aliases").replaceChildren(...(blocks.length ? blocks : [el("p", { class: "muted" }, "no aliases yet")]));
}

async function action(path, body) {
  const out = document.getElementById("action-result");
  try {
    const result = await api(path, { method: "POST", body: JSON.stringify(body) });
    out.className = "ok";
    out.textContent = result.alias ? `${result.alias} → ${result.ref} (revision ${result.revision})` : `${result.ref}: ${result.status}`;
  } catch (err) {
    out.className = "err";
    out.textContent = "refused: " + err.message;
  }
  await Promise.all([loadAliases(), loadRuns()]).catch((err) => say(err.message));
}

// ------------------------------------------------------------------------------------------------ router
async function show(view) {
  state.view = view;
  for (const name of ["runs", "compare", "examples", "data", "registry"]) {
    document.getElementById("view-" + name).hidden = name !== view;
  }
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.dataset.view === view));
  say("");
  try {
    if (!state.runs.length) await loadRuns();
    if (view === "compare") await loadCompare();
    if (view === "examples") await loadExamples();
    if (view === "data") await loadData();
    if (view === "registry") await loadAliases();
  } catch (err) { say(err.message); }
}

function route() {
  // #view or #compare?id=A&id=B (a comparison is a link that can be kept or shared)
  const [view, query] = (location.hash || "#runs").slice(1).split("?");
  const ids = new URLSearchParams(query || "").getAll("id");
  if (view === "compare" && ids.length) state.compareIds = ids;
  show(view || "runs");
}

async function poll() {
  // Live runs: metrics.jsonl grows while they train; re-read the table, and the curves of a live comparison.
  if (document.hidden) return;
  try {
    if (state.view === "runs" || state.runs.some((r) => r.live)) await loadRuns();
    if (state.view === "compare" && state.compare && state.compare.runs.some((r) => r.live)) await loadCompare();
  } catch (err) { say(err.message); }
}

document.addEventListener("DOMContentLoaded", () => {
  const keyInput = document.getElementById("admin-key");
  keyInput.value = key();
  keyInput.addEventListener("input", () => sessionStorage.setItem("tunesmith-admin-key", keyInput.value));
  document.getElementById("filter").addEventListener("input", (e) => { state.filter = e.target.value; renderRuns(); });
  document.getElementById("compare-selected").addEventListener("click", () => {
    location.hash = "#compare?" + qs([...state.selected].map((id) => ["id", id]));
  });
  document.getElementById("examples-selected").addEventListener("click", () => {
    const [a, b] = [...state.selected];
    if (a && b) { document.getElementById("ex-a").value = a; document.getElementById("ex-b").value = b; }
    location.hash = "#examples";
  });
  document.getElementById("x-axis").addEventListener("change", () => loadCompare().catch((e) => say(e.message)));
  document.getElementById("log-y").addEventListener("change", renderCompare);
  document.getElementById("ex-show").addEventListener("click", () => loadExamples().catch((e) => say(e.message)));
  document.getElementById("ex-split").addEventListener("change", (e) => loadExamples(e.target.value).catch((err) => say(err.message)));
  document.getElementById("data-run").addEventListener("change", () => loadData().catch((e) => say(e.message)));
  document.getElementById("promote-form").addEventListener("submit", (e) => { e.preventDefault();
    action("/api/admin/promote", { ref: document.getElementById("promote-ref").value, alias: document.getElementById("promote-alias").value }); });
  document.getElementById("rollback-form").addEventListener("submit", (e) => { e.preventDefault();
    action("/api/admin/rollback", { alias: document.getElementById("rollback-alias").value }); });
  document.getElementById("archive-form").addEventListener("submit", (e) => { e.preventDefault();
    action("/api/admin/archive", { ref: document.getElementById("archive-ref").value, restore: document.getElementById("archive-restore").checked }); });
  window.addEventListener("hashchange", route);
  route();
  setInterval(poll, 2000);
});
