// Pipeline graph: nodes and edges from /api/pipelines, laid out in columns by depth,
// with live counters and queue depth; click a node for its config.
import { get, h } from "../api.js";
import { on, subscribe } from "../live.js";

const W = 170, H = 58, GX = 60, GY = 22, PAD = 16;

function layout(nodes) {
  const byId = new Map(nodes.map((n) => [n.id, n]));
  const depth = new Map();
  const d = (n) => {
    if (depth.has(n.id)) return depth.get(n.id);
    depth.set(n.id, 0);
    const v = n.inputs.length ? 1 + Math.max(...n.inputs.map((u) => (byId.has(u) ? d(byId.get(u)) : 0))) : 0;
    depth.set(n.id, v);
    return v;
  };
  nodes.forEach(d);
  const cols = [];
  for (const n of nodes) (cols[depth.get(n.id)] ||= []).push(n);
  const pos = new Map();
  cols.forEach((col, x) => col.forEach((n, y) => pos.set(n.id, { x: PAD + x * (W + GX), y: PAD + y * (H + GY) })));
  const width = PAD * 2 + cols.length * (W + GX) - GX;
  const height = PAD * 2 + Math.max(...cols.map((c) => c.length)) * (H + GY) - GY;
  return { pos, width, height };
}

function counterText(n, rate) {
  const c = n.counters;
  let t = rate === undefined ? `in ${c.in} · out ${c.out}` : `${rate < 10 ? rate.toFixed(1) : Math.round(rate)}/s · out ${c.out}`;
  if (c.errors) t += ` · err ${c.errors}`;
  if (c.dropped) t += ` · drop ${c.dropped}`;
  return t;
}

function drawPipeline(p, onPick) {
  const { pos, width, height } = layout(p.nodes);
  const svg = h("svg", { class: "graph", viewBox: `0 0 ${width} ${height}`, width, height, role: "img",
    "aria-label": `pipeline ${p.name}` });
  for (const n of p.nodes) {
    for (const u of n.inputs) {
      const a = pos.get(u), b = pos.get(n.id);
      if (!a || !b) continue;
      const x1 = a.x + W, y1 = a.y + H / 2, x2 = b.x, y2 = b.y + H / 2, mx = (x1 + x2) / 2;
      svg.append(h("path", { svg: true, class: "edge", d: `M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2},${y2}` }));
    }
  }
  const live = new Map();
  for (const n of p.nodes) {
    const { x, y } = pos.get(n.id);
    const counters = h("text", { svg: true, x: x + 8, y: y + 38, class: "counters" }, counterText(n));
    const queue = h("text", { svg: true, x: x + 8, y: y + 52, class: "queue" }, n.queue ? `queue ${n.queue.depth}/${n.queue.capacity}` : "");
    const g = h("g", { svg: true, class: `node ${n.kind}`, tabindex: "0", "data-node": n.id,
      onclick: () => onPick(n), onkeydown: (e) => { if (e.key === "Enter") onPick(n); } },
      h("rect", { svg: true, x, y, width: W, height: H, rx: 6 }),
      h("text", { svg: true, x: x + 8, y: y + 17, class: "nid" }, n.id),
      h("text", { svg: true, x: x + W - 8, y: y + 17, class: "ntype", "text-anchor": "end" }, n.type),
      counters, queue);
    svg.append(g);
    live.set(n.id, { counters, queue, g });
  }
  let prev = null;
  return {
    svg,
    update(p2, ts) {
      const seen = new Map();
      for (const n of p2.nodes) {
        const l = live.get(n.id);
        if (!l) continue;
        // events per second through the node since the last tick (what it emitted, or took for a sink)
        const count = n.kind === "sink" ? n.counters.in : n.counters.out;
        seen.set(n.id, count);
        const before = prev ? prev.counts.get(n.id) : undefined;
        const rate = before === undefined || ts <= prev.ts ? undefined : Math.max(0, (count - before) / (ts - prev.ts));
        l.counters.textContent = counterText(n, rate);
        l.queue.textContent = n.queue ? `queue ${n.queue.depth}/${n.queue.capacity}` : "";
        l.g.classList.toggle("has-errors", n.counters.errors > 0);
      }
      prev = { ts, counts: seen };
    },
  };
}

export function start(el, { args }) {
  const panel = h("aside", { class: "panel", id: "node-panel", hidden: true });
  const body = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  el.append(h("h1", {}, "Pipelines"), h("div", { class: "graph-wrap" }, body, panel));
  const drawn = new Map();

  async function pick(pipeline, n) {
    panel.hidden = false;
    panel.replaceChildren(h("h2", {}, `${pipeline} / ${n.id}`), h("p", { class: "muted" }, "Loading…"));
    try {
      const d = await get(`/api/pipelines/${encodeURIComponent(pipeline)}/nodes/${encodeURIComponent(n.id)}`);
      panel.replaceChildren(
        h("h2", {}, `${pipeline} / ${n.id}`),
        h("button", { type: "button", class: "link close", onclick: () => { panel.hidden = true; } }, "close"),
        h("p", {}, `${d.kind} · ${d.type}`),
        h("p", {}, h("a", { href: `#/events/${encodeURIComponent(pipeline)}/${encodeURIComponent(n.id)}` }, "Tail its events")),
        h("h3", {}, "Config"),
        h("pre", { class: "options" }, JSON.stringify(d.options, null, 2)),
        h("h3", {}, "Counters"),
        h("pre", {}, JSON.stringify({ counters: d.counters, queue: d.queue, health: d.health, state: d.state }, null, 2)),
      );
    } catch (e) {
      panel.replaceChildren(h("p", { class: "error" }, e.message));
    }
  }

  get("/api/pipelines").then((d) => {
    body.replaceChildren();
    const only = args[0];
    for (const p of d.pipelines) {
      if (only && p.name !== only) continue;
      const g = drawPipeline(p, (n) => pick(p.name, n));
      drawn.set(p.name, g);
      body.append(h("section", { class: "pipeline", "data-pipeline": p.name },
        h("h2", {}, p.name, " ", h("span", { class: `pill ${p.state === "running" ? "ok" : "bad"}` }, p.state)),
        h("div", { class: "scroll" }, g.svg)));
    }
    if (!d.pipelines.length) body.append(h("p", { class: "muted" }, "No pipelines configured."));
  }).catch((e) => body.replaceChildren(h("p", { class: "error" }, e.message)));

  const off = on("stats", (s) => {
    for (const p of s.detail || []) drawn.get(p.name)?.update(p, s.ts);
  });
  const unsub = subscribe("stats");
  return { stop() { off(); unsub(); } };
}
