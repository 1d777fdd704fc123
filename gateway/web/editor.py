"""The pipeline editor's API: palette, model, draft validation and deploy.

``GET /api/editor/palette`` lists every registered node type, grouped by family, with its
description and the JSON Schema of its options (what ``sluice schema`` holds): the browser builds
its palette and forms from it, so a new node type appears in the editor by itself.
``GET /api/editor/model`` is the config file as the editor's model, with the file's revision and
the canvas positions. ``POST /api/editor/validate`` writes a draft into the YAML (see
:mod:`._yamledit`) and validates it with the same code as ``sluice validate``, answering each
error with its pipeline, node id and field path, and the YAML diff. ``POST /api/editor/deploy``
is validate + hot reload (with its rollback) + save, refused with 409 when the file changed
since the editor loaded it.

Canvas positions are not config: they live beside the config file, in ``<name>.layout.json``.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import inspect
import json
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ..config import NEEDS_TLS, LoadedConfig, MqttConnection, parse_config
from ..errors import ConfigError, ReloadError, RestartNeeded
from ..node import node_types, types_needing_tls
from ..redact import mask, redact, redact_text
from .auth import IDENTITY
from .views import model_paths

if TYPE_CHECKING:
    from ..runtime import Gateway

__all__ = ["Editor", "palette"]

log = logging.getLogger(__name__)

MAX_DRAFT = 1024 * 1024
FAMILIES = ("sources", "operators", "windows", "detectors", "llm", "sinks")
_PATH_PART = re.compile(r"^\d+$")


_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")  # reST roles such as :class:`Window`


def _family(cls: type) -> str:
    """A node type's palette group: its own ``family``, else from its kind and module."""
    fam = getattr(cls, "family", None)
    if isinstance(fam, str) and fam:
        return fam
    kind = getattr(cls, "kind", "operator")
    if kind == "source":
        return "sources"
    if kind == "sink":
        return "sinks"
    module = cls.__module__
    if module.startswith("nodes."):
        return module.split(".")[1]
    return "operators"


def _secret_fields(schema: dict[str, Any]) -> set[str]:
    """Option names the schema marks secret (``secret``, ``writeOnly`` or ``format: password``)."""
    out = set()
    for name, prop in (schema.get("properties") or {}).items():
        if prop.get("secret") or prop.get("writeOnly") or prop.get("format") == "password":
            out.add(name)
        for alt in prop.get("anyOf") or ():
            if alt.get("secret") or alt.get("writeOnly") or alt.get("format") == "password":
                out.add(name)
    return out


_PALETTE: dict[frozenset[str], dict[str, Any]] = {}


def palette() -> dict[str, Any]:
    """Every registered node type by family; built once per set of registered types.

    A gateway started with ``SLUICE_TLS=auto`` and a config without TLS cannot load the types whose
    library needs OpenSSL: they come last, as the family ``needs restart``, with ``unavailable``
    saying why (the editor shows them greyed out)."""
    types = node_types()
    off = types_needing_tls()
    key = frozenset(types) | {f"\0{name}" for name in off}
    cached = _PALETTE.get(key)
    if cached is not None:
        return cached
    groups: dict[str, list[dict[str, Any]]] = {}
    for name, cls in sorted(types.items()):
        schema = cls.Options.model_json_schema()
        doc = inspect.getdoc(cls) or ""
        groups.setdefault(_family(cls), []).append(
            {
                "type": name,
                "kind": cls.kind,
                # docstrings mark code as ``x`` and refer as :class:`X`: the palette shows plain text
                "description": _ROLE.sub(r"\1", doc.split("\n\n")[0].replace("\n", " ")).replace("``", ""),
                "inputs": 0 if cls.kind == "source" else 1,
                "outputs": 0 if cls.kind == "sink" else 1,
                "secret": sorted(_secret_fields(schema)),
                "schema": schema,
            }
        )
    order = [f for f in FAMILIES if f in groups] + sorted(f for f in groups if f not in FAMILIES)
    out = {"families": [{"name": f, "types": groups[f]} for f in order]}
    if off:
        out["families"].append({"name": "needs restart", "types": [{"type": n, "unavailable": NEEDS_TLS} for n in off]})
    _PALETTE.clear()
    _PALETTE[key] = out
    return out


