// Your account (any logged-in user): change your own password, giving the current one.
import { h, post, setCsrfToken } from "../api.js";

export function passwordForm(me) {
  const msg = h("p", { id: "own-password-msg", role: "status" });
  const field = (id, label, autocomplete) => h("label", {}, label,
    h("input", { id, type: "password", autocomplete, required: true }));
  const current = field("own-current", "Current password", "current-password");
  const fresh = field("own-new", "New password (10 characters or more)", "new-password");
  const again = field("own-again", "New password again", "new-password");
  const input = (label) => label.querySelector("input");
  const show = (text, cls) => { msg.className = cls; msg.replaceChildren(text); };

  async function change(e) {
    e.preventDefault();
    if (input(fresh).value !== input(again).value) {
      show("The two new passwords differ.", "error");
      input(again).focus();
      return;
    }
    const button = form.querySelector("button");
    button.disabled = true;
    try {
      const answer = await post("/api/session/password", { current: input(current).value, password: input(fresh).value });
      setCsrfToken(answer.csrf); // this session goes on under a new token; the others have ended
      for (const l of [current, fresh, again]) input(l).value = "";
      show("Password changed. Your sessions in other browsers have ended.", "ok");
    } catch (err) {
      show(err.message, "error");
      (err.status === 403 ? input(current) : input(fresh)).focus();
    } finally {
      button.disabled = false;
    }
  }

  const form = h("form", { id: "own-password", class: "card narrow-form", onsubmit: change },
    h("h2", {}, "Change your password"), current, fresh, again, msg, h("button", { type: "submit" }, "Change password"));
  if (me.auth && !me.user) form.hidden = true;
  return form;
}

export function start(el, { me }) {
  if (!me.auth) {
    el.append(h("h1", {}, "Your account"), h("p", { class: "muted" }, "The console's login is off (console.auth: false): there is no password to change."));
    return null;
  }
  el.append(h("h1", {}, "Your account"),
    h("p", {}, "Logged in as ", h("strong", {}, me.user), ` (${me.role}).`,
      me.role === "admin" ? [" Other users and API tokens: ", h("a", { href: "#/users" }, "Users"), "."] : null),
    passwordForm(me));
  return null;
}
