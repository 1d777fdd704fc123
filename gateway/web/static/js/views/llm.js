// LLM: the live token stream of the llm nodes (every chunk, from the `llm` topic), their admission
// queues, sheds by reason and tokens per second (the `llm_stats` message, once a second).
import { h } from "../api.js";
import { on, subscribe } from "../live.js";

const KEEP = 20; // answers kept on the page, newest first
const MAX_TEXT = 8000; // characters kept per answer: a runaway model must not grow the page forever

const fmt = (v, d = 1) => (v === null || v === undefined ? "–" : Number(v).toFixed(d));

export function start(el) {
  const nodesBox = h("div", { id: "llm-nodes" }, h("p", { class: "muted" }, "Waiting for the first statistics…"));
  const dropped = h("span", { class: "muted", id: "llm-dropped" });
  const stream = h("div", { id: "llm-stream" }, h("p", { class: "muted", id: "llm-empty" }, "No tokens yet: answers appear here as the model writes them."));
  el.append(h("h1", {}, "LLM"), nodesBox, h("h2", {}, "Live answers ", dropped), stream);

  const answers = new Map(); // "pipeline/node/request" -> {box, text, status}

  function answer(c) {
    const id = `${c.pipeline}/${c.node}/${c.request}`;
    let a = answers.get(id);
    if (!a) {
      const text = h("pre", { class: "llm-text" });
      const status = h("span", { class: "llm-status muted" }, "streaming…");
      const box = h("div", { class: "card llm-answer", "data-request": id },
        h("div", { class: "toolbar" }, h("strong", {}, c.key), h("span", { class: "muted" }, `${c.pipeline}/${c.node}`),
          c.provider ? h("span", { class: "muted" }, c.provider) : null, status),
        text);
      a = { box, text, status, chars: 0 };
      answers.set(id, a);
      const empty = document.getElementById("llm-empty");
      if (empty) empty.remove();
      stream.prepend(box);
      while (answers.size > KEEP) {
        const [oldest, o] = answers.entries().next().value;
        o.box.remove();
        answers.delete(oldest);
      }
    }
    return a;
  }

  const offChunks = on("llm", (m) => {
    for (const c of m.chunks) {
      const a = answer(c);
      if (c.done) {
        a.status.textContent = c.done === "ok"
          ? `done · ${c.tokens ?? "?"} tokens · ${fmt(c.tokens_per_s)} tok/s`
          : `${c.done}${c.reason ? `: ${c.reason}` : ""}`;
        a.status.className = `llm-status ${c.done === "ok" ? "ok" : "warn"}`;
      } else if (a.chars < MAX_TEXT) {
        a.text.append(c.text);
        a.chars += c.text.length;
      }
    }
    dropped.textContent = m.dropped ? `(${m.dropped} chunks dropped: this browser fell behind)` : "";
  });

  const offStats = on("llm_stats", (m) => {
    if (!m.nodes.length) {
      nodesBox.replaceChildren(h("p", { class: "muted" }, "This gateway runs no llm node."));
      return;
    }
    const reasons = [...new Set(m.nodes.flatMap((n) => Object.keys(n.shed)))];
    nodesBox.replaceChildren(h("div", { class: "scroll" }, h("table", { id: "llm-table" },
      h("tr", {}, ["Node", "Queue", "In flight", "Answered", "Failed", "Tokens/s", "First token s", ...reasons.map((r) => `Shed ${r.replace("_", " ")}`)]
        .map((t) => h("th", {}, t))),
      m.nodes.map((n) => h("tr", { "data-node": `${n.pipeline}/${n.node}` },
        h("td", {}, `${n.pipeline}/${n.node}`),
        h("td", { class: "num llm-depth" }, `${n.depth ?? "–"} / ${n.max_depth ?? "–"}`),
        h("td", { class: "num" }, n.in_flight ?? "–"),
        h("td", { class: "num llm-ok" }, n.ok ?? "–"),
        h("td", { class: `num ${n.failed ? "bad" : ""}` }, n.failed ?? "–"),
        h("td", { class: "num llm-tps" }, fmt(n.tokens_per_s)),
        h("td", { class: "num" }, fmt(n.first_token_s, 2)),
        reasons.map((r) => h("td", { class: `num ${n.shed[r] ? "warn" : ""}`, "data-reason": r }, n.shed[r] ?? 0)))))),
    m.providers.length ? h("p", { class: "muted", id: "llm-providers" }, m.providers.map((p) =>
      `${p.name}: breaker ${p.breaker}, ${p.tokens} tokens, ${fmt(p.tokens_per_s)} tok/s`).join(" · ")) : null);
    dropped.textContent = m.dropped ? `(${m.dropped} chunks dropped: this browser fell behind)` : "";
  });

  const unsub = subscribe("llm");
  return { stop() { offChunks(); offStats(); unsub(); } };
}
