// The one WebSocket to /ws: subscriptions survive reconnects (capped, jittered backoff).
import { csrfToken, get, h } from "./api.js";

const listeners = new Map(); // type -> Set(fn)
const subs = new Map(); // json key -> message
let ws = null;
let attempt = 0;
let stateFn = () => {};

export function onState(fn) {
  stateFn = fn;
}

export function on(type, fn) {
  if (!listeners.has(type)) listeners.set(type, new Set());
  listeners.get(type).add(fn);
  return () => listeners.get(type).delete(fn);
}

function send(msg) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(msg));
}

export function subscribe(topic, extra = {}) {
  const msg = { op: "subscribe", topic, ...extra };
  subs.set(JSON.stringify([topic, extra]), msg);
  send(msg);
  return () => {
    subs.delete(JSON.stringify([topic, extra]));
    send({ op: "unsubscribe", topic, ...extra });
  };
}

export function connect() {
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  ws = new WebSocket(`${proto}//${location.host}/ws?csrf=${encodeURIComponent(csrfToken() || "")}`);
  stateFn("connecting");
  ws.addEventListener("open", () => {
    attempt = 0;
    stateFn("live");
    for (const msg of subs.values()) send(msg);
  });
  ws.addEventListener("message", (e) => {
    let msg;
    try { msg = JSON.parse(e.data); } catch { return; }
    for (const fn of listeners.get(msg.type) || []) fn(msg);
  });
  ws.addEventListener("close", () => {
    stateFn("offline");
    const delay = Math.min(30000, 500 * 2 ** attempt) * (0.5 + Math.random() / 2);
    attempt++;
    setTimeout(connect, delay);
  });
}

// The node picker of a page that shows one node's events (Live events, Charts): fills `select`
// with every node, by pipeline; taps the chosen node's events (one node at a time); keeps the
// choice in the address (#/<route>/<pipeline>/<node>), and takes it from there (`args`) at load.
// Returns what ends the tap.
export function tapPicker(select, route, args) {
  let unsub = null;
  function choose(value) {
    if (unsub) unsub();
    unsub = null;
    if (!value) return;
    const [pipeline, node] = JSON.parse(value);
    unsub = subscribe("events", { pipeline, node });
    location.replace(`#/${route}/${encodeURIComponent(pipeline)}/${encodeURIComponent(node)}`);
  }
  select.addEventListener("change", () => choose(select.value));
  get("/api/pipelines").then((d) => {
    select.append(h("option", { value: "" }, "choose a node…"));
    for (const p of d.pipelines) {
      select.append(h("optgroup", { label: p.name },
        p.nodes.map((n) => h("option", { value: JSON.stringify([p.name, n.id]) }, `${n.id} (${n.type})`))));
    }
    if (args.length === 2) {
      select.value = JSON.stringify(args);
      choose(select.value);
    }
  });
  return () => { if (unsub) unsub(); };
}
