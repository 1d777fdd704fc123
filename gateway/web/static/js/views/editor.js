// The pipeline editor: a Drawflow canvas built from the editor model (never from stored HTML),
// a palette and forms generated from the node types' JSON Schema, live validation by node and
// field, undo/redo, deploy with the file's revision, live rates and the console panel.
import { ApiError, get, h, post } from "../api.js";
import { on, subscribe } from "../live.js";

let loading = null;
function loadDrawflow() {
  // The vendored library and its style, loaded once, only by this view.
  if (window.Drawflow) return Promise.resolve();
  if (!loading) {
    loading = new Promise((resolve, reject) => {
      document.head.append(h("link", { rel: "stylesheet", href: "/static/vendor/drawflow/drawflow.min.css" }));
      document.head.append(h("link", { rel: "stylesheet", href: "/static/editor.css" }));
      const s = h("script", { src: "/static/vendor/drawflow/drawflow.min.js" });
      s.addEventListener("load", () => resolve());
      s.addEventListener("error", () => reject(new Error("could not load the canvas library")));
      document.head.append(s);
    });
  }
  return loading;
}

const PHONE = window.matchMedia("(max-width: 600px)");
const GAP_X = 260, GAP_Y = 110, HISTORY = 200, UNDO_MAX = 200;
// Fit never zooms out further than where a node's title is READABLE_PX tall on screen.
const READABLE_PX = 9, NODE_W = 190, NODE_H = 80, FIT_MARGIN = 30, PAN_STEP = 60;

// --- JSON Schema helpers -------------------------------------------------------------------

function resolve(schema, defs) {
  let s = schema || {};
  for (let i = 0; i < 8 && s.$ref; i++) s = defs[s.$ref.split("/").pop()] || {};
  if (s.allOf && s.allOf.length === 1) return { ...resolve(s.allOf[0], defs), description: s.description, default: s.default };
  if (s.anyOf) {
    const alts = s.anyOf.filter((a) => a.type !== "null");
    if (alts.length === 1) {
      return { ...resolve(alts[0], defs), description: s.description ?? alts[0].description, default: s.default, title: s.title, nullable: true };
    }
    return { ...s, union: alts.map((a) => resolve(a, defs)) };
  }
  return s;
}

function enumOf(s) {
  if (s.enum) return s.enum;
  if (s.const !== undefined) return [s.const];
  if (s.union && s.union.every((a) => a.enum || a.const !== undefined)) return s.union.flatMap(enumOf);
  return null;
}

function boundsText(s) {
  const parts = [];
  if (s.minimum !== undefined || s.ge !== undefined) parts.push(`≥ ${s.minimum ?? s.ge}`);
  if (s.gt !== undefined) parts.push(`> ${s.gt}`);
  if (s.le !== undefined) parts.push(`≤ ${s.le}`);
  if (s.lt !== undefined) parts.push(`< ${s.lt}`);
  if (s.exclusiveMinimum !== undefined) parts.push(`> ${s.exclusiveMinimum}`);
  if (s.maximum !== undefined) parts.push(`≤ ${s.maximum}`);
  if (s.exclusiveMaximum !== undefined) parts.push(`< ${s.exclusiveMaximum}`);
  return parts.join(", ");
}

// Readings as people read them: 80.18900000000001 shown as 80.189 (the raw JSON with "pretty" off).
const rounded = (k, v) => (typeof v === "number" && !Number.isInteger(v) ? Number(v.toPrecision(6)) : v);

const NUMBER = /^-?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$/i;
const CODE_HINT = /expression|cel\b|template|prompt|jinja/i;

function getPath(obj, path) {
  return path.reduce((o, k) => (o === undefined || o === null ? undefined : o[k]), obj);
}

function setPath(obj, path, value) {
  let o = obj;
  for (let i = 0; i < path.length - 1; i++) {
    const k = path[i];
    if (o[k] === undefined || o[k] === null || typeof o[k] !== "object") o[k] = typeof path[i + 1] === "number" ? [] : {};
    o = o[k];
  }
  const last = path[path.length - 1];
  if (value === undefined) {
    if (Array.isArray(o)) o.splice(last, 1);
    else delete o[last];
  } else o[last] = value;
}

// --- the view ------------------------------------------------------------------------------

