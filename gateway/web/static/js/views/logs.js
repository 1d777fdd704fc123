// Logs: the gateway's recent log lines, newest first, by level; live (refetched with the stats
// tick, at most every 2 s) unless paused.
import { get, h } from "../api.js";
import { on, subscribe } from "../live.js";

export function start(el) {
  const level = h("select", { id: "log-level", "aria-label": "level" },
    ["", "debug", "info", "warning", "error", "critical"].map((l) => h("option", { value: l }, l || "every level")));
  const reload = h("button", { type: "button", id: "log-refresh" }, "Refresh");
  const live = h("input", { type: "checkbox", id: "log-live", checked: true });
  const body = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  el.append(h("h1", {}, "Logs"), h("div", { class: "toolbar" }, level, reload,
    h("label", { class: "inline" }, live, " live")), body);
  let busy = false, last = 0;
  async function load() {
    if (busy) return;
    busy = true;
    last = Date.now();
    try {
      const d = await get(`/api/logs${level.value ? `?level=${level.value}` : ""}`);
      const lines = d.lines.slice().reverse();
      body.replaceChildren(lines.length
        ? h("div", { class: "scroll" }, h("table", { id: "logs" },
            h("tr", {}, ["Time", "Level", "Logger", "Message"].map((t) => h("th", {}, t))),
            lines.map((l) => h("tr", {},
              h("td", { class: "nowrap" }, new Date(l.ts * 1000).toLocaleString()),
              h("td", { class: l.level === "error" || l.level === "critical" ? "bad" : l.level === "warning" ? "warn" : "" }, l.level),
              h("td", { class: "muted" }, l.logger || ""),
              h("td", { class: "msg" }, h("code", {}, l.message || l.msg || ""))))))
        : h("p", { class: "muted" }, "No log lines."));
    } catch (e) {
      body.replaceChildren(h("p", { class: "error" }, e.message));
    } finally {
      busy = false;
    }
  }
  level.addEventListener("change", load);
  reload.addEventListener("click", load);
  load();
  const off = on("stats", () => { if (live.checked && Date.now() - last >= 2000) load(); });
  const unsub = subscribe("stats");
  return { stop() { off(); unsub(); } };
}
