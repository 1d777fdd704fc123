// Users (admins): console accounts — add, remove, change a role, set a password — and API tokens.
// The rules are the gateway's (PATCH/DELETE /api/users/<name>): the page only hides what the
// gateway would refuse, and says why.
import { get, h, post, send } from "../api.js";

const ROLES = ["viewer", "admin"];

export function start(el, { me }) {
  if (me.role !== "admin") {
    el.append(h("h1", {}, "Users"), h("p", { class: "error" }, "Managing users needs the admin role."),
      h("p", {}, "To change your own password, open ", h("a", { href: "#/account" }, "your account"), "."));
    return null;
  }
  const users = h("div", {});
  const tokens = h("div", {});
  const msg = h("p", { id: "access-msg", role: "status" });
  const role = (id, value = "viewer") => h("select", { id, "aria-label": "role" },
    ROLES.map((r) => h("option", { value: r, selected: r === value }, r)));
  const uName = h("input", { id: "new-user", placeholder: "name", autocomplete: "off", "aria-label": "new user's name" });
  const uPass = h("input", { id: "new-password", type: "password", placeholder: "password (10+ characters)", autocomplete: "new-password", "aria-label": "new user's password" });
  const uRole = role("new-role");
  const tName = h("input", { id: "new-token-name", placeholder: "what the token is for", autocomplete: "off", "aria-label": "token name" });
  const tRole = role("new-token-role");
  const show = (text, cls = "ok") => { msg.className = cls; msg.replaceChildren(text); };
  const userPath = (name) => `/api/users/${encodeURIComponent(name)}`;

  // Why a user's role or account cannot be changed here, or null when it can.
  function locked(u) {
    if (u.fixed) return "from console.users in the config: change it there";
    if (u.name === me.user) return "you: another admin changes your role";
    if (u.last_admin) return "the last admin: make another user admin first";
    return null;
  }

  function userRow(u) {
    const why = locked(u);
    const row = h("tr", { "data-user": u.name });
    const roleSel = role(`role-${u.name}`, u.role);
    roleSel.classList.add("role");
    roleSel.disabled = Boolean(why);
    if (why) roleSel.title = why;
    roleSel.addEventListener("change", () => changeRole(u, roleSel));
    const actions = h("td", { class: "actions" });
    if (u.name === me.user) {
      actions.append(h("a", { href: "#/account", class: "own" }, "Change your password"));
    } else if (!u.fixed) {
      actions.append(
        h("button", { type: "button", class: "small secondary set-password", onclick: () => passwordForm(u, row) }, "Set password"),
        u.last_admin ? null : h("button", { type: "button", class: "small secondary delete", onclick: () => confirmDelete(u, row) }, "Delete"));
    }
    if (why) actions.append(h("small", { class: "muted why" }, why));
    row.append(h("td", { class: "name" }, u.name, u.name === me.user ? h("span", { class: "muted" }, " (you)") : null),
      h("td", {}, roleSel), actions);
    return row;
  }

  // An inline form under the user's row (the alerts page's pattern): one open at a time.
  function under(row, cls, ...content) {
    for (const open of users.querySelectorAll("tr.user-form")) open.remove();
    const form = h("tr", { class: `user-form ${cls}` }, h("td", { colspan: 3 }, ...content));
    row.after(form);
    return form;
  }

  function passwordForm(u, row) {
    const pass = h("input", { type: "password", class: "new-pass", autocomplete: "new-password", placeholder: "new password (10+ characters)", "aria-label": `new password for ${u.name}` });
    const form = under(row, "pass-form", h("form", { class: "toolbar", onsubmit: async (e) => {
      e.preventDefault();
      try {
        await send("PATCH", userPath(u.name), { password: pass.value });
        show(`New password set for ${u.name}; their sessions have ended.`);
        form.remove();
      } catch (err) {
        show(err.message, "error");
        pass.focus();
      }
    } }, pass, h("button", { type: "submit", class: "small confirm" }, "Set password"),
    h("button", { type: "button", class: "small link", onclick: () => form.remove() }, "Cancel")));
    pass.focus();
  }

  function confirmDelete(u, row) {
    const form = under(row, "delete-form", h("span", {}, `Delete ${u.name}? Their sessions end at once. `),
      h("button", { type: "button", class: "small confirm", onclick: async () => {
        try {
          await send("DELETE", userPath(u.name));
          show(`User ${u.name} deleted.`);
        } catch (err) {
          show(err.message, "error");
        }
        load();
      } }, "Delete"),
      h("button", { type: "button", class: "small link", onclick: () => form.remove() }, "Cancel"));
    form.querySelector("button.confirm").focus();
  }

  async function changeRole(u, sel) {
    sel.disabled = true;
    try {
      await send("PATCH", userPath(u.name), { role: sel.value });
      show(`${u.name} is now ${sel.value === "admin" ? "an admin" : "a viewer"}; their sessions have ended.`);
    } catch (err) {
      show(err.message, "error");
    }
    load();
  }

  async function load() {
    const [u, t] = await Promise.all([get("/api/users"), get("/api/tokens")]);
    users.replaceChildren(h("div", { class: "scroll" }, h("table", { id: "users" },
      h("tr", {}, ["User", "Role", ""].map((x) => h("th", {}, x))),
      u.users.map(userRow))));
    tokens.replaceChildren(t.tokens.length
      ? h("div", { class: "scroll" }, h("table", { id: "tokens" },
          h("tr", {}, ["Name", "Role", "Created", "Last used", ""].map((x) => h("th", {}, x))),
          t.tokens.map((x) => h("tr", { "data-token": x.id }, h("td", {}, x.name), h("td", {}, x.role),
            h("td", {}, new Date(x.created * 1000).toLocaleString()),
            h("td", {}, x.last_used ? new Date(x.last_used * 1000).toLocaleString() : "never"),
            h("td", {}, h("button", { type: "button", class: "small", onclick: () => revoke(x.id) }, "Revoke"))))))
      : h("p", { class: "muted" }, "No API tokens."));
  }

  async function revoke(id) {
    try {
      await send("DELETE", `/api/tokens/${encodeURIComponent(id)}`);
      show("Token revoked.");
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

  el.append(h("h1", {}, "Users"),
    h("p", { class: "muted" }, "Viewers watch pipelines, alerts and logs and change only their own password; admins also edit pipelines and the config, act on alerts and manage users. Changing a user's role or password ends their sessions."),
    msg, users,
    h("form", { class: "toolbar", id: "add-user", onsubmit: addUser }, uName, uPass, uRole, h("button", { type: "submit" }, "Add user")),
    h("h2", {}, "API tokens"), tokens,
    h("form", { class: "toolbar", id: "add-token", onsubmit: addToken }, tName, tRole, h("button", { type: "submit" }, "Create token")));
  load().catch((e) => show(e.message, "error"));
  return null;
}
