// Alerts: the list with state and severity filters, updated as steps are pushed; admins acknowledge and resolve.
import { ApiError, get, h, post } from "../api.js";
import { on, subscribe } from "../live.js";

const when = (t) => (t ? new Date(t * 1000).toLocaleString() : "");
// a time of today as the time alone, otherwise date and time
const short = (t) => {
  const d = new Date(t * 1000);
  return d.toDateString() === new Date().toDateString() ? d.toLocaleTimeString() : d.toLocaleString();
};
const nf = new Intl.NumberFormat(undefined, { maximumFractionDigits: 2 });
// A reading as shown: numbers rounded to 2 decimals (199.32080000000002 -> 199.32), objects field by field.
export const reading = (v) => {
  if (typeof v === "number") return nf.format(v);
  if (v && typeof v === "object") return Object.entries(v).map(([k, x]) => `${k}: ${reading(x)}`).join(", ");
  return v ?? "";
};

export function start(el, { me }) {
  const state = h("select", { id: "alert-state", "aria-label": "state" },
    ["", "open", "acknowledged", "resolved"].map((s) => h("option", { value: s }, s || "any state")));
  const severity = h("select", { id: "alert-severity", "aria-label": "severity" },
    ["", "critical", "warning", "info"].map((s) => h("option", { value: s }, s || "any severity")));
  const summary = h("span", { class: "muted", id: "alert-summary" });
  const body = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  const hint = h("p", { class: "muted", id: "alert-hint" });
  el.append(h("h1", {}, "Alerts"), h("div", { class: "toolbar" }, state, severity, summary), hint, body);
  let busy = false, again = false;

  // Ack and Resolve ask for an optional note in a row under the alert, then post it.
  function ask(a, action, row) {
    row.parentNode.querySelectorAll("tr.act-form").forEach((r) => r.remove());
    const note = h("input", { type: "text", class: "note", placeholder: "note (optional)", "aria-label": "note" });
    const label = action === "ack" ? "Ack" : "Resolve";
    const form = h("tr", { class: "act-form" }, h("td", { colspan: "12" },
      h("form", { class: "toolbar", onsubmit: (ev) => { ev.preventDefault(); form.remove(); act(a, action, note.value.trim()); } },
        note,
        h("button", { type: "submit", class: "small confirm" }, label),
        h("button", { type: "button", class: "small secondary", onclick: () => { form.remove(); load(); } }, "Cancel"))));
    row.after(form);
    note.focus();
  }

  async function act(a, action, note) {
    try {
      await post(`/api/alerts/${a.id}/${action}`, note ? { note } : {});
    } catch (e) {
      body.prepend(h("p", { class: "error" }, e.message));
    }
    load();
  }

  // Who acted on the alert, kept across a re-raise; the latest step first.
  const history = (a) => {
    const steps = a.actions || [];
    if (!steps.length) return a.resolved_by || a.acked_by || "";
    return steps.slice().reverse().map((x) =>
      `${x.action}${x.by ? " by " + x.by : ""}, ${short(x.at)}${x.note ? `\n“${x.note}”` : ""}`).join("\n");
  };

  async function note() {
    // Alerts reach this page only through an `alert` node; say which pipelines have none.
    try {
      const d = await get("/api/pipelines");
      const without = d.pipelines.filter((p) => !p.nodes.some((n) => n.type === "alert")).map((p) => p.name);
      hint.replaceChildren(...(without.length ? [
        "Alerts are listed here only from pipelines with an ", h("code", {}, "alert"), " node. Without one: ",
        h("strong", {}, without.join(", ")),
        " (their alerts still go out through their sinks, e.g. MQTT and the log)."] : []));
    } catch (e) { /* the list below shows the error */ }
  }

  async function load() {
    if (busy) { again = true; return; } // a step pushed mid-load gets its own reload after this one
    if (body.querySelector("tr.act-form")) return; // not while a note is being typed; it reloads after
    busy = true;
    const q = new URLSearchParams({ limit: "200" });
    if (state.value) q.set("state", state.value);
    if (severity.value) q.set("severity", severity.value);
    try {
      const d = await get(`/api/alerts?${q}`);
      summary.textContent = Object.entries(d.summary || {}).map(([k, v]) => `${v} ${k}`).join(" · ");
      const admin = me.role === "admin";
      body.replaceChildren(d.alerts.length
        ? h("div", { class: "scroll" }, h("table", { id: "alerts" },
            h("tr", {}, [admin ? "" : null, "Opened", "Severity", "State", "Condition", "Pipeline", "Key", "Rule",
              "Reading", "Count", "By"].filter((t) => t !== null).map((t) => h("th", {}, t))),
            d.alerts.map((a) => {
              const row = h("tr", { "data-alert": a.id, class: `sev-${a.severity}` },
                // the actions come first, so that they are on screen on a phone without scrolling sideways
                admin ? h("td", { class: "nowrap actions" }, a.state !== "resolved" ? [
                  a.state === "open" ? h("button", { type: "button", class: "small ack", onclick: () => ask(a, "ack", row) }, "Ack") : null,
                  h("button", { type: "button", class: "small resolve", onclick: () => ask(a, "resolve", row) }, "Resolve"),
                ] : null) : null,
                h("td", { class: "nowrap", title: when(a.opened_at) }, short(a.opened_at)),
                h("td", { class: a.severity === "critical" ? "bad" : a.severity === "warning" ? "warn" : "" }, a.severity),
                h("td", { class: "state" }, a.state),
                h("td", { class: `condition ${a.condition === "active" ? "bad" : "muted"}` },
                  a.condition === "active" ? "active" : a.condition === "cleared" ? "cleared" : a.condition || ""),
                h("td", {}, a.pipeline || ""), h("td", {}, a.key || a.alert_key || ""),
                h("td", {}, a.rule || ""), h("td", { class: "num reading" }, reading(a.reading)),
                h("td", { class: "num" }, a.count ?? ""),
                h("td", { class: "muted by", title: a.note || "" }, history(a)));
              return row;
            })))
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
  note();
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