def _redact(value: Any, secret: set[str]) -> Any:
    """A node's options for a viewer: the options the schema marks secret hidden, then the one
    redaction of everything that leaves the gateway (URLs, headers, known secrets)."""
    if isinstance(value, dict):
        value = {k: mask(v) if k in secret else v for k, v in value.items()}
    return redact(value)


def _where(path: str, located: list[tuple[str, list[str]]]) -> dict[str, Any]:
    """``pipelines.0.nodes.2.above`` as ``{pipeline, node, field}`` of the draft."""
    parts = path.split(".") if path else []
    out: dict[str, Any] = {"pipeline": None, "node": None, "field": path}
    if len(parts) >= 2 and parts[0] == "pipelines" and _PATH_PART.match(parts[1]):
        pi = int(parts[1])
        if pi < len(located):
            name, ids = located[pi]
            out["pipeline"] = name
            out["field"] = ".".join(parts[2:])
            if len(parts) >= 4 and parts[2] == "nodes" and _PATH_PART.match(parts[3]):
                ni = int(parts[3])
                out["node"] = ids[ni] if ni < len(ids) else None
                out["field"] = ".".join(parts[4:])
    return out


def _locate(text: str) -> list[tuple[str, list[str]]]:
    """Pipeline names and node ids in file order, for mapping error paths back to the draft."""
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return []
    out = []
    for p in (data or {}).get("pipelines") or []:
        if not isinstance(p, dict):
            out.append(("", []))
            continue
        nodes = p.get("nodes") if isinstance(p.get("nodes"), list) else []
        out.append((str(p.get("name")), [str(n.get("id")) if isinstance(n, dict) else "" for n in nodes]))
    return out


