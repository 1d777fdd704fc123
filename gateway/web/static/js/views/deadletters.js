// Dead letters: recent rejected inputs with their reasons.
import { get, h } from "../api.js";

export function start(el) {
  const body = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  const reload = h("button", { type: "button", onclick: load }, "Refresh");
  el.append(h("h1", {}, "Dead letters ", reload), body);
  async function load() {
    try {
      const d = await get("/api/deadletters?limit=200");
      body.replaceChildren(
        h("p", {}, `${d.total} in total; the most recent first.`),
        d.recent.length
          ? h("div", { class: "scroll" }, h("table", { id: "deadletters" },
              h("tr", {}, ["Time", "Pipeline", "Node", "Key", "Reason", "Input"].map((t) => h("th", {}, t))),
              d.recent.map((r) => h("tr", {},
                h("td", { class: "nowrap" }, r.ts ? new Date(r.ts * 1000).toLocaleString() : ""),
                h("td", {}, r.pipeline || ""), h("td", {}, r.node || ""), h("td", {}, r.key || ""),
                h("td", {}, r.reason || ""), h("td", {}, h("code", {}, r.payload || ""))))))
          : h("p", { class: "muted" }, "Nothing rejected so far."),
      );
    } catch (e) {
      body.replaceChildren(h("p", { class: "error" }, e.message));
    }
  }
  load();
}