export function start(el, ctx) {
  const st = {
    palette: null, types: new Map(), off: new Map(), model: null, revision: null, positions: {}, editable: false,
    current: null, errors: [], undo: [], redo: [], selected: null, clipboard: null, multi: new Set(), modHeld: false,
    dfToId: new Map(), idToDf: new Map(), building: false, df: null, lastDiff: "",
    rates: new Map(), console: new Map(), consoleTab: null, paused: false, pretty: true, stopped: false,
    live: new Map(),
  };
  if (ctx.args && ctx.args[0]) st.current = ctx.args[0];
  const status = h("span", { id: "ed-status", class: "muted", role: "status" }, "loading…");
  const pipeSel = h("select", { id: "ed-pipeline", "aria-label": "pipeline" });
  const newName = h("input", { id: "ed-new-name", placeholder: "new pipeline name", "aria-label": "new pipeline name", size: 16 });
  const locate = h("input", { id: "ed-locate", placeholder: "find node (/)", "aria-label": "find a node", size: 14, list: "ed-node-ids" });
  const idList = h("datalist", { id: "ed-node-ids" });
  const btn = (id, label, fn, title, cls = "small") => h("button", { id, type: "button", class: cls, title, onclick: fn }, label);
  // admins switch a pipeline off and on in view mode too (on a phone): `enabled: false` in the YAML
  const toggle = h("button", { id: "ed-toggle", type: "button", class: "small", hidden: true, onclick: () => togglePipeline() }, "Disable");
  const toolbar = h("div", { class: "toolbar ed-toolbar" },
    h("label", {}, "Pipeline ", pipeSel), toggle,
    h("span", { class: "edit-only" }, newName, btn("ed-new-pipeline", "New pipeline", () => newPipeline())),
    h("span", { class: "edit-only" },
      btn("ed-undo", "Undo", () => undo(), "Undo (Ctrl+Z)"),
      btn("ed-redo", "Redo", () => redo(), "Redo (Ctrl+Y)"),
      btn("ed-delete", "Delete", () => deleteSelected(), "Delete the selected node (Delete)"),
      btn("ed-copy", "Copy", () => copySelected(), "Copy the selected node (Ctrl+C)"),
      btn("ed-paste", "Paste", () => paste(), "Paste (Ctrl+V)"),
      btn("ed-import", "Import", () => openImport(), "Add a pipeline from its YAML"),
      btn("ed-connections", "Connections", () => openConnections(), "MQTT brokers and other connections (applied at restart)"),
      btn("ed-export", "Export", () => openExport(), "This pipeline's YAML, as saved")),
    btn("ed-layout", "Auto-layout", () => { autoLayout(true); commit(); rebuild(); fit(); }, "Lay out the nodes by depth (L)"),
    btn("ed-fit", "Fit", () => fit(), "Fit to screen (F)"),
    locate, idList,
    btn("ed-deploy", "Deploy", () => openDeploy(), "Validate, show the YAML diff, deploy (Ctrl+S)", "edit-only"),
    status);
  const palette = h("nav", { class: "ed-palette edit-only", "aria-label": "node palette" });
  const canvasEl = h("div", { id: "drawflow", class: "ed-drawflow", tabindex: "0", "aria-label": "pipeline canvas" });
  const side = h("aside", { id: "ed-form", class: "ed-side", "aria-label": "node options" },
    h("p", { class: "muted" }, "Select a node to edit its options."));
  const consoleTabs = h("div", { class: "ed-tabs", role: "tablist" });
  const consoleBody = h("div", { id: "ed-console-body", class: "ed-console-body" });
  const consolePanel = h("section", { id: "ed-console", class: "ed-console", "aria-label": "console output" },
    h("div", { class: "toolbar" }, h("strong", {}, "Console"), consoleTabs,
      h("label", {}, h("input", { type: "checkbox", id: "ed-pause", onchange: (e) => { st.paused = e.target.checked; } }), " pause"),
      h("label", {}, h("input", { type: "checkbox", id: "ed-pretty", checked: true, onchange: (e) => { st.pretty = e.target.checked; drawConsole(); } }), " pretty"),
      btn("ed-clear", "Clear", () => { if (st.consoleTab) st.console.set(st.consoleTab, []); drawConsole(); })),
    consoleBody);
  const dialog = h("div", { id: "ed-dialog", class: "ed-dialog", hidden: true, role: "dialog", "aria-modal": "true" });
  const hint = h("p", { id: "ed-hint", class: "ed-hint", role: "status", hidden: true });
  const root = h("div", { class: "ed" }, toolbar, palette, h("div", { class: "ed-canvas" }, canvasEl, hint), side, consolePanel, dialog);
  el.append(root);

  const say = (text, cls = "muted") => { status.textContent = text; status.className = cls; };

  // --- model ------------------------------------------------------------------------------

  const pipe = () => st.model?.pipelines.find((p) => p.name === st.current);
  const nodeById = (id) => pipe()?.nodes.find((n) => n.id === id);
  const posOf = (id) => (st.positions[st.current] || {})[id];
  const setPos = (id, x, y) => { (st.positions[st.current] ||= {})[id] = [Math.round(x), Math.round(y)]; };
  const snapshot = () => JSON.stringify({ pipelines: st.model.pipelines, positions: st.positions, current: st.current });

  let lastSnap = null;
  function commit() {
    // One undo step per change: the state before it goes on the undo stack.
    const snap = snapshot();
    if (snap === lastSnap) return;
    if (lastSnap !== null) st.undo.push(lastSnap);
    if (st.undo.length > UNDO_MAX) st.undo.shift();
    st.redo = [];
    lastSnap = snap;
    scheduleValidate();
  }

  function restore(snap) {
    const s = JSON.parse(snap);
    st.model.pipelines = s.pipelines;
    st.positions = s.positions;
    st.current = s.current;
    lastSnap = snap;
    fillPipelines();
    rebuild();
    scheduleValidate();
  }

  function undo() {
    if (!st.undo.length) return say("nothing to undo");
    st.redo.push(snapshot());
    restore(st.undo.pop());
    say("undone");
  }

  function redo() {
    if (!st.redo.length) return say("nothing to redo");
    st.undo.push(snapshot());
    restore(st.redo.pop());
    say("redone");
  }

  function uniqueId(base) {
    const ids = new Set(pipe().nodes.map((n) => n.id));
    const clean = String(base).replace(/[^A-Za-z0-9_-]/g, "_").replace(/^[^A-Za-z_]/, "n");
    if (!ids.has(clean)) return clean;
    for (let i = 2; ; i++) if (!ids.has(`${clean}_${i}`)) return `${clean}_${i}`;
  }

  function addNode(type, x, y) {
    if (!st.editable || !pipe()) return;
    const id = uniqueId(type);
    pipe().nodes.push({ id, type, input: [], options: {}, readonly: null });
    setPos(id, x, y);
    commit();
    rebuild();
    select(id);
    say(`added ${id}`);
  }

  function removeNode(id) {
    const p = pipe();
    p.nodes = p.nodes.filter((n) => n.id !== id);
    for (const n of p.nodes) n.input = n.input.filter((u) => u !== id);
    if (st.positions[st.current]) delete st.positions[st.current][id];
    if (st.selected === id) { st.selected = null; drawForm(); }
  }

  // the selection: the focused node (its form) plus the others picked with Shift/Ctrl-click or a
  // Shift-drag rubber band on the background
  const selection = () => [...new Set([...(st.selected ? [st.selected] : []), ...st.multi])].filter((id) => nodeById(id));

  function deleteSelected() {
    const ids = selection();
    if (!ids.length) return say("select a node first");
    const ro = ids.map(nodeById).filter((n) => n.readonly);
    if (ro.length) return say(`${ro.map((n) => n.id).join(", ")}: read-only (${ro[0].readonly})`, "bad");
    for (const id of ids) removeNode(id);
    st.multi.clear();
    commit();
    rebuild();
    say(`deleted ${ids.join(", ")}`);
  }

  function copySelected() {
    const ids = selection();
    if (!ids.length) return say("select a node first");
    st.clipboard = JSON.parse(JSON.stringify(ids.map((id) => ({ ...nodeById(id), pos: posOf(id) }))));
    say(`copied ${ids.join(", ")}`);
  }

  function paste() {
    const c = st.clipboard;
    if (!c || !c.length || !pipe()) return say("nothing to paste");
    // wires among the copied nodes are copied along; wires from outside are not
    const ids = new Map();
    for (const n of c) {
      const id = uniqueId(n.id);
      ids.set(n.id, id);
      pipe().nodes.push({ id, type: n.type, input: [], options: JSON.parse(JSON.stringify(n.options)), readonly: null });
      const [x, y] = n.pos || [60, 60];
      setPos(id, x + 40, y + 40);
    }
    for (const n of c) nodeById(ids.get(n.id)).input = n.input.filter((u) => ids.has(u)).map((u) => ids.get(u));
    const pasted = [...ids.values()];
    st.selected = pasted[0];
    st.multi = new Set(pasted);
    commit();
    rebuild();
    say(`pasted ${pasted.join(", ")}`);
  }

  function newPipeline() {
    const name = newName.value.trim();
    if (!/^[A-Za-z_][A-Za-z0-9_-]*$/.test(name)) return say("a pipeline name starts with a letter or _ and has letters, digits, _ and -", "bad");
    if (st.model.pipelines.some((p) => p.name === name)) return say(`there is already a pipeline ${name}`, "bad");
    st.model.pipelines.push({ name, description: null, nodes: [] });
    st.current = name;
    newName.value = "";
    fillPipelines();
    commit();
    rebuild();
    say(`new pipeline ${name}: drag nodes from the palette`);
  }

  // --- layout -----------------------------------------------------------------------------

  function autoLayout(all) {
    const p = pipe();
    if (!p) return;
    const byId = new Map(p.nodes.map((n) => [n.id, n]));
    const depth = new Map();
    const d = (n, seen = new Set()) => {
      if (depth.has(n.id)) return depth.get(n.id);
      if (seen.has(n.id)) return 0;
      seen.add(n.id);
      const ups = n.input.filter((u) => byId.has(u));
      const v = ups.length ? 1 + Math.max(...ups.map((u) => d(byId.get(u), seen))) : 0;
      depth.set(n.id, v);
      return v;
    };
    const rows = [];
    for (const n of p.nodes) {
      const col = d(n);
      rows[col] = (rows[col] || 0) + 1;
      if (all || !posOf(n.id)) setPos(n.id, 40 + col * GAP_X, 40 + (rows[col] - 1) * GAP_Y);
    }
  }

  // The canvas scales around its centre: a point p of the pipeline lands on screen at
  // size/2 + (p - size/2) * zoom + translation, on each axis.
  function setView(z, x, y) {
    const df = st.df;
    df.zoom = z;
    df.zoom_last_value = z; // Drawflow's own zoom (Ctrl+wheel, pinch) goes on from here
    df.canvas_x = x;
    df.canvas_y = y;
    df.precanvas.style.transform = `translate(${x}px, ${y}px) scale(${z})`;
    showHint();
  }

  // The zoom below which a node's title is smaller than READABLE_PX on screen.
  function readableZoom() {
    const title = canvasEl.querySelector(".df-id");
    const px = title ? parseFloat(getComputedStyle(title).fontSize) : 12.8;
    return Math.min(1, READABLE_PX / px);
  }

  function bounds(p) {
    const xs = p.nodes.map((n) => posOf(n.id) || [0, 0]);
    return {
      minX: Math.min(...xs.map((q) => q[0])), maxX: Math.max(...xs.map((q) => q[0])) + NODE_W,
      minY: Math.min(...xs.map((q) => q[1])), maxY: Math.max(...xs.map((q) => q[1])) + NODE_H,
    };
  }

  // Fit: the whole pipeline when it fits at a zoom where the nodes' titles stay readable. A larger
  // one is shown at that zoom from where its data starts (the sources, top left), and the rest is
  // a drag, a wheel or a find (/) away: text too small to read shows nothing.
  function fit() {
    const df = st.df;
    const p = pipe();
    if (!df || !p || !p.nodes.length) { showHint(); return; }
    const { minX, maxX, minY, maxY } = bounds(p);
    const W = canvasEl.clientWidth || 800, H = canvasEl.clientHeight || 500;
    canvasEl.dataset.fitted = `${canvasEl.clientWidth}x${canvasEl.clientHeight}`; // the size fitted to
    const M = FIT_MARGIN;
    const z = Math.max(readableZoom(), Math.min(1, W / (maxX - minX + 2 * M), H / (maxY - minY + 2 * M)));
    const place = (min, max, size) => (max - min + 2 * M) * z <= size + 0.5
      ? -((min + max) / 2 - size / 2) * z // it fits: centred
      : M * z - size / 2 - (min - size / 2) * z; // it does not: its start at the edge
    setView(z, place(minX, maxX, W), place(minY, maxY, H));
  }

  // "7 of 17 nodes in view" while some are outside the canvas, with how to get to them.
  function showHint(tx, ty) {
    const df = st.df;
    const p = pipe();
    const W = canvasEl.clientWidth, H = canvasEl.clientHeight;
    let inView = 0;
    for (const n of (df && p ? p.nodes : [])) {
      const [x, y] = posOf(n.id) || [0, 0];
      const at = (q, size, t) => size / 2 + (q - size / 2) * df.zoom + t;
      const cx = tx ?? df.canvas_x, cy = ty ?? df.canvas_y; // while dragging, Drawflow says where it is
      if (at(x, W, cx) >= -1 && at(x + NODE_W, W, cx) <= W + 1 && at(y, H, cy) >= -1 && at(y + NODE_H, H, cy) <= H + 1) inView++;
    }
    const total = df && p ? p.nodes.length : 0;
    hint.hidden = inView === total;
    hint.textContent = `${inView} of ${total} nodes in view: drag or scroll to pan (arrow keys on the canvas), find one with /`;
  }

  function locateNode(q) {
    const p = pipe();
    if (!p) return;
    const text = q.trim().toLowerCase();
    const n = p.nodes.find((x) => x.id.toLowerCase() === text) || p.nodes.find((x) => x.id.toLowerCase().includes(text));
    if (!n) return say(`no node matching ${q}`, "bad");
    const [x, y] = posOf(n.id) || [0, 0];
    const W = canvasEl.clientWidth || 800, H = canvasEl.clientHeight || 500;
    setView(1, W / 2 - x - 95, H / 2 - y - 30);
    select(n.id);
    say(`found ${n.id}`);
  }

  // --- canvas -----------------------------------------------------------------------------

  function nodeBox(n) {
    const t = st.types.get(n.type);
    return h("div", { class: "df-node", "data-node": n.id },
      h("div", { class: "df-title" }, h("span", { class: "df-id" }, n.id), h("span", { class: "df-type" }, n.type)),
      h("div", { class: "df-rate" }, t ? "" : st.off.has(n.type) ? "needs restart (started without TLS)" : "unknown type"),
      h("div", { class: "df-err", hidden: true }),
      n.readonly ? h("div", { class: "df-ro", title: n.readonly }, "read-only") : null);
  }

  function rebuild() {
    const df = st.df;
    const p = pipe();
    st.building = true;
    try {
      df.clear();
      st.dfToId.clear();
      st.idToDf.clear();
      idList.replaceChildren();
      if (!p) return;
      autoLayout(false);
      for (const n of p.nodes) {
        const t = st.types.get(n.type);
        const [x, y] = posOf(n.id);
        const kind = t ? t.kind : "operator";
        // html is empty: the content is built below with DOM calls and textContent only
        const dfId = df.addNode(n.type, t ? t.inputs : 1, t ? t.outputs : 1, x, y, `kind-${kind}`, { id: n.id }, "", false);
        st.dfToId.set(dfId, n.id);
        st.idToDf.set(n.id, dfId);
        const content = canvasEl.querySelector(`#node-${dfId} .drawflow_content_node`);
        content.replaceChildren(nodeBox(n));
        idList.append(h("option", { value: n.id }));
      }
      for (const n of p.nodes) {
        for (const u of n.input) {
          const a = st.idToDf.get(u), b = st.idToDf.get(n.id);
          if (a !== undefined && b !== undefined && df.getNodeFromId(a).outputs.output_1 && df.getNodeFromId(b).inputs.input_1) {
            df.addConnection(a, b, "output_1", "input_1");
          }
        }
      }
    } finally {
      st.building = false;
    }
    if (st.selected && !st.idToDf.has(st.selected)) st.selected = null;
    for (const id of [...st.multi]) if (!st.idToDf.has(id)) st.multi.delete(id);
    markSelected();
    drawForm();
    showErrors();
  }

  function markSelected() {
    for (const e of canvasEl.querySelectorAll(".drawflow-node.ed-selected, .drawflow-node.ed-multi")) e.classList.remove("ed-selected", "ed-multi");
    const dfId = st.idToDf.get(st.selected);
    if (dfId !== undefined) canvasEl.querySelector(`#node-${dfId}`)?.classList.add("ed-selected");
    for (const id of st.multi) {
      const d = st.idToDf.get(id);
      if (d !== undefined) canvasEl.querySelector(`#node-${d}`)?.classList.add("ed-multi");
    }
  }

  function select(id, add = false) {
    if (add && st.editable) {
      // Shift/Ctrl-click: the node joins the selection (or leaves it)
      if (st.selected) st.multi.add(st.selected);
      if (st.multi.has(id) && st.selected !== id) st.multi.delete(id);
      else st.multi.add(id);
    } else if (!st.multi.has(id)) {
      st.multi.clear(); // a plain click on a node outside the selection starts a new one
    }
    st.selected = id;
    markSelected();
    drawForm();
  }

  function wire(df) {
    df.on("translate", (t) => showHint(t.x, t.y));
    df.on("zoom", () => requestAnimationFrame(() => showHint()));
    df.on("nodeSelected", (dfId) => { if (!st.building) select(st.dfToId.get(Number(dfId)), st.modHeld); });
    df.on("nodeMoved", (dfId) => {
      const id = st.dfToId.get(Number(dfId));
      const n = df.getNodeFromId(dfId);
      if (!id) return;
      const [x0, y0] = posOf(id) || [n.pos_x, n.pos_y];
      const dx = n.pos_x - x0, dy = n.pos_y - y0;
      setPos(id, n.pos_x, n.pos_y);
      const others = st.multi.has(id) ? selection().filter((o) => o !== id) : [];
      for (const o of others) { const [x, y] = posOf(o); setPos(o, x + dx, y + dy); } // the selection moves as one
      commit();
      if (others.length && (dx || dy)) rebuild();
    });
    df.on("nodeRemoved", (dfId) => {
      if (st.building) return;
      const id = st.dfToId.get(Number(dfId));
      if (!id) return;
      const n = nodeById(id);
      if (n && n.readonly) { say(`${id} is read-only: ${n.readonly}`, "bad"); rebuild(); return; }
      removeNode(id);
      commit();
      rebuild();
    });
    const edge = (c) => [st.dfToId.get(Number(c.output_id)), st.dfToId.get(Number(c.input_id))];
    df.on("connectionCreated", (c) => {
      if (st.building) return;
      const [from, to] = edge(c);
      const n = nodeById(to);
      if (!n || !from) return;
      if (n.readonly) { say(`${to} is read-only: ${n.readonly}`, "bad"); rebuild(); return; }
      if (!n.input.includes(from)) n.input.push(from);
      commit();
      showErrors();
    });
    df.on("connectionRemoved", (c) => {
      if (st.building) return;
      const [from, to] = edge(c);
      const n = nodeById(to);
      if (!n) return;
      if (n.readonly) { say(`${to} is read-only: ${n.readonly}`, "bad"); rebuild(); return; }
      n.input = n.input.filter((u) => u !== from);
      commit();
    });
  }

  // The wheel pans (Shift+wheel sideways), as in Node-RED's and Dify's canvases; Ctrl+wheel (and a
  // touchpad's pinch) zooms, which Drawflow does itself.
  canvasEl.addEventListener("wheel", (e) => {
    const df = st.df;
    if (e.ctrlKey || !df) return;
    e.preventDefault();
    const unit = e.deltaMode === 1 ? 16 : e.deltaMode === 2 ? canvasEl.clientHeight : 1;
    const sideways = e.shiftKey && !e.deltaX;
    const dx = (sideways ? e.deltaY : e.deltaX) * unit, dy = (sideways ? 0 : e.deltaY) * unit;
    setView(df.zoom, df.canvas_x - dx, df.canvas_y - dy);
  }, { passive: false });

  // Shift/Ctrl held at mousedown: a click adds to the selection; a Shift-drag on the background
  // draws a rubber band (instead of Drawflow's pan) and selects the nodes it touches.
  let band = null;
  canvasEl.addEventListener("mousedown", (e) => {
    st.modHeld = e.shiftKey || e.ctrlKey || e.metaKey;
    const bg = e.target === canvasEl || e.target === st.df?.precanvas;
    if (!st.editable || !e.shiftKey || !bg || e.button !== 0) return;
    e.stopPropagation();
    e.preventDefault();
    const r = canvasEl.getBoundingClientRect();
    band = { x: e.clientX, y: e.clientY, el: h("div", { class: "ed-band" }) };
    Object.assign(band.el.style, { left: `${e.clientX - r.left}px`, top: `${e.clientY - r.top}px`, width: "0px", height: "0px" });
    canvasEl.append(band.el);
  }, true);
  const onBandMove = (e) => {
    if (!band) return;
    const r = canvasEl.getBoundingClientRect();
    Object.assign(band.el.style, {
      left: `${Math.min(band.x, e.clientX) - r.left}px`, top: `${Math.min(band.y, e.clientY) - r.top}px`,
      width: `${Math.abs(e.clientX - band.x)}px`, height: `${Math.abs(e.clientY - band.y)}px`,
    });
  };
  const onBandUp = (e) => {
    if (!band) return;
    const x1 = Math.min(band.x, e.clientX), x2 = Math.max(band.x, e.clientX);
    const y1 = Math.min(band.y, e.clientY), y2 = Math.max(band.y, e.clientY);
    band.el.remove();
    band = null;
    const hit = [...st.idToDf.entries()].filter(([, d]) => {
      const b = canvasEl.querySelector(`#node-${d}`)?.getBoundingClientRect();
      return b && b.right >= x1 && b.left <= x2 && b.bottom >= y1 && b.top <= y2;
    }).map(([id]) => id);
    for (const id of hit) st.multi.add(id);
    if (hit.length && !st.selected) st.selected = hit[0];
    markSelected();
    drawForm();
    say(hit.length ? `selected ${selection().join(", ")}` : "nothing selected");
  };
  document.addEventListener("mousemove", onBandMove);
  document.addEventListener("mouseup", onBandUp);

  // Selecting works in view mode too (Drawflow selects nothing there): a viewer reads a node's options.
  canvasEl.addEventListener("click", (e) => {
    const box = e.target.closest && e.target.closest(".df-node");
    if (box && box.dataset.node !== st.selected) select(box.dataset.node, st.modHeld);
  }, true);
  canvasEl.addEventListener("dragover", (e) => { if (st.editable) e.preventDefault(); });
  canvasEl.addEventListener("drop", (e) => {
    e.preventDefault();
    const type = e.dataTransfer.getData("application/x-sluice-node") || e.dataTransfer.getData("text/plain");
    if (!st.types.has(type)) return;
    const r = st.df.precanvas.getBoundingClientRect();
    addNode(type, (e.clientX - r.x) / st.df.zoom, (e.clientY - r.y) / st.df.zoom);
  });

  // --- palette ----------------------------------------------------------------------------

  function drawPalette() {
    palette.replaceChildren(h("input", { id: "ed-palette-filter", placeholder: "filter node types", "aria-label": "filter node types",
      oninput: (e) => filterPalette(e.target.value) }));
    for (const fam of st.palette.families) {
      const list = h("ul", {});
      for (const t of fam.types) {
        if (t.unavailable) {
          // a type this gateway cannot load until it restarts (SLUICE_TLS=auto kept OpenSSL out): shown, not added
          list.append(h("li", {}, h("button", { type: "button", class: "ed-type ed-type-off", "aria-disabled": "true", "data-type": t.type, title: t.unavailable },
            h("span", { class: "ed-type-name" }, t.type), h("span", { class: "ed-type-desc" }, "needs restart (started without TLS)"))));
          continue;
        }
        list.append(h("li", {},
          h("button", { type: "button", class: "ed-type", draggable: "true", "data-type": t.type, title: t.description,
            ondragstart: (e) => { e.dataTransfer.setData("application/x-sluice-node", t.type); e.dataTransfer.setData("text/plain", t.type); },
            onclick: () => {
              // a click (or Enter) adds the node in the middle of what is visible
              const r = st.df.precanvas.getBoundingClientRect(), c = canvasEl.getBoundingClientRect();
              addNode(t.type, (c.x + c.width / 2 - 90 - r.x) / st.df.zoom + (pipe()?.nodes.length || 0) * 12,
                (c.y + c.height / 2 - 30 - r.y) / st.df.zoom + (pipe()?.nodes.length || 0) * 12);
            } },
          h("span", { class: "ed-type-name" }, t.type), h("span", { class: "ed-type-desc" }, t.description))));
      }
      const title = fam.name === "llm" ? "LLM" : fam.name.charAt(0).toUpperCase() + fam.name.slice(1);
      palette.append(h("details", { open: true, "data-family": fam.name }, h("summary", {}, title), list));
    }
  }

  function filterPalette(q) {
    const text = q.toLowerCase();
    for (const b of palette.querySelectorAll(".ed-type")) {
      b.parentElement.hidden = !!text && !(b.dataset.type + " " + b.title).toLowerCase().includes(text);
    }
  }

  // --- forms ------------------------------------------------------------------------------

  function drawForm() {
    const n = st.selected && nodeById(st.selected);
    if (!n) {
      side.replaceChildren(h("p", { class: "muted" }, st.editable ? "Select a node to edit its options." : "Select a node to see its options."));
      return;
    }
    const t = st.types.get(n.type);
    const ro = !st.editable || !!n.readonly;
    const form = h("form", { class: "ed-fields", onsubmit: (e) => e.preventDefault() });
    form.append(h("h2", {}, n.id), h("p", { class: "muted" }, `${n.type}${t ? " — " + t.description : ""}`));
    if (n.readonly) form.append(h("p", { class: "warn" }, `Read-only here: ${n.readonly}. Change it in the YAML text.`));
    form.append(h("div", { class: "field-error", "data-path": "" }));
    form.append(h("div", { id: "ed-live", class: "ed-live" }));
    const idInput = h("input", { id: "ed-field-id", name: "id", value: n.id, disabled: ro, required: true });
    idInput.addEventListener("change", () => renameNode(n, idInput.value.trim()));
    form.append(h("label", { class: "field", "data-path": "id" }, h("span", { class: "fname" }, "id", h("span", { class: "req", title: "required" }, " *")), idInput,
      h("small", { class: "help" }, "Stable id: names state, metrics and logs."), h("div", { class: "field-error", "data-path": "id" })));
    if (t && t.inputs === 0) {
      form.append(h("div", { class: "field", "data-path": "input" }, h("span", { class: "fname" }, "input"),
        h("small", { class: "help" }, "a source: it takes no input"), h("div", { class: "field-error", "data-path": "input" })));
    } else {
      // the wires into this node, also editable here: by keyboard, or on a touch screen
      const ups = pipe().nodes.filter((m) => m.id !== n.id && (st.types.get(m.type)?.outputs ?? 1) > 0);
      const sel = h("select", { id: "ed-field-input", name: "input", multiple: true, disabled: ro, size: Math.min(6, Math.max(2, ups.length)) },
        ups.map((m) => h("option", { value: m.id, selected: n.input.includes(m.id) }, m.id)),
        n.input.filter((u) => !ups.some((m) => m.id === u)).map((u) => h("option", { value: u, selected: true }, `${u} (missing)`)));
      sel.addEventListener("change", () => {
        n.input = [...sel.selectedOptions].map((o) => o.value);
        commit();
        rebuild();
      });
      form.append(h("label", { class: "field", "data-path": "input" }, h("span", { class: "fname" }, "input"), sel,
        h("small", { class: "help" }, "Upstream nodes: wire an output to this node's input, or pick them here (Ctrl+click for several)."),
        h("div", { class: "field-error", "data-path": "input" })));
    }
    if (!t) {
      form.append(h("p", { class: "bad" }, st.off.has(n.type) ? `node type ${n.type} ${st.off.get(n.type)}` : `node type ${n.type} is not registered in this gateway`));
    } else {
      const schema = t.schema;
      const defs = schema.$defs || {};
      const required = new Set(schema.required || []);
      for (const [name, prop] of Object.entries(schema.properties || {})) {
        if (["id", "type", "input"].includes(name)) continue;
        form.append(field(n, [name], resolve(prop, defs), defs, required.has(name), ro, t.secret.includes(name)));
      }
    }
    side.replaceChildren(form);
    drawLive();
    showErrors();
  }

  function drawLive() {
    // the running node's counters, queue and health, refreshed with every stats message
    const box = side.querySelector("#ed-live");
    const d = box && st.live.get(st.selected);
    if (!box) return;
    if (!d) { box.replaceChildren(); return; }
    const c = d.counters || {};
    const parts = Object.entries(c).map(([k, v]) => `${k} ${v}`);
    if (d.queue) parts.push(`queue ${d.queue.depth}/${d.queue.capacity}`);
    if (d.state) parts.push(`state ${d.state}`);
    const health = d.health && Object.keys(d.health).length
      ? "health: " + Object.entries(d.health).map(([k, v]) => `${k} ${typeof v === "object" ? JSON.stringify(v) : v}`).join(" · ")
      : null;
    box.replaceChildren(...[h("small", { class: "muted" }, "running: " + parts.join(" · ")), health && h("small", { class: "help" }, health)].filter(Boolean));
  }

  function renameNode(n, id) {
    if (id === n.id) return;
    if (!/^[A-Za-z_][A-Za-z0-9_-]*$/.test(id)) return say("an id starts with a letter or _ and has letters, digits, _ and -", "bad");
    if (nodeById(id)) return say(`there is already a node ${id}`, "bad");
    const old = n.id;
    if (!n.was) n.was = old;
    n.id = id;
    for (const m of pipe().nodes) m.input = m.input.map((u) => (u === old ? id : u));
    const pos = posOf(old);
    if (pos) { setPos(id, pos[0], pos[1]); delete st.positions[st.current][old]; }
    st.selected = id;
    commit();
    rebuild();
  }

  function changed(n, path, value) {
    setPath(n.options, path, value);
    commit();
  }

  function field(n, path, s, defs, isRequired, ro, secret) {
    const name = path[path.length - 1];
    const dotted = path.join(".");
    const value = getPath(n.options, path);
    const help = s.description || s.title || "";
    const def = s.default !== undefined && s.default !== null ? `default: ${typeof s.default === "object" ? JSON.stringify(s.default) : s.default}` : "";
    const label = h("span", { class: "fname" }, String(name), isRequired ? h("span", { class: "req", title: "required" }, " *") : null);
    const wrap = (control) => h("label", { class: "field", "data-path": dotted }, label, control,
      help ? h("small", { class: "help" }, help) : null, h("div", { class: "field-error", "data-path": dotted }));
    const id = `ed-field-${dotted.replace(/[^A-Za-z0-9_-]/g, "-")}`;
    const choices = enumOf(s);
    if (name === "connection" && (s.type === "string" || !s.type)) {
      const sel = h("select", { id, name: dotted, disabled: ro },
        h("option", { value: "" }, isRequired ? "— choose a connection —" : "(none)"),
        Object.entries(st.model.connections || {}).map(([c, info]) => h("option", { value: c, selected: value === c }, `${c}${info.type ? ` (${info.type})` : ""}`)));
      sel.addEventListener("change", () => changed(n, path, sel.value || undefined));
      return wrap(sel);
    }
    if (choices) {
      const sel = h("select", { id, name: dotted, disabled: ro },
        h("option", { value: "" }, def ? `(${def})` : "(unset)"),
        choices.map((c) => h("option", { value: JSON.stringify(c), selected: value !== undefined && JSON.stringify(value) === JSON.stringify(c) }, String(c))));
      sel.addEventListener("change", () => changed(n, path, sel.value ? JSON.parse(sel.value) : undefined));
      return wrap(sel);
    }
    if (s.type === "boolean") {
      const box = h("input", { id, name: dotted, type: "checkbox", class: "toggle", checked: value === undefined ? !!s.default : !!value, disabled: ro });
      box.addEventListener("change", () => changed(n, path, box.checked));
      return wrap(box);
    }
    if (s.type === "number" || s.type === "integer") {
      const b = boundsText(s);
      const input = h("input", { id, name: dotted, inputmode: "decimal", value: value ?? "", disabled: ro,
        placeholder: [s.format === "duration" ? "duration, e.g. 500ms, 10s, 5m" : "", def, b].filter(Boolean).join("; ") || s.type });
      input.addEventListener("change", () => {
        const v = input.value.trim();
        changed(n, path, v === "" ? undefined : NUMBER.test(v) ? Number(v) : v);
      });
      return wrap(input);
    }
    if (s.type === "string") {
      const code = CODE_HINT.test(help) || CODE_HINT.test(String(name));
      const input = code
        ? h("textarea", { id, name: dotted, rows: 3, class: "code", spellcheck: "false", disabled: ro })
        : h("input", { id, name: dotted, type: secret ? "password" : "text", value: value ?? "", placeholder: def, disabled: ro, autocomplete: "off" });
      if (code) input.value = value ?? "";
      input.addEventListener("change", () => changed(n, path, input.value === "" ? undefined : input.value));
      return wrap(input);
    }
    if (s.type === "array" && s.items) {
      const item = resolve(s.items, defs);
      if (item.type === "object" && item.properties) {
        const list = Array.isArray(value) ? value : [];
        const box = h("fieldset", { class: "field list", "data-path": dotted }, h("legend", {}, label),
          help ? h("small", { class: "help" }, help) : null, h("div", { class: "field-error", "data-path": dotted }));
        const req = new Set(item.required || []);
        list.forEach((_, i) => {
          const sub = h("fieldset", { class: "item" }, h("legend", {}, `${name} ${i + 1}`));
          for (const [k, p] of Object.entries(item.properties)) sub.append(field(n, [...path, i, k], resolve(p, defs), defs, req.has(k), ro, false));
          if (!ro) sub.append(h("button", { type: "button", class: "small", onclick: () => { const l = getPath(n.options, path); l.splice(i, 1); if (!l.length) setPath(n.options, path, undefined); commit(); drawForm(); } }, "Remove"));
          box.append(sub);
        });
        if (!ro) box.append(h("button", { type: "button", class: "small", "data-add": dotted, onclick: () => {
          const l = Array.isArray(getPath(n.options, path)) ? getPath(n.options, path) : [];
          l.push({});
          setPath(n.options, path, l);
          commit();
          drawForm();
        } }, `Add ${name}`));
        return box;
      }
      const input = h("input", { id, name: dotted, value: Array.isArray(value) ? value.join(", ") : value ?? "", disabled: ro,
        placeholder: def || "comma-separated" });
      input.addEventListener("change", () => {
        const parts = input.value.split(",").map((x) => x.trim()).filter(Boolean);
        const typed = parts.map((x) => ((item.type === "number" || item.type === "integer") && NUMBER.test(x) ? Number(x) : x));
        changed(n, path, typed.length ? typed : undefined);
      });
      return wrap(input);
    }
    if (s.type === "object" && s.properties) {
      const box = h("fieldset", { class: "field group", "data-path": dotted }, h("legend", {}, label),
        help ? h("small", { class: "help" }, help) : null, h("div", { class: "field-error", "data-path": dotted }));
      const req = new Set(s.required || []);
      for (const [k, p] of Object.entries(s.properties)) box.append(field(n, [...path, k], resolve(p, defs), defs, req.has(k), ro, false));
      return box;
    }
    // anything else (a mapping of names, a union of shapes): JSON, checked as it is typed
    const area = h("textarea", { id, name: dotted, rows: 3, class: "code", spellcheck: "false", disabled: ro, placeholder: def || "JSON" });
    area.value = value === undefined ? "" : JSON.stringify(value);
    area.addEventListener("change", () => {
      const v = area.value.trim();
      if (v === "") return changed(n, path, undefined);
      try {
        changed(n, path, JSON.parse(v));
      } catch {
        // plain text where JSON does not parse: a string (the server says if it is wrong)
        changed(n, path, v);
      }
    });
    return wrap(area);
  }

  // --- validation -------------------------------------------------------------------------

  let timer = null, seq = 0;
  function scheduleValidate() {
    if (!st.editable) return;
    clearTimeout(timer);
    timer = setTimeout(validate, 300);
  }

  function draft() {
    return { pipelines: st.model.pipelines };
  }

  async function validate() {
    const mine = ++seq;
    try {
      const r = await post("/api/editor/validate", { model: draft() });
      if (mine !== seq || st.stopped) return r;
      st.errors = r.errors;
      st.lastDiff = r.diff;
      showErrors();
      say(r.valid ? (r.changed ? "valid — not deployed yet" : "valid — same as the file") : `${r.errors.length} error(s)`, r.valid ? "ok" : "bad");
      return r;
    } catch (e) {
      if (mine === seq) say(`validation failed: ${e.message}`, "bad");
      throw e;
    }
  }

  // The wires a node's graph error is about, as [from, to] pairs: a wire from a sink (it has no
  // output), and every wire of a cycle through the node.
  function badWires(id) {
    const p = pipe();
    const byId = new Map((p ? p.nodes : []).map((n) => [n.id, n]));
    const n = byId.get(id);
    if (!n) return [];
    // whether `target` feeds `from`, through any path of inputs
    const fedBy = (from, target, seen = new Set()) => {
      if (seen.has(from) || !byId.has(from)) return false;
      seen.add(from);
      return byId.get(from).input.some((u) => u === target || fedBy(u, target, seen));
    };
    const sinks = n.input.filter((u) => byId.has(u) && st.types.get(byId.get(u).type)?.kind === "sink").map((u) => [u, id]);
    const loop = new Set([...byId.keys()].filter((x) => x === id || (fedBy(id, x) && fedBy(x, id))));
    const cycle = loop.size > 1 ? [...loop].flatMap((y) => byId.get(y).input.filter((x) => loop.has(x)).map((x) => [x, y])) : [];
    return [...sinks, ...cycle];
  }

  function showErrors() {
    const mine = st.errors.filter((e) => e.pipeline === st.current || e.pipeline === null);
    for (const box of canvasEl.querySelectorAll(".drawflow-node")) {
      box.classList.remove("df-has-error");
      const err = box.querySelector(".df-err");
      if (err) { err.hidden = true; err.textContent = ""; }
      for (const port of box.querySelectorAll(".input")) port.classList.remove("df-bad-input");
    }
    for (const path of canvasEl.querySelectorAll(".df-bad-wire")) path.classList.remove("df-bad-wire");
    const byNode = new Map();
    for (const e of mine) if (e.node) (byNode.get(e.node) || byNode.set(e.node, []).get(e.node)).push(e);
    for (const [id, list] of byNode) {
      const dfId = st.idToDf.get(id);
      const box = dfId !== undefined && canvasEl.querySelector(`#node-${dfId}`);
      if (!box) continue;
      box.classList.add("df-has-error");
      const err = box.querySelector(".df-err");
      err.hidden = false;
      err.textContent = `${list[0].field ? list[0].field + ": " : ""}${list[0].message}${list.length > 1 ? ` (+${list.length - 1})` : ""}`;
      if (list.some((e) => e.field === "input")) {
        // graph errors (unknown input, a cycle, a sink used as input): on the port, and on the wires
        // that make them (all the wires into the node when none can be told)
        for (const port of box.querySelectorAll(".input")) port.classList.add("df-bad-input");
        const bad = badWires(id).map(([a, b]) => [st.idToDf.get(a), st.idToDf.get(b)]).filter(([a, b]) => a !== undefined && b !== undefined);
        const wires = bad.length ? bad.map(([a, b]) => `.connection.node_in_node-${b}.node_out_node-${a} .main-path`).join(", ")
          : `.connection.node_in_node-${dfId} .main-path`;
        for (const path of canvasEl.querySelectorAll(wires)) path.classList.add("df-bad-wire");
      }
    }
    // on the form of the selected node: each error under its field (or the nearest enclosing one)
    for (const slot of side.querySelectorAll(".field-error")) { slot.textContent = ""; slot.closest(".field")?.classList.remove("has-error"); }
    const general = side.querySelector('.field-error[data-path=""]');
    for (const e of byNode.get(st.selected) || []) {
      let path = e.field || "";
      let slot = null;
      while (true) {
        slot = side.querySelector(`.field-error[data-path="${CSS.escape(path)}"]`);
        if (slot || !path) break;
        path = path.includes(".") ? path.slice(0, path.lastIndexOf(".")) : "";
      }
      slot = slot || general;
      if (!slot) continue;
      slot.textContent = slot.textContent ? `${slot.textContent}; ${e.message}` : e.message;
      slot.closest(".field")?.classList.add("has-error");
    }
    const loose = mine.filter((e) => !e.node);
    if (loose.length) say(loose.map((e) => `${e.field ? e.field + ": " : ""}${e.message}`).join("; "), "bad");
  }

  // --- deploy -----------------------------------------------------------------------------

  function diffView(text) {
    const pre = h("pre", { class: "ed-diff", id: "ed-diff" });
    for (const line of (text || "").split("\n")) {
      const cls = line.startsWith("+") && !line.startsWith("+++") ? "add" : line.startsWith("-") && !line.startsWith("---") ? "del" : "";
      pre.append(h("span", { class: cls }, line + "\n"));
    }
    return pre;
  }

  function closeDialog() {
    dialog.hidden = true;
    dialog.replaceChildren();
    if (st.toggled) { // an enable/disable not deployed is taken back: it is one action
      const p = st.model.pipelines.find((x) => x.name === st.toggled);
      st.toggled = null;
      if (p) p.enabled = p.enabled === false;
      commit();
      fillPipelines();
    }
  }

  function drawToggle() {
    const p = pipe();
    toggle.hidden = !st.model?.editable || !p;
    if (!p) return;
    const off = p.enabled === false;
    toggle.textContent = off ? "Enable" : "Disable";
    toggle.title = off ? `Start ${p.name} (deploys at once, after the YAML diff)` : `Stop ${p.name}, keeping it in the file (deploys at once, after the YAML diff)`;
    canvasEl.classList.toggle("ed-disabled", off);
  }

  function togglePipeline() {
    const p = pipe();
    if (!p || !st.model.editable) return;
    p.enabled = p.enabled === false;
    st.toggled = p.name;
    commit();
    fillPipelines();
    openDeploy(true);
  }

  async function openDeploy(anyMode = false) {
    if (!st.editable && !(anyMode && st.model?.editable)) return;
    let r;
    clearTimeout(timer);  // validated here and now; no second answer after the dialog opens
    try {
      r = await validate();
    } catch {
      return;
    }
    if (!r.valid && st.toggled) closeDialog();
    if (!r.valid) return say(`fix the ${r.errors.length} error(s) first: deploy is refused while errors remain`, "bad");
    dialog.replaceChildren(h("div", { class: "card" },
      h("h2", {}, r.changed ? "Deploy these changes?" : "No change to the YAML"),
      r.changed ? diffView(r.diff) : h("p", { class: "muted" }, "Only canvas positions will be saved."),
      h("div", { class: "toolbar" },
        h("button", { type: "button", id: "ed-confirm", onclick: () => deploy() }, "Deploy now"),
        h("button", { type: "button", class: "link", onclick: closeDialog }, "Cancel"))));
    dialog.hidden = false;
    dialog.querySelector("#ed-confirm").focus();
  }

  async function deploy() {
    // a validation still scheduled or on its way answers for the draft before this deploy: drop it,
    // or its "not deployed yet" lands after the deploy's own status
    clearTimeout(timer);
    seq++;
    say("deploying…");
    try {
      const r = await post("/api/editor/deploy", { revision: st.revision, model: draft(), positions: st.positions });
      const toggled = st.toggled ? st.model.pipelines.find((x) => x.name === st.toggled) : null;
      st.toggled = null;
      closeDialog();
      st.revision = r.revision;
      for (const p of st.model.pipelines) for (const n of p.nodes) delete n.was;
      const what = ["added", "changed", "removed"].filter((k) => r[k] && r[k].length).map((k) => `${k} ${r[k].join(", ")}`).join("; ");
      if (r.restart_needed) {
        // valid and saved, but only a restart runs it (it may use TLS, which this gateway did not load)
        say(`${r.saved ? "saved, not running yet" : r.note ? "not deployed" : "already saved, not running yet"}: ${r.restart_needed}${r.note ? ` (${r.note})` : ""}`, "warn");
        lastSnap = snapshot();
        return;
      }
      const done = toggled ? `${toggled.name} ${toggled.enabled === false ? "disabled: stopped, kept in the file" : "enabled: running"}` : `deployed${what ? ": " + what : ""}`;
      say(`${done}${r.note ? ` (${r.note})` : ""}`, r.note ? "warn" : "ok");
      lastSnap = snapshot();
    } catch (e) {
      if (!(e instanceof ApiError)) throw e;
      const body = e.body || {};
      if (e.status === 409 && body.error_kind === "revision") {
        dialog.replaceChildren(h("div", { class: "card" },
          h("h2", {}, "The config file changed"),
          h("p", {}, "Someone (another admin, a text edit) changed the file since this editor loaded it. Nothing was overwritten."),
          body.diff ? diffView(body.diff) : null,
          h("div", { class: "toolbar" },
            h("button", { type: "button", id: "ed-reload", onclick: () => { closeDialog(); load(); } }, "Reload from the file (drops your edits)"),
            h("button", { type: "button", class: "link", onclick: closeDialog }, "Keep editing"))));
        dialog.hidden = false;
        say("deploy refused: the file changed", "bad");
      } else if (e.status === 422 && body.errors) {
        closeDialog();
        st.errors = body.errors;
        showErrors();
        say(`deploy refused: ${body.errors.length} error(s)`, "bad");
      } else {
        closeDialog();
        say(`deploy failed: ${e.message}`, "bad");
      }
    }
  }

  // --- the connections section (its own panel; a restart applies it) --------------------------

  async function openConnections() {
    let data;
    try {
      data = await get("/api/editor/connections");
    } catch (e) {
      return say(`could not read the connections: ${e.message}`, "bad");
    }
    const defs = data.schema.$defs || {};
    const props = data.schema.properties;
    const required = new Set(data.schema.required || []);
    const secret = new Set(data.secret);
    const conns = JSON.parse(JSON.stringify(data.connections));
    const list = h("div", { id: "ed-conn-list" });
    const msg = h("p", { id: "ed-conn-msg", class: "muted", role: "status" },
      "Connections are read when the gateway starts: a hot reload changes only pipelines. Saving writes the file; "
      + "restart the gateway to use them. Until then, deploying pipelines is refused.");
    function draw(errors = []) {
      const errAt = (path) => errors.filter((e) => e.field === path).map((e) => e.message).join("; ");
      list.replaceChildren(...Object.entries(conns).map(([name, opts]) => {
        const box = h("fieldset", { class: "field group ed-conn", "data-conn": name }, h("legend", {}, name),
          h("div", { class: "field-error", "data-path": `connections.${name}` }, errAt(`connections.${name}`)));
        for (const [k, raw] of Object.entries(props)) {
          const s = resolve(raw, defs);
          const id = `ed-conn-${name}-${k}`;
          const value = opts[k];
          const choices = enumOf(s);
          let input;
          if (choices) {
            input = h("select", { id }, h("option", { value: "" }, s.default !== undefined ? `(default: ${s.default})` : "(unset)"),
              choices.map((c) => h("option", { value: JSON.stringify(c), selected: value !== undefined && JSON.stringify(value) === JSON.stringify(c) }, String(c))));
            input.addEventListener("change", () => { if (input.value) opts[k] = JSON.parse(input.value); else delete opts[k]; });
          } else if (s.type === "boolean") {
            input = h("input", { id, type: "checkbox", class: "toggle", checked: value === undefined ? !!s.default : !!value });
            input.addEventListener("change", () => { opts[k] = input.checked; });
          } else {
            const num = s.type === "integer" || s.type === "number";
            input = h("input", { id, type: secret.has(k) ? "password" : "text", value: value ?? "", autocomplete: "off",
              inputmode: num ? "decimal" : undefined, placeholder: [s.default !== undefined && s.default !== null ? `default: ${s.default}` : "", num ? boundsText(s) : ""].filter(Boolean).join("; ") });
            input.addEventListener("change", () => {
              const v = input.value.trim();
              if (v === "") delete opts[k];
              else opts[k] = num && NUMBER.test(v) ? Number(v) : v;
            });
          }
          const help = s.description || "";
          box.append(h("label", { class: "field", "data-path": `connections.${name}.${k}` },
            h("span", { class: "fname" }, k, required.has(k) ? h("span", { class: "req", title: "required" }, " *") : null),
            input, help ? h("small", { class: "help" }, help) : null,
            h("div", { class: "field-error", "data-path": `connections.${name}.${k}` }, errAt(`connections.${name}.${k}`))));
        }
        box.append(h("button", { type: "button", class: "small", onclick: () => { delete conns[name]; draw(); } }, `Remove ${name}`));
        return box;
      }));
    }
    const newConn = h("input", { id: "ed-conn-new", placeholder: "new connection name", size: 16, "aria-label": "new connection name" });
    async function save() {
      try {
        const r = await post("/api/editor/connections", { revision: st.revision, connections: conns });
        st.revision = r.revision;
        st.model.connections = Object.fromEntries(Object.entries(conns).map(([k, v]) => [k, { type: v.type ?? null }]));
        msg.className = r.restart_needed ? "warn" : "ok";
        msg.textContent = r.saved
          ? (r.restart_needed ? "Saved. Restart the gateway to use these connections (a hot reload changes only pipelines)." : "Saved.")
          : r.restart_needed ? "No change to the file; the saved connections apply at the next restart." : "No change.";
        say(r.restart_needed ? "connections saved: restart the gateway to apply them" : "connections unchanged", r.restart_needed ? "warn" : "muted");
        draw();
      } catch (e) {
        if (!(e instanceof ApiError)) throw e;
        const errors = (e.body && e.body.errors) || [];
        msg.className = "bad";
        msg.textContent = e.status === 409 ? "The config file changed meanwhile: close, reload the editor and try again." : `Not saved: ${errors.length ? errors.map((x) => `${x.field}: ${x.message}`).join("; ") : e.message}`;
        draw(errors);
      }
    }
    draw();
    dialog.replaceChildren(h("div", { class: "card" }, h("h2", {}, "Connections"), msg, list,
      h("div", { class: "toolbar" }, newConn,
        h("button", { type: "button", class: "small", id: "ed-conn-add", onclick: () => {
          const n = newConn.value.trim();
          if (!/^[A-Za-z_][A-Za-z0-9_-]*$/.test(n) || conns[n]) return;
          conns[n] = { type: "mqtt" };
          newConn.value = "";
          draw();
        } }, "Add connection")),
      h("div", { class: "toolbar" },
        h("button", { type: "button", id: "ed-conn-save", onclick: save }, "Validate and save"),
        h("button", { type: "button", class: "link", onclick: closeDialog }, "Close"))));
    dialog.hidden = false;
  }

  // --- import / export of one pipeline as YAML ------------------------------------------------

  function openExport() {
    get(`/api/editor/pipelines/${encodeURIComponent(st.current)}`).then((text) => {
      const area = h("textarea", { id: "ed-export-text", class: "code", rows: 16, readonly: true, spellcheck: "false" });
      area.value = text;
      dialog.replaceChildren(h("div", { class: "card" }, h("h2", {}, `Pipeline ${st.current} (as saved)`), area,
        h("div", { class: "toolbar" },
          h("button", { type: "button", onclick: () => { area.select(); navigator.clipboard?.writeText(area.value); say("copied"); } }, "Copy"),
          h("button", { type: "button", class: "link", onclick: closeDialog }, "Close"))));
      dialog.hidden = false;
    }, (e) => say(e.status === 404 ? `${st.current} is not saved yet: deploy it first` : `export failed: ${e.message}`, "bad"));
  }

  function openImport() {
    const area = h("textarea", { id: "ed-import-text", class: "code", rows: 16, spellcheck: "false",
      placeholder: "- name: my_pipeline\n  nodes:\n    - {id: src, type: simulate, sensors: [{key: t}]}" });
    const err = h("p", { class: "bad", id: "ed-import-error" });
    dialog.replaceChildren(h("div", { class: "card" }, h("h2", {}, "Import a pipeline"),
      h("p", { class: "muted" }, "Paste one pipeline's YAML (as Export gives it). It is added to the draft; deploy to run it."),
      area, err,
      h("div", { class: "toolbar" },
        h("button", { type: "button", id: "ed-import-go", onclick: async () => {
          try {
            const r = await post("/api/editor/import", { yaml: area.value });
            if (!r.pipeline) { err.textContent = r.error; return; }
            const p = r.pipeline;
            if (st.model.pipelines.some((x) => x.name === p.name)) { err.textContent = `there is already a pipeline ${p.name}`; return; }
            st.model.pipelines.push(p);
            st.current = p.name;
            fillPipelines();
            closeDialog();
            commit();
            rebuild();
            fit();
            say(`imported ${p.name}: not deployed yet`);
          } catch (e) {
            err.textContent = e.message;
          }
        } }, "Import"),
        h("button", { type: "button", class: "link", onclick: closeDialog }, "Cancel"))));
    dialog.hidden = false;
    area.focus();
  }

  // --- live rates and the console panel --------------------------------------------------

  function onStats(msg) {
    const p = (msg.detail || []).find((d) => d.name === st.current);
    st.live = new Map(p ? p.nodes.map((n) => [n.id, n]) : []);
    drawLive();
    if (!p) return;
    const now = msg.ts || Date.now() / 1000;
    for (const n of p.nodes) {
      const key = `${p.name}/${n.id}`;
      const prev = st.rates.get(key);
      const count = n.kind === "sink" ? n.counters.in : n.counters.out;
      st.rates.set(key, { count, ts: now });
      const dfId = st.idToDf.get(n.id);
      const box = dfId !== undefined && canvasEl.querySelector(`#node-${dfId} .df-rate`);
      if (!box || !prev || now <= prev.ts) continue;
      const rate = Math.max(0, (count - prev.count) / (now - prev.ts));
      let text = `${rate < 10 ? rate.toFixed(1) : Math.round(rate)}/s`;
      if (n.counters.errors) text += ` · err ${n.counters.errors}`;
      if (n.counters.dropped) text += ` · drop ${n.counters.dropped}`;
      if (n.queue && n.queue.depth) text += ` · q ${n.queue.depth}`;
      box.textContent = text;
    }
  }

  function onConsole(msg) {
    if (st.paused) return;
    for (const item of msg.events) {
      const key = `${item.pipeline}/${item.node}`;
      if (!st.console.has(key)) st.console.set(key, []);
      const list = st.console.get(key);
      list.push(item);
      if (list.length > HISTORY) list.splice(0, list.length - HISTORY);
      if (!st.consoleTab) st.consoleTab = key;
    }
    if (msg.dropped) consolePanel.dataset.dropped = msg.dropped;
    drawConsole();
  }

  function drawConsole() {
    consoleTabs.replaceChildren(...[...st.console.keys()].map((key) => {
      const first = st.console.get(key)[0];
      return h("button", { type: "button", role: "tab", class: `small tab${key === st.consoleTab ? " active" : ""}`, "aria-selected": String(key === st.consoleTab),
        onclick: () => { st.consoleTab = key; drawConsole(); } }, first ? `${first.label} (${first.pipeline})` : key);
    }));
    const list = st.console.get(st.consoleTab) || [];
    consoleBody.replaceChildren(...list.slice(-50).reverse().map((item) => {
      const ev = item.event;
      const text = st.pretty ? JSON.stringify(ev.value, rounded, 2) : JSON.stringify(ev.value);
      return h("div", { class: "ed-line" }, h("span", { class: "muted" }, `${new Date(ev.ts * 1000).toLocaleTimeString()} ${ev.key} `), h("pre", {}, text));
    }));
  }

  // --- keyboard ---------------------------------------------------------------------------

  // While the canvas has the focus (Tab), or was clicked last with nothing focused since (a click
  // does not focus it: Drawflow keeps the focus where it was), the arrow keys pan it (Shift: most
  // of a screen) and + / - zoom around its centre, in view mode too: the keyboard's wheel and
  // Ctrl+wheel. A field keeps its own arrows and characters.
  function canvasKey(e) {
    const df = st.df;
    if (!df) return false;
    const sx = e.shiftKey ? canvasEl.clientWidth * 0.8 : PAN_STEP;
    const sy = e.shiftKey ? canvasEl.clientHeight * 0.8 : PAN_STEP;
    const pan = { ArrowLeft: [sx, 0], ArrowRight: [-sx, 0], ArrowUp: [0, sy], ArrowDown: [0, -sy] }[e.key];
    if (pan) setView(df.zoom, df.canvas_x + pan[0], df.canvas_y + pan[1]);
    else if (e.key === "+" || e.key === "=") df.zoom_in();
    else if (e.key === "-") df.zoom_out();
    else return false;
    return true;
  }

  function onKey(e) {
    const typing = /^(INPUT|TEXTAREA|SELECT)$/.test(e.target.tagName);
    const mod = e.ctrlKey || e.metaKey;
    if (mod && e.key.toLowerCase() === "s") { e.preventDefault(); openDeploy(); return; }
    if (e.key === "Escape" && !dialog.hidden) { closeDialog(); return; }
    const onCanvas = e.target === canvasEl || (e.target === document.body && st.canvasClicked);
    if (onCanvas && !mod && !e.altKey && canvasKey(e)) { e.preventDefault(); return; }
    if (typing || !st.editable && !["f", "/"].includes(e.key)) return;
    if (mod && e.key.toLowerCase() === "z" && !e.shiftKey) { e.preventDefault(); undo(); }
    else if (mod && (e.key.toLowerCase() === "y" || (e.key.toLowerCase() === "z" && e.shiftKey))) { e.preventDefault(); redo(); }
    else if (mod && e.key.toLowerCase() === "c") copySelected();
    else if (mod && e.key.toLowerCase() === "v") paste();
    else if (e.key === "/") { e.preventDefault(); locate.focus(); }
    else if (e.key === "f" && !mod) fit();
    else if (e.key === "l" && !mod && st.editable) { autoLayout(true); commit(); rebuild(); fit(); }
    else if (e.key === "Delete" && document.activeElement !== canvasEl) {
      // a clicked wire: clicking it does not move the focus to the canvas, whose own key handler
      // (Drawflow's) would remove it
      if (st.df && st.df.connection_selected) st.df.removeConnection();
      else deleteSelected();
    }
  }
  document.addEventListener("keydown", onKey);
  const onPointer = (e) => { st.canvasClicked = canvasEl.contains(e.target); };
  document.addEventListener("pointerdown", onPointer, true);
  // the canvas changes size with the window and the layout (phone, tablet): fit the pipeline again
  // (only when its size did change: the observer's first call comes after the first Fit, and a pan
  // made in between is not to be undone)
  let resizeTimer = null;
  const onResize = () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => { if (canvasEl.dataset.fitted !== `${canvasEl.clientWidth}x${canvasEl.clientHeight}`) fit(); }, 100);
  };
  const resizeObserver = new ResizeObserver(onResize);
  resizeObserver.observe(canvasEl);
  locate.addEventListener("change", () => locateNode(locate.value));

  // --- loading ----------------------------------------------------------------------------

  function fillPipelines() {
    pipeSel.replaceChildren(...st.model.pipelines.map((p) =>
      h("option", { value: p.name, selected: p.name === st.current }, p.enabled === false ? `${p.name} (disabled)` : p.name)));
    drawToggle();
  }
  pipeSel.addEventListener("change", () => { st.current = pipeSel.value; st.selected = null; rebuild(); fit(); showErrors(); drawToggle(); });

  async function load() {
    const [pal, model] = await Promise.all([get("/api/editor/palette"), get("/api/editor/model")]);
    if (st.stopped) return;
    st.palette = pal;
    st.types = new Map(pal.families.flatMap((f) => f.types.filter((t) => !t.unavailable).map((t) => [t.type, t])));
    st.off = new Map(pal.families.flatMap((f) => f.types.filter((t) => t.unavailable).map((t) => [t.type, t.unavailable])));
    st.model = model;
    st.revision = model.revision;
    st.positions = model.positions || {};
    // a phone gets the view mode (editing is for tablet and desktop); admins keep enable/disable
    st.editable = model.editable && ctx.me && ctx.me.role !== "viewer" && !PHONE.matches;
    root.classList.toggle("ed-view", !st.editable);
    st.current = (model.pipelines.find((p) => p.name === st.current) || model.pipelines[0] || {}).name || null;
    st.undo = [];
    st.redo = [];
    st.errors = [];
    lastSnap = snapshot();
    st.df.editor_mode = st.editable ? "edit" : "view";
    fillPipelines();
    drawPalette();
    rebuild();
    fit();
    const ro = model.pipelines.flatMap((p) => p.nodes.filter((n) => n.readonly).map((n) => `${p.name}/${n.id}`));
    say(ro.length ? `read-only here (edit in YAML): ${ro.join(", ")}` : st.editable ? "ready" : "view only", ro.length ? "warn" : "muted");
  }

  const offs = [];
  loadDrawflow().then(() => {
    if (st.stopped) return;
    const df = new window.Drawflow(canvasEl);
    df.reroute = false;
    // A wire going back (into a node left of where it starts, as a cycle's does) loops under the
    // nodes, as in Node-RED, instead of running straight back over them and the wires it crosses,
    // where it could be neither seen nor clicked.
    const curve = df.createCurvature.bind(df);
    df.createCurvature = (sx, sy, ex, ey, c, type) => {
      if (ex >= sx) return curve(sx, sy, ex, ey, c, type);
      const out = 40, low = Math.max(sy, ey) + NODE_H;
      return ` M ${sx} ${sy} C ${sx + out} ${sy} ${sx + out} ${low} ${sx} ${low} L ${ex} ${low} C ${ex - out} ${low} ${ex - out} ${ey} ${ex} ${ey}`;
    };
    df.start();
    st.df = df;
    wire(df);
    offs.push(on("stats", onStats), subscribe("stats"), on("console", onConsole), subscribe("console"));
    return load();
  }).catch((e) => say(`could not open the editor: ${e.message}`, "bad"));

  return {
    stop() {
      st.stopped = true;
      clearTimeout(timer);
      document.removeEventListener("keydown", onKey);
      document.removeEventListener("pointerdown", onPointer, true);
      document.removeEventListener("mousemove", onBandMove);
      document.removeEventListener("mouseup", onBandUp);
      resizeObserver.disconnect();
      for (const off of offs) off();
    },
  };
}
