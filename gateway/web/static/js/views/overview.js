// Overview: gateway status, uptime, resources, broker links and each pipeline's health.
import { fmtBytes, fmtDuration, get, h } from "../api.js";
import { on, subscribe } from "../live.js";

function card(label, value, cls = "") {
  return h("div", { class: `card stat ${cls}` }, h("div", { class: "label" }, label), h("div", { class: "value" }, value));
}

function render(el, d) {
  const g = d.gateway, s = d.system;
  document.getElementById("gw-name").textContent = g.gateway_id;
  const links = Object.entries(g.connections || {});
  el.replaceChildren(...[
    h("h1", {}, "Overview"),
    h("section", { class: "cards" },
      card("Status", g.status, g.status === "ok" ? "ok" : "bad"),
      card("Uptime", fmtDuration(g.uptime)),
      card("CPU", `${s.cpu_percent.toFixed(0)} % (${s.cpus} cores)`),
      card("Memory", `${s.memory.percent.toFixed(0)} %`),
      card("Disk (data)", s.disk ? `${s.disk.percent.toFixed(0)} %` : "–"),
      card("Sluice RSS", fmtBytes(s.process.rss)),
      card("Dead letters", String(g.dead_letters), g.dead_letters ? "warn" : ""),
      g.outbox ? card("Outbox", `${g.outbox.messages} waiting${g.outbox.dropped ? `, ${g.outbox.dropped} dropped` : ""}`,
        g.outbox.dropped ? "bad" : g.outbox.messages ? "warn" : "") : null,
    ),
    g.problems.length ? h("ul", { class: "problems" }, g.problems.map((p) => h("li", {}, p))) : null,
    h("h2", {}, "Broker links"),
    links.length
      ? h("div", { class: "scroll" }, h("table", {}, h("tr", {}, h("th", {}, "Connection"), h("th", {}, "State"), h("th", {}, "Detail")),
          links.map(([name, l]) => h("tr", { class: "link-row" }, h("td", {}, name),
            h("td", { class: l.state === "connected" ? "ok" : "bad" }, l.state || "–"),
            h("td", { class: "muted" }, l.error || "")))))
      : h("p", { class: "muted" }, "No connections configured."),
    h("h2", {}, "Pipelines"),
    h("div", { class: "scroll" }, h("table", { id: "pipelines" },
      h("tr", {}, ["Pipeline", "Health", "Nodes", "In", "Out", "Errors", "Queued", "Dead letters"].map((t) => h("th", {}, t))),
      d.pipelines.map((p) => h("tr", { "data-pipeline": p.name },
        h("td", {}, h("a", { href: `#/editor/${encodeURIComponent(p.name)}` }, p.name)),
        h("td", { class: p.health === "ok" ? "ok" : "bad" }, p.health),
        h("td", {}, String(p.nodes)),
        h("td", { class: "num events-in" }, String(p.events_in)),
        h("td", { class: "num" }, String(p.events_out)),
        h("td", { class: "num" }, String(p.errors)),
        h("td", { class: "num" }, String(p.queue_depth)),
        h("td", { class: "num" }, String(p.dead_letters)))))),
  ].filter(Boolean));
}

async function renderAlerts(box) {
  let d;
  try {
    d = await get("/api/alerts?state=open&limit=5");
  } catch {
    box.replaceChildren();  // no alert store on this gateway
    return;
  }
  box.replaceChildren(h("h2", {}, h("a", { href: "#/alerts" }, "Open alerts")),
    d.alerts.length
      ? h("ul", { id: "open-alerts" }, d.alerts.map((a) => h("li", {},
          h("span", { class: a.severity === "critical" ? "bad" : a.severity === "warning" ? "warn" : "" }, a.severity),
          ` ${a.pipeline} · ${a.key || a.alert_key} · ${a.rule || ""}`)))
      : h("p", { class: "muted" }, "None."));
}

export function start(el) {
  const main = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  const alertsBox = h("section", { id: "overview-alerts" });
  el.append(main, alertsBox);
  get("/api/overview").then((d) => render(main, d)).catch((e) => main.replaceChildren(h("p", { class: "error" }, e.message)));
  renderAlerts(alertsBox);
  let last = Date.now();
  const off = on("stats", (d) => {
    render(main, d);
    if (Date.now() - last > 5000) { last = Date.now(); renderAlerts(alertsBox); }
  });
  const unsub = subscribe("stats");
  return { stop() { off(); unsub(); } };
}
