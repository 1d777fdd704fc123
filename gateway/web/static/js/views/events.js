// Live events: a pausable, filterable tail of what one node emits.
import { h } from "../api.js";
import { on, tapPicker } from "../live.js";

const KEEP = 200;

export function start(el, { args }) {
  const select = h("select", { id: "tap-node", "aria-label": "node" });
  const filter = h("input", { id: "tap-filter", placeholder: "filter by key or value", type: "search" });
  const pause = h("button", { type: "button", id: "tap-pause" }, "Pause");
  const status = h("span", { class: "muted", id: "tap-status" });
  const tbody = h("tbody", { id: "tap-rows" });
  el.append(h("h1", {}, "Live events"),
    h("div", { class: "toolbar" }, select, filter, pause, status),
    h("div", { class: "scroll" }, h("table", { class: "events" },
      h("thead", {}, h("tr", {}, ["Time", "Key", "Value", "Source"].map((t) => h("th", {}, t)))), tbody)));
  let paused = false, seen = 0, skipped = 0;
  const rows = [];

  function show(ev) {
    const text = `${ev.key} ${JSON.stringify(ev.value)}`;
    const tr = h("tr", {}, h("td", { class: "nowrap" }, new Date(ev.ts * 1000).toLocaleTimeString()),
      h("td", {}, ev.key), h("td", {}, h("code", {}, JSON.stringify(ev.value))), h("td", { class: "muted" }, ev.source));
    tr.dataset.text = text.toLowerCase();
    tr.hidden = !matches(tr);
    tbody.prepend(tr);
    rows.push(tr);
    while (rows.length > KEEP) rows.shift().remove();
  }
  const matches = (tr) => !filter.value || tr.dataset.text.includes(filter.value.toLowerCase());
  filter.addEventListener("input", () => rows.forEach((tr) => { tr.hidden = !matches(tr); }));
  pause.addEventListener("click", () => {
    paused = !paused;
    pause.textContent = paused ? "Resume" : "Pause";
  });


  const off = on("events", (m) => {
    seen += m.events.length;
    skipped += m.skipped || 0;
    status.textContent = `${seen} shown${skipped ? `, ${skipped} skipped (rate limit)` : ""}`;
    if (!paused) m.events.forEach(show);
  });

  const untap = tapPicker(select, "events", args);
  return { stop() { off(); untap(); } };
}
