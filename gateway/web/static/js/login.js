import { postRaw, session } from "./api.js";

const form = document.getElementById("login");
const err = document.getElementById("error");

session().then((s) => {
  if (s.needs_setup) location.replace("/setup");
  else if (s.user) location.replace("/");
});

form.addEventListener("submit", async (e) => {
  e.preventDefault();
  err.hidden = true;
  const { status, data } = await postRaw("/api/login", {
    name: document.getElementById("name").value,
    password: document.getElementById("password").value,
    next: new URLSearchParams(location.search).get("next") || "/",
  });
  if (status === 200) {
    // the console resolved `next` against its own origin: a path on it, or "/"
    location.replace(data.next || "/");
    return;
  }
  err.textContent = data.error || `login failed (${status})`;
  err.hidden = false;
  document.getElementById("password").value = "";
});