class Editor:
    """The editor's routes on the console app.

    The YAML round-trip (:mod:`._yamledit`, ruamel.yaml: ~1.4 MiB resident) is imported by the
    handlers that edit, at the editor's first use rather than with the console.
    """

    def __init__(self, gw: Gateway):
        self.gw = gw
        self._deploying = asyncio.Lock()
        # texts the editor handed out, by revision: a 409 shows what changed since
        self._seen: collections.OrderedDict[str, str] = collections.OrderedDict()

    # --- the file ----------------------------------------------------------------------------

    @property
    def _path(self) -> Path:
        return Path(self.gw.loaded.path)

    @property
    def _layout_path(self) -> Path:
        return self._path.with_suffix(".layout.json")

    async def _current(self) -> str:
        """The config as it is on disk now (the truth), or as loaded when there is no file."""
        try:
            return await asyncio.to_thread(self._path.read_text, encoding="utf-8")
        except (FileNotFoundError, NotADirectoryError):
            return self.gw.loaded.text

    def _remember(self, text: str) -> str:
        from ._yamledit import revision

        rev = revision(text)
        self._seen[rev] = text
        self._seen.move_to_end(rev)
        while len(self._seen) > 16:
            self._seen.popitem(last=False)
        return rev

    def _layout(self) -> dict[str, Any]:
        try:
            data = json.loads(self._layout_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data.get("pipelines", {}) if isinstance(data, dict) else {}

    def _save_layout(self, positions: Any) -> None:
        if not isinstance(positions, dict) or not self._path.is_file():
            return
        clean: dict[str, dict[str, list[float]]] = {}
        for pipe, nodes in positions.items():
            if not isinstance(nodes, dict):
                continue
            for nid, xy in nodes.items():
                if isinstance(xy, list) and len(xy) == 2 and all(isinstance(v, int | float) for v in xy):
                    clean.setdefault(str(pipe), {})[str(nid)] = [round(float(xy[0]), 1), round(float(xy[1]), 1)]
        tmp = self._layout_path.with_name(self._layout_path.name + ".tmp")
        tmp.write_text(json.dumps({"pipelines": clean}, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, self._layout_path)

    @staticmethod
    def _admin(request: web.Request) -> None:
        ident = request.get(IDENTITY)
        if ident is None or not ident.is_admin:
            raise web.HTTPForbidden(
                text='{"error": "editing pipelines needs the admin role"}', content_type="application/json"
            )

    @staticmethod
    async def _body(request: web.Request) -> dict[str, Any]:
        if request.content_length is not None and request.content_length > MAX_DRAFT:
            raise web.HTTPRequestEntityTooLarge(MAX_DRAFT, request.content_length)
        try:
            body = await request.json()
        except ValueError:
            raise web.HTTPBadRequest(
                text='{"error": "the body must be JSON"}', content_type="application/json"
            ) from None
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(text='{"error": "the body is a JSON object"}', content_type="application/json")
        return body

    # --- handlers ----------------------------------------------------------------------------

    async def api_palette(self, request: web.Request) -> web.Response:
        return web.json_response(await asyncio.to_thread(palette))

    async def api_model(self, request: web.Request) -> web.Response:
        from ._yamledit import DraftError, load_model

        text = await self._current()
        known = set(node_types())
        try:
            model = await asyncio.to_thread(load_model, text, known)
        except DraftError as exc:
            return web.json_response({"error": str(exc)}, status=422)
        ident = request.get(IDENTITY)
        admin = ident is not None and ident.is_admin
        if not admin:
            secrets = {t["type"]: set(t.get("secret", ())) for f in palette()["families"] for t in f["types"]}
            for p in model["pipelines"]:
                for n in p["nodes"]:
                    n["options"] = _redact(n["options"], secrets.get(n["type"], set()))
        model["revision"] = self._remember(text)
        model["positions"] = await asyncio.to_thread(self._layout)
        model["editable"] = admin
        model["path"] = self._path.name
        return web.json_response(model)

    async def _check(
        self, base: str, draft: Any, run: bool
    ) -> tuple[str, bool, list[dict[str, Any]], LoadedConfig | None]:
        """The draft written into ``base``, whether that changed it, every error by node and field,
        and the validated config when there is none. Off the loop: parsing YAML is costly.

        ``run``: it is about to be deployed, so ``${VAR}`` is substituted (a draft only validated is not).
        """
        from ._yamledit import DraftError, apply_model

        known = set(node_types())
        try:
            splice = await asyncio.to_thread(apply_model, base, draft, known)
        except DraftError as exc:
            error = {"pipeline": exc.pipeline, "node": exc.node, "field": "", "message": str(exc)}
            return base, False, [error], None
        try:
            loaded = await asyncio.to_thread(
                functools.partial(parse_config, substitute=run, model_paths=model_paths(self.gw)),
                splice.text,
                str(self._path),
            )
        except ConfigError as err:
            located = _locate(splice.text)
            errors = [{**_where(i.path, located), "line": i.line, "message": i.message} for i in err.issues]
            return splice.text, splice.changed, errors, None
        return splice.text, splice.changed, [], loaded

    async def api_validate(self, request: web.Request) -> web.Response:
        """Validate a draft: ``{"model": {...}}`` -> ``{valid, errors, diff}``."""
        from ._yamledit import diff

        self._admin(request)
        body = await self._body(request)
        base = await self._current()
        text, changed, errors, _ = await self._check(base, body.get("model"), run=False)
        return web.json_response(
            {"valid": not errors, "errors": errors, "changed": changed, "diff": diff(base, text, self._path.name)}
        )

    async def api_deploy(self, request: web.Request) -> web.Response:
        """``{"revision", "model", "positions"}``: validate, hot-reload the changed pipelines, save."""
        from ._yamledit import diff, revision
        from .views import _save

        self._admin(request)
        body = await self._body(request)
        async with self._deploying:
            base = await self._current()
            current = revision(base)
            if body.get("revision") != current:
                before = self._seen.get(str(body.get("revision")))
                return web.json_response(
                    {
                        "error": "the config file changed since the editor loaded it; reload, or see the difference",
                        "error_kind": "revision",
                        "revision": current,
                        "diff": diff(before, base, self._path.name) if before is not None else None,
                    },
                    status=409,
                )
            text, changed, errors, loaded = await self._check(base, body.get("model"), run=True)
            if errors or loaded is None:
                return web.json_response(
                    {"error": "the draft has errors", "error_kind": "invalid", "valid": False, "errors": errors},
                    status=422,
                )
            summary: dict[str, list[str]] = {"changed": [], "added": [], "removed": []}
            saved, note, restart = False, None, None
            # a file that already holds the draft may still be ahead of the running pipelines (saved
            # with a restart needed, or edited by hand): the deploy brings them level, or says why not
            if changed or await asyncio.to_thread(self._ahead_of_running, loaded):
                try:
                    summary = await self.gw.reload(loaded)
                except RestartNeeded as exc:
                    # valid, but only a start can run it: saved, and the answer says a restart applies it
                    restart = redact_text(str(exc))
                except ReloadError as exc:
                    return web.json_response(
                        {
                            "error": redact_text(str(exc)),
                            "error_kind": "reload",
                            "deployed": False,
                            "valid": True,
                            "errors": [],
                        },
                        status=409,
                    )
            if changed:
                try:
                    await asyncio.to_thread(_save, self._path, text)
                    saved = True
                except FileNotFoundError:
                    note = "running, but not saved: the gateway was not started from a config file"
                except OSError as exc:
                    note = f"running, but not saved to {self._path}: {exc.strerror or exc}"
            try:
                await asyncio.to_thread(self._save_layout, body.get("positions"))
            except OSError as exc:
                note = (note + "; " if note else "") + f"canvas positions not saved: {exc.strerror or exc}"
            ident = request.get(IDENTITY)
            if changed and restart:
                log.warning(
                    "pipelines saved from the editor by %s; they run after the next restart (%s)%s",
                    ident.name if ident else "?",
                    restart,
                    "" if saved else f" ({note})",
                )
            elif changed:
                log.warning(
                    "pipelines deployed from the editor by %s: %s%s",
                    ident.name if ident else "?",
                    ", ".join(f"{k} {v}" for k, v in summary.items() if v and k != "unchanged") or "no change",
                    "" if saved else f" ({note})",
                )
            new_rev = self._remember(text if saved or not changed else base)
            return web.json_response(
                {
                    "deployed": restart is None,
                    "restart_needed": restart,
                    "changed": changed,
                    "saved": saved,
                    "note": note,
                    "revision": new_rev,
                    **{k: v for k, v in summary.items() if k != "unchanged"},
                }
            )

    def _ahead_of_running(self, loaded: LoadedConfig) -> bool:
        """Whether ``loaded``'s pipelines differ from the running ones (their definitions, enabled)."""

        def specs(lc: LoadedConfig) -> dict[str, Any]:
            return {
                p.name: (p.enabled, [o.model_dump(mode="json") for o in lc.nodes.get(p.name, ())])
                for p in lc.config.pipelines
            }

        return specs(loaded) != specs(self.gw.loaded)

    # --- the connections section --------------------------------------------------------------

    async def api_connections(self, request: web.Request) -> web.Response:
        """``{connections, schema, revision, secret}``; secret options (passwords) as ``***``."""
        from ._yamledit import connections_model

        self._admin(request)
        text = await self._current()
        schema = MqttConnection.model_json_schema()
        secret = _secret_fields(schema)
        conns = await asyncio.to_thread(connections_model, text)
        shown = {k: _redact(v, secret) if isinstance(v, dict) else v for k, v in conns.items()}
        return web.json_response(
            {"connections": shown, "schema": schema, "secret": sorted(secret), "revision": self._remember(text)}
        )

    async def api_save_connections(self, request: web.Request) -> web.Response:
        """``{revision, connections}``: validated with the whole file like ``sluice validate``, then
        saved. A reload changes only pipelines, so the running gateway uses the new connections
        after its next restart; the answer says so (``restart_needed``)."""
        from ._yamledit import DraftError, apply_connections, connections_model, diff, revision
        from .views import _save

        self._admin(request)
        body = await self._body(request)
        async with self._deploying:
            base = await self._current()
            if body.get("revision") != revision(base):
                return web.json_response(
                    {"error": "the config file changed since the editor loaded it; reload", "error_kind": "revision"},
                    status=409,
                )
            conns = body.get("connections")
            old = await asyncio.to_thread(connections_model, base)
            secret = _secret_fields(MqttConnection.model_json_schema())
            if isinstance(conns, dict):  # *** (as shown) keeps the value in the file
                conns = {
                    k: {f: old.get(k, {}).get(f) if f in secret and x == "***" else x for f, x in v.items()}
                    if isinstance(v, dict)
                    else v
                    for k, v in conns.items()
                }
            try:
                text = await asyncio.to_thread(apply_connections, base, conns)
            except DraftError as exc:
                return web.json_response({"error": str(exc)}, status=400)
            try:
                await asyncio.to_thread(
                    functools.partial(parse_config, substitute=False, model_paths=model_paths(self.gw)),
                    text,
                    str(self._path),
                )
            except ConfigError as err:
                errors = [{"field": i.path, "line": i.line, "message": i.message} for i in err.issues]
                return web.json_response(
                    {"error": "the connections have errors", "error_kind": "invalid", "errors": errors}, status=422
                )
            saved = False
            if text != base:
                await asyncio.to_thread(_save, self._path, text)
                saved = True
                ident = request.get(IDENTITY)
                log.warning(
                    "connections saved from the editor by %s; they apply at the next restart",
                    ident.name if ident else "?",
                )
            running = self.gw.loaded.config.model_dump(mode="json")["connections"]
            try:
                now = await asyncio.to_thread(
                    functools.partial(parse_config, substitute=True, model_paths=model_paths(self.gw)),
                    text,
                    str(self._path),
                )
                pending = now.config.model_dump(mode="json")["connections"] != running
            except ConfigError:  # ${VAR} values: compare what can be compared
                pending = saved
            return web.json_response(
                {"saved": saved, "restart_needed": pending, "revision": self._remember(text), "diff": diff(base, text)}
            )

    async def api_import(self, request: web.Request) -> web.Response:
        """``{"yaml": "<one pipeline>"}`` -> ``{"pipeline": {...}}`` of the editor model (nothing is saved)."""
        from ._yamledit import DraftError, import_pipeline

        self._admin(request)
        text = await _import_body(request)
        try:
            pipe = await asyncio.to_thread(import_pipeline, text, set(node_types()))
        except DraftError as exc:
            return web.json_response({"error": str(exc)}, status=422)
        return web.json_response({"pipeline": pipe})

    async def api_export(self, request: web.Request) -> web.Response:
        """One pipeline of the file as YAML text (admins: the text may hold inline secrets)."""
        from ._yamledit import DraftError

        self._admin(request)
        name = request.match_info["name"]
        text = await self._current()
        try:
            item = await asyncio.to_thread(_pipeline_text, text, name)
        except DraftError as exc:
            return web.json_response({"error": str(exc)}, status=422)
        if item is None:
            return web.json_response({"error": f"no pipeline {name!r}"}, status=404)
        return web.Response(text=item, content_type="text/yaml", charset="utf-8")


MAX_IMPORT = 256 * 1024


async def _import_body(request: web.Request) -> str:
    if request.content_length is not None and request.content_length > MAX_IMPORT:
        raise web.HTTPRequestEntityTooLarge(MAX_IMPORT, request.content_length)
    try:
        body = await request.json()
        text = body["yaml"]
        if not isinstance(text, str):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise web.HTTPBadRequest(
            text='{"error": "expected {\\"yaml\\": \\"<one pipeline>\\"}"}', content_type="application/json"
        ) from None
    if len(text) > MAX_IMPORT:
        raise web.HTTPRequestEntityTooLarge(MAX_IMPORT, len(text))
    return text


def _pipeline_text(text: str, name: str) -> str | None:
    """The lines of one pipeline's list item, as written in the file (dedented)."""
    from ._yamledit import _load, _Text

    doc, seq_indent, dash_offset = _load(text)
    pipes = doc.get("pipelines") if isinstance(doc, dict) else None
    if not isinstance(pipes, list):
        return None
    t = _Text(text, seq_indent, dash_offset)
    for i, p in enumerate(pipes):
        if isinstance(p, dict) and p.get("name") == name:
            start, end, dash = t.item_range(pipes, i)  # type: ignore[arg-type]
            return "".join(ln[dash:] if ln.strip() else ln for ln in t.lines[start:end])
    return None
