// Alerts: the list with state and severity filters, updated as steps are pushed; admins acknowledge and resolve.
import { ApiError, get, h, post } from "../api.js";
import { on, subscribe } from "../live.js";

const when = (t) => (t ? new Date(t * 1000).toLocaleString() : "");

export function start(el, { me }) {
  const state = h("select", { id: "alert-state", "aria-label": "state" },
    ["", "open", "acknowledged", "resolved"].map((s) => h("option", { value: s }, s || "any state")));
  const severity = h("select", { id: "alert-severity", "aria-label": "severity" },
    ["", "critical", "warning", "info"].map((s) => h("option", { value: s }, s || "any severity")));
  const summary = h("span", { class: "muted", id: "alert-summary" });
  const body = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  el.append(h("h1", {}, "Alerts"), h("div", { class: "toolbar" }, state, severity, summary), body);
  let busy = false, again = false;

  async function act(a, action) {
    try {
      await post(`/api/alerts/${a.id}/${action}`, {});
    } catch (e) {
      body.prepend(h("p", { class: "error" }, e.message));
    }
    load();
  }

  async function load() {
    if (busy) { again = true; return; } // a step pushed mid-load gets its own reload after this one
    busy = true;
    const q = new URLSearchParams({ limit: "200" });
    if (state.value) q.set("state", state.value);
    if (severity.value) q.set("severity", severity.value);
    try {
      const d = await get(`/api/alerts?${q}`);
      summary.textContent = Object.entries(d.summary || {}).map(([k, v]) => `${v} ${k}`).join(" · ");
      body.replaceChildren(d.alerts.length
        ? h("div", { class: "scroll" }, h("table", { id: "alerts" },
            h("tr", {}, ["Opened", "Severity", "State", "Pipeline", "Key", "Rule", "Reading", "Count", "By", ""]
              .map((t) => h("th", {}, t))),
            d.alerts.map((a) => h("tr", { "data-alert": a.id, class: `sev-${a.severity}` },
              h("td", { class: "nowrap" }, when(a.opened_at)),
              h("td", { class: a.severity === "critical" ? "bad" : a.severity === "warning" ? "warn" : "" }, a.severity),
              h("td", { class: "state" }, a.state),
              h("td", {}, a.pipeline || ""), h("td", {}, a.key || a.alert_key || ""),
              h("td", {}, a.rule || ""), h("td", { class: "num" }, a.reading ?? ""),
              h("td", { class: "num" }, a.count ?? ""),
              h("td", { class: "muted" }, a.resolved_by || a.acked_by || ""),
              h("td", { class: "nowrap" }, me.role === "admin" && a.state !== "resolved" ? [
                a.state === "open" ? h("button", { type: "button", class: "small ack", onclick: () => act(a, "ack") }, "Ack") : null,
                h("button", { type: "button", class: "small resolve", onclick: () => act(a, "resolve") }, "Resolve"),
              ] : null)))))
        : h("p", { class: "muted" }, "No alerts."));
    } catch (e) {
      body.replaceChildren(h("p", { class: "error" },
        e instanceof ApiError && e.status === 404 ? "This gateway has no alert store." : e.message));
    } finally {
      busy = false;
      if (again) { again = false; load(); }
    }
  }
  state.addEventListener("change", load);
  severity.addEventListener("change", load);
  load();
  // Every lifecycle step is pushed on the `alerts` topic: reload at once (a burst makes one reload).
  let pushed = null;
  const offAlert = on("alert", () => {
    if (pushed) return;
    pushed = setTimeout(() => { pushed = null; last = Date.now(); load(); }, 200);
  });
  const unsubAlerts = subscribe("alerts");
  // the fallback: refresh with the stats tick, at most every 5 s, in case a push was lost
  let last = Date.now();
  const off = on("stats", () => { if (Date.now() - last > 5000) { last = Date.now(); load(); } });
  const unsub = subscribe("stats");
  return { stop() { off(); unsub(); offAlert(); unsubAlerts(); if (pushed) clearTimeout(pushed); } };
}
