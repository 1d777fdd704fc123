// Access (admins): console accounts and API tokens for scripts.
import { ApiError, csrfToken, get, h, post } from "../api.js";

async function del(path) {
  const r = await fetch(path, { method: "DELETE", credentials: "same-origin", headers: { "X-CSRF-Token": csrfToken() } });
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new ApiError(r.status, body.error || r.statusText);
  return body;
}

export function start(el, { me }) {
  if (me.role !== "admin") {
    el.append(h("h1", {}, "Access"), h("p", { class: "error" }, "Managing access needs the admin role."));
    return null;
  }
  const users = h("div", {});
  const tokens = h("div", {});
  const msg = h("p", { id: "access-msg", role: "status" });
  const role = (id) => h("select", { id }, ["viewer", "admin"].map((r) => h("option", { value: r }, r)));
  const uName = h("input", { id: "new-user", placeholder: "name", autocomplete: "off" });
  const uPass = h("input", { id: "new-password", type: "password", placeholder: "password (10+ characters)", autocomplete: "new-password" });
  const uRole = role("new-role");
  const tName = h("input", { id: "new-token-name", placeholder: "what the token is for", autocomplete: "off" });
  const tRole = role("new-token-role");
  const show = (text, cls = "ok") => { msg.className = cls; msg.replaceChildren(text); };

  async function load() {
    const [u, t] = await Promise.all([get("/api/users"), get("/api/tokens")]);
    users.replaceChildren(h("div", { class: "scroll" }, h("table", { id: "users" },
      h("tr", {}, ["User", "Role", ""].map((x) => h("th", {}, x))),
      u.users.map((x) => h("tr", { "data-user": x.name }, h("td", {}, x.name), h("td", {}, x.role),
        h("td", {}, x.fixed ? h("span", { class: "muted" }, "from the config")
          : x.name === me.user ? null
          : h("button", { type: "button", class: "small", onclick: () => remove(`/api/users/${encodeURIComponent(x.name)}`) }, "Delete")))))));
    tokens.replaceChildren(t.tokens.length
      ? h("div", { class: "scroll" }, h("table", { id: "tokens" },
          h("tr", {}, ["Name", "Role", "Created", "Last used", ""].map((x) => h("th", {}, x))),
          t.tokens.map((x) => h("tr", { "data-token": x.id }, h("td", {}, x.name), h("td", {}, x.role),
            h("td", {}, new Date(x.created * 1000).toLocaleString()),
            h("td", {}, x.last_used ? new Date(x.last_used * 1000).toLocaleString() : "never"),
            h("td", {}, h("button", { type: "button", class: "small", onclick: () => remove(`/api/tokens/${x.id}`) }, "Revoke"))))))
      : h("p", { class: "muted" }, "No API tokens."));
  }

  async function remove(path) {
    try {
      await del(path);
      show("Removed.");
    } catch (e) {
      show(e.message, "error");
    }
    load();
  }

  async function addUser(e) {
    e.preventDefault();
    try {
      await post("/api/users", { name: uName.value.trim(), password: uPass.value, role: uRole.value });
      show(`User ${uName.value.trim()} created.`);
      uName.value = uPass.value = "";
    } catch (err) {
      show(err.message, "error");
    }
    load();
  }

  async function addToken(e) {
    e.preventDefault();
    try {
      const t = await post("/api/tokens", { name: tName.value.trim() || "script", role: tRole.value });
      msg.className = "ok";
      msg.replaceChildren("New token (shown only now; send it as Authorization: Bearer …): ",
        h("code", { id: "new-token" }, t.token));
      tName.value = "";
    } catch (err) {
      show(err.message, "error");
    }
    load();
  }

  el.append(h("h1", {}, "Access"), msg,
    h("h2", {}, "Users"), users,
    h("form", { class: "toolbar", id: "add-user", onsubmit: addUser }, uName, uPass, uRole, h("button", { type: "submit" }, "Add user")),
    h("h2", {}, "API tokens"), tokens,
    h("form", { class: "toolbar", id: "add-token", onsubmit: addToken }, tName, tRole, h("button", { type: "submit" }, "Create token")));
  load().catch((e) => show(e.message, "error"));
  return null;
}
