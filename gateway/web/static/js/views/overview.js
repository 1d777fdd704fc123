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
        h("td", {}, h("a", { href: `#/graph/${encodeURIComponent(p.name)}` }, p.name)),
        h("td", { class: p.health === "ok" ? "ok" : "bad" }, p.health),
        h("td", {}, String(p.nodes)),
        h("td", { class: "num events-in" }, String(p.events_in)),
        h("td", { class: "num" }, String(p.events_out)),
        h("td", { class: "num" }, String(p.errors)),
        h("td", { class: "num" }, String(p.queue_depth)),
        h("td", { class: "num" }, String(p.dead_letters)))))),
  ].filter(Boolean));
}

export function start(el) {
  el.append(h("p", { class: "muted" }, "Loading…"));
  get("/api/overview").then((d) => render(el, d)).catch((e) => el.replaceChildren(h("p", { class: "error" }, e.message)));
  const off = on("stats", (d) => render(el, d));
  const unsub = subscribe("stats");
  return { stop() { off(); unsub(); } };
}
