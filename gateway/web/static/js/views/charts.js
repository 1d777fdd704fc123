// Charts: events per second of each pipeline (from the stats tick) and the values of a node's
// keys: each key's series starts from the stored history (GET /api/history, the last ten
// minutes) and goes on with the live points of the node's event tap. Drawn with the vendored
// uPlot, loaded only on this page.
import { get, h } from "../api.js";
import { on, subscribe, tapPicker } from "../live.js";

const KEEP = 600; // points per series: ten minutes at one per second
const COLORS = ["#0b6e99", "#cf222e", "#1a7f37", "#9a6700", "#8250df", "#bf3989", "#0550ae", "#57606a", "#953800", "#116329",
  "#e16f24", "#1f883d", "#6639ba", "#d1242f", "#0969da", "#7d4e00"];
let loading = null;

// Each series' colour from its name, so that a key keeps its colour from one load to the next:
// a hash of the name picks a palette slot; two names on the same slot go, in name order, to the
// next free one (so the result depends on the set of names, never on their arrival order).
export function colors(names) {
  const taken = new Map();
  for (const name of [...names].sort()) {
    let x = 2166136261;
    for (let i = 0; i < name.length; i++) x = Math.imul(x ^ name.charCodeAt(i), 16777619);
    let slot = (x >>> 0) % COLORS.length;
    for (let k = 0; k < COLORS.length && [...taken.values()].includes(slot); k++) slot = (slot + 1) % COLORS.length;
    taken.set(name, slot);
  }
  return (name) => COLORS[taken.get(name) ?? 0];
}

function loadUPlot() {
  if (window.uPlot) return Promise.resolve(window.uPlot);
  if (!loading) {
    loading = new Promise((resolve, reject) => {
      document.head.append(h("link", { rel: "stylesheet", href: "/static/vendor/uplot/uPlot.min.css" }));
      const s = h("script", { src: "/static/vendor/uplot/uPlot.iife.min.js" });
      s.addEventListener("load", () => resolve(window.uPlot));
      s.addEventListener("error", () => reject(new Error("could not load the chart library")));
      document.head.append(s);
    });
  }
  return loading;
}

// Columns of [time, series...] with a fixed length: the oldest point leaves when a new one comes.
class Series {
  constructor() {
    this.names = [];
    this.t = [];
    this.cols = [];
  }
  index(name) {
    let i = this.names.indexOf(name);
    if (i < 0) {
      i = this.names.push(name) - 1;
      this.cols.push(this.t.map(() => null));
    }
    return i;
  }
  add(t, values) {
    for (const name of Object.keys(values)) this.index(name);
    this.t.push(t);
    this.cols.forEach((c, i) => c.push(values[this.names[i]] ?? null));
    if (this.t.length > KEEP) {
      this.t.shift();
      this.cols.forEach((c) => c.shift());
    }
  }
  // Points [t, value] of one series from the stored history, merged by second; live points win.
  merge(name, points) {
    const i = this.index(name);
    const rows = new Map(this.t.map((t, j) => [t, this.cols.map((c) => c[j])]));
    for (const [t, v] of points) {
      const s = Math.floor(t);
      if (!rows.has(s)) rows.set(s, this.cols.map(() => null));
      const row = rows.get(s);
      if (row[i] === null || row[i] === undefined) row[i] = v;
    }
    this.t = [...rows.keys()].sort((a, b) => a - b).slice(-KEEP);
    this.cols = this.cols.map((_, k) => this.t.map((t) => rows.get(t)[k] ?? null));
  }
  data() {
    return [this.t, ...this.cols];
  }
}

// own: each series on its own y scale (values of very different ranges stay readable; the
// first two scales get an axis, left and right, in their series' colour; the legend shows the
// real values of every series).
function chart(uPlot, el, title, series, fromZero, own = false) {
  const width = Math.max(280, el.clientWidth || 600);
  const scaleOf = (i) => (own ? `y${i}` : "y");
  const colorOf = colors(series.names);
  const opts = {
    title, width, height: 240,
    series: [{}, ...series.names.map((n, i) => ({ label: n, stroke: colorOf(n), width: 1.5, spanGaps: true, scale: scaleOf(i) }))],
    // at least the last minute on the time axis, so one point does not stretch it to years
    scales: {
      x: { time: true, range: (u, min, max) => [Math.min(min, max - 60), max] },
      ...(fromZero ? { y: { range: (u, min, max) => [0, Math.max(1, max * 1.1)] } } : {}),
    },
    axes: own
      ? [{}, ...series.names.slice(0, 2).map((n, i) => ({ scale: scaleOf(i), side: i ? 1 : 3, size: 64, stroke: colorOf(n), grid: { show: i === 0 } }))]
      : [{}, {}],
  };
  return new uPlot(opts, series.data(), el);
}

