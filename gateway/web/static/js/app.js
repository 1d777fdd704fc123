// The console shell: who is logged in, the live link, and the views behind #/name.
import { get, post, session } from "./api.js";
import { connect, onState } from "./live.js";
import * as overview from "./views/overview.js";
import * as graph from "./views/graph.js";
import * as events from "./views/events.js";
import * as deadletters from "./views/deadletters.js";
import * as config from "./views/config.js";
import * as alerts from "./views/alerts.js";
import * as charts from "./views/charts.js";
import * as logs from "./views/logs.js";
import * as users from "./views/users.js";
import * as account from "./views/account.js";
import * as llm from "./views/llm.js";
import * as editor from "./views/editor.js";

const views = { overview, graph, editor, alerts, charts, llm, events, deadletters, logs, config, users, account };
const ALIASES = { access: "users" }; // the Users page was called Access
const root = document.getElementById("view");
let current = null;
let me = null;

function route() {
  const [asked, ...rest] = (location.hash.replace(/^#\/?/, "") || "overview").split("/");
  const name = ALIASES[asked] || asked;
  const view = views[name] || overview;
  if (current && current.stop) current.stop();
  // Each view gets its own element: a late answer to a view left behind lands in a detached one.
  const el = document.createElement("div");
  root.replaceChildren(el);
  for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("active", a.dataset.view === name);
  current = view.start(el, { me, args: rest.map(decodeURIComponent) }) || null;
}

async function main() {
  me = await session();
  if (me.needs_setup) return location.replace("/setup");
  if (me.auth && !me.user) return location.replace("/login");
  const user = document.getElementById("user");
  user.textContent = me.auth ? `${me.user} (${me.role})` : "auth off";
  if (me.auth) {
    user.href = "#/account";
    user.title = "Your account: change your password";
  }
  document.body.classList.toggle("is-admin", me.role === "admin");
  const logout = document.getElementById("logout");
  logout.hidden = !me.auth;
  logout.addEventListener("click", async () => {
    await post("/api/logout", {});
    location.replace("/login");
  });
  const pill = document.getElementById("link");
  onState((s) => {
    pill.textContent = s;
    pill.className = `pill ${s === "live" ? "ok" : s === "offline" ? "bad" : ""}`;
  });
  get("/api/pipelines").then((d) => { document.getElementById("gw-name").textContent = d.gateway_id; }, () => {});
  connect();
  window.addEventListener("hashchange", route);
  route();
}

main();
