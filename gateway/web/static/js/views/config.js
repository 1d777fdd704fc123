// Config: the running YAML, a validate button that shows each problem at its line, and download.
import { get, h, post } from "../api.js";

export function start(el, { me }) {
  if (me.role !== "admin") {
    el.append(h("h1", {}, "Config"), h("p", { class: "error" }, "Viewing the config needs the admin role."));
    return null;
  }
  const gutter = h("pre", { class: "gutter", "aria-hidden": "true" });
  const text = h("textarea", { id: "config-text", spellcheck: "false", wrap: "off", "aria-label": "config YAML" });
  const result = h("div", { id: "config-result", role: "status" });
  const validate = h("button", { type: "button", id: "validate" }, "Validate");
  const download = h("button", { type: "button", id: "download" }, "Download");
  const save = h("button", { type: "button", id: "save" }, "Save and reload");
  let path = "config.yaml";
  let bad = new Map();

  function numbers() {
    const n = text.value.split("\n").length;
    gutter.replaceChildren(...Array.from({ length: n }, (_, i) =>
      h("span", { class: bad.has(i + 1) ? "bad" : "", title: bad.get(i + 1) || null }, `${i + 1}\n`)));
    gutter.scrollTop = text.scrollTop;
  }
  text.addEventListener("input", () => { bad = new Map(); numbers(); });
  text.addEventListener("scroll", () => { gutter.scrollTop = text.scrollTop; });

  function goto(line) {
    const lines = text.value.split("\n");
    const start = lines.slice(0, line - 1).reduce((a, l) => a + l.length + 1, 0);
    text.focus();
    text.setSelectionRange(start, start + (lines[line - 1] || "").length);
    // a selection does not scroll a textarea by itself: put the line in the middle of the view
    const lh = parseFloat(getComputedStyle(text).lineHeight) || 20;
    text.scrollTop = Math.max(0, (line - 1) * lh - text.clientHeight / 2);
    gutter.scrollTop = text.scrollTop;
  }

  function showErrors(r) {
    bad = new Map(r.errors.map((e) => [e.line, `${e.path}: ${e.message}`]));
    numbers();
    return h("ul", { class: "errors", id: "config-errors" }, r.errors.map((e) =>
      h("li", { "data-line": e.line }, h("a", { href: "#", onclick: (ev) => { ev.preventDefault(); goto(e.line); } },
        `line ${e.line}`), `: ${e.path || "<root>"}: ${e.message}`)));
  }

  validate.addEventListener("click", async () => {
    result.replaceChildren(h("p", { class: "muted" }, "Validating…"));
    try {
      const r = await post("/api/config/validate", text.value, "text/yaml");
      result.replaceChildren(r.valid
        ? (showErrors(r), h("p", { class: "ok", id: "config-valid" }, `Valid: ${r.pipelines} pipelines, ${r.nodes} nodes.`))
        : showErrors(r));
    } catch (e) {
      result.replaceChildren(h("p", { class: "error" }, e.message));
    }
  });

  save.addEventListener("click", async () => {
    result.replaceChildren(h("p", { class: "muted" }, "Saving…"));
    let r;
    try {
      r = await post("/api/config/save", text.value, "text/yaml");
    } catch (e) {
      result.replaceChildren(h("p", { class: "error", id: "config-saved" }, e.message));  // 409: nothing changed
      return;
    }
    if (!r.valid) {
      result.replaceChildren(showErrors(r));
      return;
    }
    showErrors(r);
    const parts = ["changed", "added", "removed", "unchanged"].filter((k) => r[k].length).map((k) => `${k}: ${r[k].join(", ")}`);
    result.replaceChildren(h("p", { class: r.saved ? "ok" : "warn", id: "config-saved" },
      `Reloaded (${parts.join("; ") || "no pipelines"}). ${r.saved ? (r.note ? `Saved (${r.note}).` : "Saved.") : r.note}`));
  });

  download.addEventListener("click", () => {
    const url = URL.createObjectURL(new Blob([text.value], { type: "text/yaml" }));
    const a = h("a", { href: url, download: path.split("/").pop() || "config.yaml" });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 1000);
  });

  el.append(h("h1", {}, "Config"),
    h("p", { class: "muted", id: "config-path" }),
    h("div", { class: "toolbar" }, validate, save, download),
    h("div", { class: "editor" }, gutter, text), result);
  get("/api/config").then((d) => {
    path = d.path;
    el.querySelector("#config-path").textContent = `${d.path}: the running config. Saving reloads changed pipelines ` +
      "live; other sections need a restart.";
    text.value = d.text;
    numbers();
  }).catch((e) => result.replaceChildren(h("p", { class: "error" }, e.message)));
  return null;
}