export function start(el, { args }) {
  const select = h("select", { id: "chart-node", "aria-label": "node" });
  const keyInput = h("input", { id: "chart-key", type: "text", placeholder: "or a stored key", "aria-label": "stored key" });
  const ratesBox = h("div", { class: "chart", id: "chart-rates" });
  const valuesBox = h("div", { class: "chart", id: "chart-values" });
  const scale = h("select", { id: "chart-scale", "aria-label": "y scale" },
    h("option", { value: "own" }, "a y scale per series"), h("option", { value: "shared" }, "one y scale"));
  const note = h("p", { class: "muted", id: "chart-note" }, "Pick a node to chart the values of its keys.");
  const keyNote = h("p", { class: "warn", id: "chart-key-note", role: "status" });
  el.append(h("h1", {}, "Charts"), ratesBox, h("div", { class: "toolbar" }, select, keyInput, scale), keyNote, note, valuesBox);

  const rates = new Series();
  const values = new Series();
  let ratesPlot = null, valuesPlot = null, prev = null, stopped = false;
  let U = null;

  function redraw(plot, box, title, series, make, rebuild = false) {
    if (!U || stopped || series.t.length < 2) return plot; // one point gives uPlot no time span
    if (rebuild || !plot || plot.series.length !== series.names.length + 1) {
      if (plot) plot.destroy();
      box.replaceChildren();
      return make ? chart(U, box, title, series, series === rates, series === values && scale.value === "own") : plot;
    }
    plot.setData(series.data());
    return plot;
  }

  const offStats = on("stats", (s) => {
    const now = s.ts;
    const counts = Object.fromEntries(s.pipelines.map((p) => [p.name, p.events_in]));
    if (prev) {
      const dt = now - prev.ts;
      const r = {};
      for (const [name, n] of Object.entries(counts)) if (name in prev.counts) r[`${name} events/s`] = Math.max(0, (n - prev.counts[name]) / dt);
      rates.add(now, r);
      ratesPlot = redraw(ratesPlot, ratesBox, "Events in per second", rates, true);
    }
    prev = { ts: now, counts };
  });
  const unsubStats = subscribe("stats");

  // a key's stored history, fetched once, when it first shows up (or is asked for by name)
  const backfilled = new Set();
  const seen = new Set(); // keys that came live from the chosen node
  async function backfill(key, typed = false) {
    if (backfilled.has(key)) {
      if (typed) keyNote.textContent = "";
      return;
    }
    backfilled.add(key);
    const to = Date.now() / 1000 + 1;
    // a span of KEEP seconds in at most KEEP points: the 1 s tier
    const q = new URLSearchParams({ key, from: String(to - KEEP), to: String(to), points: String(KEEP) });
    try {
      const d = await get(`/api/history?${q}`);
      if (stopped) return;
      const mean = d.columns.indexOf("mean");
      if (typed) {
        keyNote.textContent = d.points.length || seen.has(key) ? "" : `No stored history for “${key}” in the last ` +
          `${KEEP / 60} minutes: check the key (e.g. boiler/temp), or that a history node stores it.`;
        if (!d.points.length && !seen.has(key)) { backfilled.delete(key); return; }
      }
      values.merge(key, d.points.map((p) => [p[0], p[mean]]));
      valuesPlot = redraw(valuesPlot, valuesBox, "Values", values, true);
      note.textContent = `${values.names.length} series, ${values.t.length} points`;
    } catch (e) {
      note.textContent = `history of ${key}: ${e.message}`;
    }
  }
  keyInput.addEventListener("change", () => {
    const key = keyInput.value.trim();
    if (key) backfill(key, true); else keyNote.textContent = "";
  });
  scale.addEventListener("change", () => { valuesPlot = redraw(valuesPlot, valuesBox, "Values", values, true, true); });

  // one point per key per second at most: the latest value of that second
  let pending = {}, pendingT = 0;
  const offEvents = on("events", (m) => {
    for (const ev of m.events) {
      const v = typeof ev.value === "number" ? ev.value : null;
      if (v === null) continue;
      seen.add(ev.key);
      if (!backfilled.has(ev.key)) backfill(ev.key);
      const t = Math.floor(ev.ts);
      if (pendingT && t !== pendingT) {
        values.add(pendingT, pending);
        pending = {};
        valuesPlot = redraw(valuesPlot, valuesBox, "Values", values, true);
      }
      pendingT = t;
      pending[ev.key] = v;
    }
    note.textContent = `${values.names.length} series, ${values.t.length} points`;
  });

  const untap = tapPicker(select, "charts", args);

  loadUPlot().then((u) => { U = u; }).catch((e) => note.replaceWith(h("p", { class: "error" }, e.message)));
  return {
    stop() {
      stopped = true;
      offStats(); unsubStats(); offEvents();
      untap();
      if (ratesPlot) ratesPlot.destroy();
      if (valuesPlot) valuesPlot.destroy();
    },
  };
}
