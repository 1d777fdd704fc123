// Talking to the console's API: the session's CSRF token goes with every change.
let csrf = null;

export async function session() {
  const r = await fetch("/api/session", { credentials: "same-origin" });
  const s = await r.json();
  csrf = s.csrf;
  return s;
}

export function csrfToken() {
  return csrf;
}

// A change of one's own password starts a new session: its CSRF token comes with the answer.
export function setCsrfToken(token) {
  csrf = token;
}

export class ApiError extends Error {
  constructor(status, message, body = null) {
    super(message);
    this.status = status;
    this.body = body; // the JSON the server answered with, when it did
  }
}

async function handle(r) {
  if (r.status === 401) {
    location.href = "/login";
    throw new ApiError(401, "not logged in");
  }
  const type = r.headers.get("Content-Type") || "";
  const body = type.includes("application/json") ? await r.json() : await r.text();
  if (!r.ok) throw new ApiError(r.status, (body && body.error) || String(body) || r.statusText, typeof body === "object" ? body : null);
  return body;
}

export async function get(path) {
  return handle(await fetch(path, { credentials: "same-origin" }));
}

export async function post(path, body, contentType = "application/json") {
  if (csrf === null) await session();
  const r = await fetch(path, {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": contentType, "X-CSRF-Token": csrf },
    body: contentType === "application/json" ? JSON.stringify(body) : body,
  });
  return handle(r);
}

// DELETE and PATCH: changes like POST, with the CSRF token.
export async function send(method, path, body) {
  if (csrf === null) await session();
  const headers = { "X-CSRF-Token": csrf };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, {
    method, credentials: "same-origin", headers, body: body === undefined ? undefined : JSON.stringify(body),
  });
  return handle(r);
}

// A POST that must not redirect on 401 (login and setup answer 401 for a wrong password).
export async function postRaw(path, body) {
  if (csrf === null) await session();
  const r = await fetch(path, {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
    body: JSON.stringify(body),
  });
  const data = await r.json().catch(() => ({}));
  return { status: r.status, data };
}

// Small DOM helper: h("div", {class: "x"}, "text", child) — text is always set as text, never HTML.
export function h(tag, attrs = {}, ...children) {
  const el = tag === "svg" || attrs.svg ? document.createElementNS("http://www.w3.org/2000/svg", tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "svg" || v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "text") el.textContent = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

export function fmtBytes(n) {
  if (n === null || n === undefined) return "–";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${u[i]}`;
}

export function fmtDuration(s) {
  s = Math.floor(s);
  const d = Math.floor(s / 86400), hh = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
  if (d) return `${d}d ${hh}h`;
  if (hh) return `${hh}h ${m}m`;
  return `${m}m ${s % 60}s`;
}
