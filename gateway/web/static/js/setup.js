import { postRaw, session } from "./api.js";

const form = document.getElementById("setup");
const err = document.getElementById("error");

session().then((s) => {
  if (!s.needs_setup) location.replace(s.user ? "/" : "/login");
});

form.addEventListener("submit", async (e) => {
  e.preventDefault();
  err.hidden = true;
  if (document.getElementById("password").value !== document.getElementById("password2").value) {
    err.textContent = "the two passwords differ";
    err.hidden = false;
    return;
  }
  const { status, data } = await postRaw("/api/setup", {
    code: document.getElementById("code").value.trim(),
    name: document.getElementById("name").value.trim(),
    password: document.getElementById("password").value,
  });
  if (status === 201) {
    location.replace("/");
    return;
  }
  err.textContent = data.error || `setup failed (${status})`;
  err.hidden = false;
});
