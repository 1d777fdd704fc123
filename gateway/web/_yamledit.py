"""The pipeline editor's model of a config file, and writing a changed model back into the YAML text.

The YAML file stays the one source of truth. :func:`load_model` reads it with ruamel.yaml's
round-trip loader into the editor's JSON model (pipelines of nodes with ``id``, ``type``,
``input`` and the other options). :func:`apply_model` writes a model back by splicing the text:
a node or pipeline that did not change keeps its bytes (comments, quoting, alignment, flow
style), a changed one is emitted again by ruamel.yaml at the same place with its own comments,
new ones go after the last of their siblings, removed ones are cut out with the comment lines
right above them. Nothing changed means the same text, byte for byte.

Nodes the editor cannot change without losing something — YAML anchors, aliases or merge keys,
``${VAR}`` values, tagged values, types the registry does not know — are shown read-only; a
draft that changes one is refused.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import io
import json
import re
import threading
from dataclasses import dataclass, field
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import YAMLError
from ruamel.yaml.scalarstring import DoubleQuotedScalarString, SingleQuotedScalarString

__all__ = ["DraftError", "Splice", "apply_model", "diff", "import_pipeline", "load_model", "revision"]

# Keys of a node that are the graph, not its options.
_GRAPH_KEYS = ("id", "type", "input")
_ENV_REF = re.compile(r"\$\{")
_FLOW_MAX = 100  # characters: a new node's nested collection longer than this is written in block style


class DraftError(ValueError):
    """A draft the editor cannot write: ``where`` is ``(pipeline, node id or None)``."""

    def __init__(self, message: str, pipeline: str | None = None, node: str | None = None):
        super().__init__(message)
        self.pipeline = pipeline
        self.node = node


def revision(text: str) -> str:
    """What the editor holds to detect a change of the file under it."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def diff(before: str, after: str, name: str = "config.yaml") -> str:
    return "".join(difflib.unified_diff(before.splitlines(True), after.splitlines(True), name, name))


def _yaml() -> YAML:
    y = YAML(typ="rt")
    y.preserve_quotes = True
    y.width = 4096  # never fold a long line the user wrote on one line
    return y


_MAX_VALUES = 200_000  # values one model may hold: aliases repeated into a billion laughs stop here


def _plain(value: Any, budget: list[int] | None = None) -> Any:
    """ruamel's round-trip objects as plain JSON values."""
    if budget is None:
        budget = [_MAX_VALUES]
    budget[0] -= 1
    if budget[0] < 0:
        raise DraftError("the YAML expands to too many values (aliases repeated over and over?)")
    if isinstance(value, dict):
        return {str(k): _plain(v, budget) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v, budget) for v in value]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    return str(value)


def _readonly_reason(node: Any, known_types: set[str]) -> str | None:
    """Why the editor must not rewrite this node, or ``None``."""
    if not isinstance(node, CommentedMap):
        return "not a mapping"
    if getattr(node, "merge", None):
        return "uses a YAML merge key (<<)"
    if node.anchor.value is not None:
        return "is a YAML anchor"
    t = node.get("type")
    if isinstance(t, str) and t not in known_types:
        return f"type {t!r} is not registered in this gateway"

    def walk(v: Any) -> str | None:
        anchor = getattr(v, "anchor", None)
        if anchor is not None and getattr(anchor, "value", None) is not None:
            return "holds a YAML anchor or alias"
        if isinstance(v, dict):
            return next((r for x in v.values() if (r := walk(x))), None)
        if isinstance(v, list):
            return next((r for x in v if (r := walk(x))), None)
        if isinstance(v, str) and _ENV_REF.search(v):
            return "holds a ${VAR} value"
        if not isinstance(v, str | int | float | bool | type(None) | dict | list):
            return "holds a tagged value"
        return None

    return walk(node)


def _node_model(raw: Any, known_types: set[str]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        return {"id": None, "type": None, "input": [], "options": {}, "readonly": "not a mapping"}
    inp = raw.get("input")
    inputs = [inp] if isinstance(inp, str) else [str(i) for i in inp] if isinstance(inp, list) else []
    return {
        "id": _plain(raw.get("id")),
        "type": _plain(raw.get("type")),
        "input": inputs,
        "options": {str(k): _plain(v) for k, v in raw.items() if k not in _GRAPH_KEYS},
        "readonly": _readonly_reason(raw, known_types),
    }


_KEY_ONLY = re.compile(r"^[^\s#\-][^:]*:\s*(#.*)?$")


def _guess_indent(text: str) -> tuple[int, int]:
    """How the file indents block sequences: ``(sequence indent, dash offset)``, e.g. ``(4, 2)`` for
    ``key:\n  - item``. A cheap scan, where ruamel's own guess parses the whole file once more."""
    key_indent: int | None = None
    for line in text.splitlines():
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        indent = len(line) - len(line.lstrip(" "))
        if s.startswith("- ") and key_indent is not None and indent >= key_indent:
            offset = indent - key_indent
            return offset + 2, offset
        key_indent = indent if _KEY_ONLY.match(s) else None
    return 4, 2


# The last config text parsed, and its round-trip document: parsing is the costly part (pure
# Python), and the editor asks about the same file over and over while someone edits. Nothing
# changes a cached document; what is written again is emitted from copies.
_PARSED: dict[str, tuple[Any, int, int]] = {}
_PARSED_LOCK = threading.Lock()


def _load(text: str) -> tuple[Any, int, int]:
    """The round-trip document, the indentation of sequences and the offset of their dashes."""
    with _PARSED_LOCK:
        hit = _PARSED.get(text)
    if hit is not None:
        return hit
    try:
        doc = _yaml().load(text)
    except YAMLError as exc:
        raise DraftError(f"the config file is not valid YAML: {exc}") from None
    out = (doc, *_guess_indent(text))
    with _PARSED_LOCK:
        _PARSED.clear()
        _PARSED[text] = out
    return out


def load_model(text: str, known_types: set[str]) -> dict[str, Any]:
    """The editor model of a config text: pipelines of nodes, and the connection names."""
    doc, _, _ = _load(text)
    if not isinstance(doc, dict):
        doc = {}
    pipes = []
    raw_pipes = doc.get("pipelines") if isinstance(doc.get("pipelines"), list) else []
    for p in raw_pipes:
        if not isinstance(p, dict):
            continue
        nodes = p.get("nodes") if isinstance(p.get("nodes"), list) else []
        pipes.append(
            {
                "name": _plain(p.get("name")),
                "description": _plain(p.get("description")),
                "enabled": _plain(p["enabled"]) if "enabled" in p else True,
                "nodes": [_node_model(n, known_types) for n in nodes],
            }
        )
    conns = doc.get("connections") if isinstance(doc.get("connections"), dict) else {}
    return {
        "pipelines": pipes,
        "connections": {
            str(k): {"type": _plain(v.get("type")) if isinstance(v, dict) else None} for k, v in conns.items()
        },
    }


def import_pipeline(text: str, known_types: set[str]) -> dict[str, Any]:
    """One pipeline written as YAML (``name`` and ``nodes``, alone or as a one-item list, as the
    export gives it) as a pipeline of the editor model."""
    try:
        data = _yaml().load(text)
    except YAMLError as exc:
        raise DraftError(f"not valid YAML: {exc}") from None
    if isinstance(data, list) and len(data) == 1:
        data = data[0]
    if isinstance(data, dict) and isinstance(data.get("pipelines"), list) and len(data["pipelines"]) == 1:
        data = data["pipelines"][0]
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not isinstance(data.get("nodes"), list):
        raise DraftError("expected one pipeline: a mapping with `name` and a list of `nodes`")
    budget = [_MAX_VALUES]
    _plain(data, budget)  # refuses an alias bomb before anything else walks it
    return {
        "name": str(data["name"]),
        "description": _plain(data.get("description")),
        "enabled": _plain(data["enabled"]) if "enabled" in data else True,
        "nodes": [_node_model(n, known_types) for n in data["nodes"]],
    }


# --- writing back --------------------------------------------------------------------------


@dataclass
class Splice:
    """The new text, and where each node ended up (for mapping validation errors back to nodes)."""

    text: str
    changed: bool
    order: list[tuple[str, list[str]]] = field(default_factory=list)


def _same_node(old: dict[str, Any], new: dict[str, Any]) -> bool:
    return (
        old["id"] == new.get("id")
        and old["type"] == new.get("type")
        and list(old["input"]) == list(new.get("input") or [])
        and old["options"] == (new.get("options") or {})
    )


def _check_draft(model: Any) -> list[dict[str, Any]]:
    if not isinstance(model, dict) or not isinstance(model.get("pipelines"), list):
        raise DraftError('the draft is {"pipelines": [{"name": ..., "nodes": [...]}]}')
    pipes = model["pipelines"]
    for p in pipes:
        if not isinstance(p, dict) or not isinstance(p.get("name"), str) or not isinstance(p.get("nodes"), list):
            raise DraftError("each pipeline of the draft has a name and a list of nodes")
        for n in p["nodes"]:
            if not isinstance(n, dict) or not isinstance(n.get("options", {}), dict):
                raise DraftError("each node of the draft is an object with id, type, input, options", p["name"])
            if not isinstance(n.get("input", []), list) or not all(isinstance(i, str) for i in n.get("input", [])):
                raise DraftError("a node's input is a list of node ids", p["name"], n.get("id"))
            bad = [k for k in n.get("options", {}) if k in _GRAPH_KEYS]
            if bad:
                raise DraftError(f"{bad[0]!r} is not an option; it is the node's own field", p["name"], n.get("id"))
    names = [p["name"] for p in pipes]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise DraftError(f"two pipelines are named {dup!r}", dup)
    return pipes


def _node_data(n: dict[str, Any], was: CommentedMap | None) -> dict[str, Any]:
    """The node as it will be written: graph keys first, then options in their old order."""
    out: dict[str, Any] = {"id": n.get("id"), "type": n.get("type")}
    inputs = list(n.get("input") or [])
    if inputs:
        old = was.get("input") if was is not None else None
        out["input"] = inputs[0] if len(inputs) == 1 and not isinstance(old, list) else inputs
    out.update(n.get("options") or {})
    return out


def _flowed(value: Any, depth: int = 0) -> Any:
    """A new value as a careful hand would write it: nested collections in flow style when short."""
    if isinstance(value, dict):
        m = CommentedMap((k, _flowed(v, depth + 1)) for k, v in value.items())
        m.fa.set_flow_style()
        return m
    if isinstance(value, list):
        s = CommentedSeq(_flowed(v, depth + 1) for v in value)
        if depth == 0 and any(isinstance(v, dict) for v in value) and len(repr(value)) > _FLOW_MAX:
            s.fa.set_block_style()
        else:
            s.fa.set_flow_style()
        return s
    return value


def _update_map(target: CommentedMap, data: dict[str, Any]) -> None:
    """Make ``target`` hold ``data``: changed keys keep their place (and comments), new ones go last."""
    for k in [k for k in target if k not in data]:
        del target[k]
    for k, v in data.items():
        if k in target and _plain(target[k]) == v:
            continue
        if k in target and isinstance(v, dict) and isinstance(target[k], CommentedMap):
            _update_map(target[k], v)
            continue
        target[k] = _flowed(v)
    # new keys were appended; ruamel keeps insertion order, and data's order for the rest is the old one


class _Text:
    """The config text as lines, with the edits to make, applied bottom-up at the end."""

    def __init__(self, text: str, seq_indent: int, dash_offset: int):
        self.lines = text.splitlines(keepends=True)
        if self.lines and not self.lines[-1].endswith("\n"):
            self.lines[-1] += "\n"
            self.no_final_newline = True
        else:
            self.no_final_newline = False
        self.seq_indent = seq_indent
        self.dash_offset = dash_offset
        self.edits: list[tuple[int, int, str]] = []  # [start, end) line range -> text

    @staticmethod
    def _blank_or_comment(line: str) -> bool:
        s = line.strip()
        return not s or s.startswith("#")

    @staticmethod
    def _indent(line: str) -> int:
        return len(line) - len(line.lstrip(" "))

    def dash_col(self, line: int, content_col: int) -> int | None:
        head = self.lines[line][:content_col].rstrip()
        return len(head) - 1 if head.endswith("-") else None

    def item_range(self, seq: CommentedSeq, i: int) -> tuple[int, int, int]:
        """Lines ``[start, end)`` of item ``i`` of a block sequence, and the column of its dash."""
        line, col = seq.lc.item(i)
        dash = self.dash_col(line, col)
        if dash is None:
            raise DraftError("the config's layout is unusual here (a '-' alone on its line); edit it as text")
        end = line + 1
        while end < len(self.lines) and (
            self._blank_or_comment(self.lines[end]) or self._indent(self.lines[end]) > dash
        ):
            end += 1
        while end > line + 1 and self._blank_or_comment(self.lines[end - 1]):
            end -= 1  # trailing comments belong to what follows
        return line, end, dash

    def leading_comments(self, start: int, dash: int) -> int:
        """The first line of the comment block right above ``start`` (at the item's indentation)."""
        while start > 0:
            prev = self.lines[start - 1]
            if prev.strip().startswith("#") and self._indent(prev) >= dash:
                start -= 1
            else:
                break
        return start

    def emit_item(self, value: Any, dash: int) -> str:
        y = _yaml()
        y.indent(mapping=max(2, self.seq_indent - self.dash_offset), sequence=self.seq_indent, offset=self.dash_offset)
        buf = io.StringIO()
        seq = CommentedSeq([value])
        y.dump(seq, buf)
        lines = buf.getvalue().splitlines(keepends=True)
        while lines and self._blank_or_comment(lines[-1]):
            lines.pop()  # a comment ruamel keeps after the item is already in the text after it
        base = min((self._indent(ln) for ln in lines if ln.strip()), default=0)
        return "".join(" " * dash + ln[base:] if ln.strip() else ln for ln in lines)

    def keep_eol_comment(self, seq: CommentedSeq, i: int, start: int, end: int, text: str) -> str:
        """A one-line item written again keeps the comment at the end of its line (ruamel keeps it
        on the enclosing list, so emitting the item alone would lose it)."""
        tokens = seq.ca.items.get(i) or []
        tok = tokens[0] if tokens else None
        if tok is None or end - start != 1 or text.count("\n") != 1:
            return text
        comment = tok.value.strip()
        if not comment.startswith("#") or "\n" in comment:
            return text
        old = self.lines[start]
        col = tok.column if hasattr(tok, "column") else old.find("#")
        gap = max(1, col - len(old[:col].rstrip()))
        return text.rstrip("\n") + " " * gap + comment + "\n"

    def replace(self, start: int, end: int, text: str) -> None:
        self.edits.append((start, end, text))

    def result(self) -> str:
        # bottom-up; of two insertions at one place, the one asked for first ends up first
        order = sorted(range(len(self.edits)), key=lambda i: (self.edits[i][0], self.edits[i][1], i), reverse=True)
        for i in order:
            start, end, text = self.edits[i]
            self.lines[start:end] = [text] if text else []
        out = "".join(self.lines)
        if self.no_final_newline and out.endswith("\n"):
            out = out[:-1]
        return out


def apply_model(text: str, model: Any, known_types: set[str]) -> Splice:
    """Write the draft ``model`` into the config ``text``; raise :class:`DraftError` if it cannot be."""
    if isinstance(model, dict) and model.get("pipelines") == load_model(text, known_types)["pipelines"]:
        # nothing changed: the same text, even for a file the editor could not write
        pipes = model["pipelines"]
        return Splice(text, False, [(p["name"], [str(n.get("id")) for n in p["nodes"]]) for p in pipes])
    pipes = _check_draft(model)
    doc, seq_indent, dash_offset = _load(text)
    if doc is None:
        doc = CommentedMap()
    if not isinstance(doc, CommentedMap):
        raise DraftError("the config file is not a mapping of sections")
    t = _Text(text, seq_indent, dash_offset)
    raw_pipes = doc.get("pipelines")
    if raw_pipes is None:
        raw_pipes = CommentedSeq()
    if not isinstance(raw_pipes, CommentedSeq):
        raise DraftError("`pipelines` in the config is not a list")
    if raw_pipes.fa.flow_style() and len(raw_pipes) > 0:
        raise DraftError("`pipelines` is written as a flow list ([...]); the editor needs a block list")
    old_by_name: dict[str, int] = {}
    for i, p in enumerate(raw_pipes):
        if isinstance(p, CommentedMap) and isinstance(p.get("name"), str):
            old_by_name[str(p["name"])] = i
    changed = False
    new_items: list[Any] = []
    order: list[tuple[str, list[str]]] = []
    kept: set[int] = set()
    for p in pipes:
        name = p["name"]
        order.append((name, [str(n.get("id")) for n in p["nodes"]]))
        i = old_by_name.get(name)
        if i is None:
            item = CommentedMap()
            item["name"] = name
            if p.get("description"):
                item["description"] = p["description"]
            if p.get("enabled", True) is not True:
                item["enabled"] = p["enabled"]
            nodes = CommentedSeq()
            for n in p["nodes"]:
                nodes.append(_new_node(n, flow=False))
            item["nodes"] = nodes
            new_items.append(item)
            changed = True
            continue
        kept.add(i)
        if _apply_pipeline(t, raw_pipes, i, p, known_types):
            changed = True
    removed = [i for i in range(len(raw_pipes)) if i not in kept]
    for i in removed:
        start, end, dash = t.item_range(raw_pipes, i)
        t.replace(t.leading_comments(start, dash), end, "")
        changed = True
    if new_items:
        _append_pipelines(t, doc, raw_pipes, new_items)
    if not changed:
        return Splice(text, False, order)
    out = t.result()
    return Splice(out, out != text, order)  # nodes only put in another order change nothing


def _new_node(n: dict[str, Any], flow: bool) -> CommentedMap:
    m = CommentedMap()
    for k, v in _node_data(n, None).items():
        m[k] = _flowed(v, depth=1 if flow else 0)
    if flow:
        m.fa.set_flow_style()
    return m


def _splice_enabled(t: _Text, raw: CommentedMap, enabled: Any) -> None:
    """Write a pipeline's ``enabled`` key as one line: ``enabled: false`` after its name, or the
    line gone when it is enabled again (the default)."""
    if "enabled" in raw:
        line = raw.lc.key("enabled")[0]
        if enabled is True:
            t.replace(line, line + 1, "")
        else:
            col = raw.lc.key("enabled")[1]
            t.replace(line, line + 1, " " * col + "enabled: " + _scalar_text(enabled) + "\n")
        return
    line, col = raw.lc.key("name")
    t.replace(line + 1, line + 1, " " * col + "enabled: " + _scalar_text(enabled) + "\n")


def _scalar_text(v: Any) -> str:
    return "false" if v is False else "true" if v is True else json.dumps(v)


def _apply_pipeline(t: _Text, raw_pipes: CommentedSeq, i: int, p: dict[str, Any], known: set[str]) -> bool:
    raw = raw_pipes[i]
    name = p["name"]
    old_nodes = raw.get("nodes")
    if not isinstance(old_nodes, CommentedSeq):
        old_nodes = CommentedSeq()
    olds = [_node_model(n, known) for n in old_nodes]
    news = p["nodes"]
    desc_changed = (raw.get("description") or None) != (p.get("description") or None)
    enabled_changed = spliced = raw.get("enabled", True) != p.get("enabled", True)
    whole = desc_changed or not isinstance(old_nodes, CommentedSeq) or old_nodes.fa.flow_style() or not old_nodes
    if enabled_changed and not whole and not raw.fa.flow_style() and "name" in raw:
        _splice_enabled(t, raw, p.get("enabled", True))  # one line, outside the nodes' lines
        enabled_changed = False
    else:
        spliced = False
    desc_changed |= enabled_changed  # a pipeline written as {...}: written again like the description
    same = len(olds) == len(news) and all(_same_node(o, n) for o, n in zip(olds, news, strict=True))
    if same and not desc_changed:
        return spliced
    old_index = {o["id"]: j for j, o in enumerate(olds) if isinstance(o["id"], str)}
    for n in news:
        j = old_index.get(n.get("was") or n.get("id"))
        if j is not None and olds[j]["readonly"] and not _same_node(olds[j], n):
            raise DraftError(
                f"node {olds[j]['id']!r} is shown read-only ({olds[j]['readonly']}); change it in the YAML text",
                name,
                olds[j]["id"],
            )
    if desc_changed or old_nodes.fa.flow_style() or not old_nodes:
        # rare: emit the whole pipeline again (its comments kept by ruamel), from a copy: the
        # parsed document is cached and shared, never changed
        raw = copy.deepcopy(raw)
        old_nodes = raw.get("nodes") if isinstance(raw.get("nodes"), CommentedSeq) else CommentedSeq()
        if p.get("description"):
            raw["description"] = p["description"]
        elif "description" in raw:
            del raw["description"]
        if p.get("enabled", True) is not True:
            if "enabled" in raw:
                raw["enabled"] = p["enabled"]
            else:  # after the name and description, before the nodes
                raw.insert(list(raw).index("nodes") if "nodes" in raw else len(raw), "enabled", p["enabled"])
        elif "enabled" in raw:
            del raw["enabled"]
        seq = CommentedSeq()
        for n in news:
            j = old_index.get(n.get("was") or n.get("id"))
            if j is not None:
                m = old_nodes[j]
                _update_map(m, _node_data(n, m))
            else:
                m = _new_node(n, flow=False)
            seq.append(m)
        raw["nodes"] = seq
        start, end, dash = t.item_range(raw_pipes, i)
        t.replace(start, end, t.emit_item(raw, dash))
        return True
    flow_style = all(isinstance(m, CommentedMap) and m.fa.flow_style() for m in old_nodes)
    used: set[int] = set()
    for n in news:
        j = old_index.get(n.get("was") or n.get("id"))
        if j is None or j in used:
            continue
        used.add(j)
        if _same_node(olds[j], n):
            continue
        start, end, dash = t.item_range(old_nodes, j)
        data = _node_data(n, old_nodes[j])
        if _splice_keys(t, old_nodes[j], data, start, end) or _splice_flow_scalars(t, old_nodes[j], data):
            continue  # only the changed keys' lines (or values) were touched
        m = copy.deepcopy(old_nodes[j])
        _update_map(m, _node_data(n, m))
        t.replace(start, end, t.keep_eol_comment(old_nodes, j, start, end, t.emit_item(m, dash)))
    for j in range(len(old_nodes)):
        if j not in used:
            start, end, dash = t.item_range(old_nodes, j)
            t.replace(t.leading_comments(start, dash), end, "")
    added = [n for n in news if old_index.get(n.get("was") or n.get("id")) is None]
    if added:
        last = max(range(len(old_nodes)), key=lambda j: t.item_range(old_nodes, j)[1])
        _, end, dash = t.item_range(old_nodes, last)
        t.replace(end, end, "".join(t.emit_item(_new_node(n, flow_style), dash) for n in added))
    # the node order of the draft is not the file's: the graph is defined by inputs, not order
    return True


def _splice_keys(t: _Text, m: Any, data: dict[str, Any], start: int, end: int) -> bool:
    """Change a block-style node key by key: a changed key whose old value sits on its own line
    gets that line written again, a removed one loses its lines, new ones go after the last key.
    ``False`` (and nothing done) where the node is not laid out that way."""
    if not isinstance(m, CommentedMap) or m.fa.flow_style() or getattr(m, "merge", None) or not len(m):
        return False
    keys = list(m)
    lines = [m.lc.key(k)[0] for k in keys]
    if lines != sorted(lines) or lines[0] != start or len(set(lines)) != len(lines):
        return False
    col = m.lc.key(keys[0])[1]
    if any(m.lc.key(k)[1] != col for k in keys):
        return False

    def span(i: int) -> tuple[int, int]:
        first = lines[i]
        last = lines[i + 1] if i + 1 < len(keys) else end
        while last > first + 1 and t._blank_or_comment(t.lines[last - 1]):
            last -= 1
        return first, last

    edits: list[tuple[int, int, str]] = []
    for i, k in enumerate(keys):
        first, last = span(i)
        if k not in data:
            if i == 0:
                return False  # its line holds the item's dash
            edits.append((first, last, ""))
            continue
        if _plain(m[k]) == data[k]:
            continue
        if last != first + 1:
            return False  # a value over several lines: written again as a whole node
        line = _key_line(k, _styled(m[k], data[k]), col)
        if line is None:
            return False
        line = t.lines[first][:col] + line[col:]  # the first key's line starts with the item's dash
        tokens = m.ca.items.get(k) or []
        tok = tokens[2] if len(tokens) > 2 else None
        if tok is not None and tok.value.strip().startswith("#") and "\n" not in tok.value.strip():
            old = t.lines[first]
            gap = max(1, tok.column - len(old[: tok.column].rstrip()))
            line = line.rstrip("\n") + " " * gap + tok.value.strip() + "\n"
        edits.append((first, last, line))
    new_keys = [k for k in data if k not in m]
    if new_keys:
        text = ""
        for k in new_keys:
            line = _key_line(k, data[k], col)
            if line is None:
                return False
            text += line
        edits.append((span(len(keys) - 1)[1], span(len(keys) - 1)[1], text))
    for e in edits:
        t.replace(*e)
    return True


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, str | int | float | bool)


def _splice_flow_scalars(t: _Text, m: Any, data: dict[str, Any]) -> bool:
    """In a flow-style node (``{id: a, above: 95}``, maybe over several lines) where only scalar
    values changed, rewrite just those values in place. ``False`` (nothing done) otherwise."""
    if not isinstance(m, CommentedMap) or not m.fa.flow_style() or list(m) != list(data):
        return False
    by_line: dict[int, list[tuple[int, int, str]]] = {}
    for k in m:
        old, new = m[k], data[k]
        if _plain(old) == new:
            continue
        if not (_scalar(old) and _scalar(new)) or isinstance(old, dict | list):
            return False
        line = _key_line(k, _styled(old, new), 0)
        if line is None:
            return False
        text = line.rstrip("\n").split(": ", 1)[1] if ": " in line else None
        if text is None:
            return False
        vline, vcol = m.lc.value(k)
        end = _scalar_end(t.lines[vline], vcol)
        if end is None:
            return False
        by_line.setdefault(vline, []).append((vcol, end, text))
    for vline, parts in by_line.items():
        s = t.lines[vline]
        for vcol, end, text in sorted(parts, reverse=True):
            s = s[:vcol] + text + s[end:]
        t.replace(vline, vline + 1, s)
    return bool(by_line)


def _scalar_end(line: str, col: int) -> int | None:
    """Where a scalar written at ``col`` of a flow collection ends (quoted or plain)."""
    if col >= len(line):
        return None
    q = line[col]
    if q == '"':
        i = col + 1
        while i < len(line):
            if line[i] == "\\":
                i += 2
                continue
            if line[i] == '"':
                return i + 1
            i += 1
        return None
    if q == "'":
        i = col + 1
        while i < len(line):
            if line[i] == "'":
                if i + 1 < len(line) and line[i + 1] == "'":
                    i += 2
                    continue
                return i + 1
            i += 1
        return None
    i = col
    while i < len(line) and line[i] not in ",}]\n" and line[i : i + 2] != " #":
        i += 1
    while i > col and line[i - 1] == " ":
        i -= 1
    return i if i > col else None


def _styled(old: Any, new: Any) -> Any:
    """A new text value quoted the way the old one was (``"..."`` stays ``"..."``)."""
    if isinstance(new, str) and isinstance(old, DoubleQuotedScalarString | SingleQuotedScalarString):
        return type(old)(new)
    return new


def _key_line(key: str, value: Any, col: int) -> str | None:
    """``key: value`` on one line at column ``col`` (collections in flow style), or ``None``."""
    y = _yaml()
    buf = io.StringIO()
    m = CommentedMap()
    m[key] = _flowed(value, depth=1)
    y.dump(m, buf)
    out = buf.getvalue()
    if out.count("\n") != 1:
        return None
    return " " * col + out


def _append_pipelines(t: _Text, doc: CommentedMap, raw_pipes: CommentedSeq, items: list[Any]) -> None:
    if "pipelines" in doc and len(raw_pipes) > 0:
        last = len(raw_pipes) - 1
        _, end, dash = t.item_range(raw_pipes, last)
        t.replace(end, end, "".join(t.emit_item(item, dash) for item in items))
        return
    dash = t.dash_offset
    body = "".join(t.emit_item(item, dash) for item in items)
    if "pipelines" in doc:  # `pipelines: []` or `pipelines:` with nothing: the key's line becomes a block
        line = doc.lc.key("pipelines")[0]
        end = line + 1
        t.replace(line, end, "pipelines:\n" + body)
        return
    # no section yet: before `console:` when there is one (the order the docs use), else at the end
    if "console" in doc:
        line = doc.lc.key("console")[0]
        while line > 0 and t.lines[line - 1].strip().startswith("#"):
            line -= 1
        t.replace(line, line, "pipelines:\n" + body)
    else:
        t.replace(len(t.lines), len(t.lines), "pipelines:\n" + body)


def connections_model(text: str) -> dict[str, Any]:
    """The ``connections`` section of a config text as plain values: ``{name: {type, ...options}}``."""
    doc, _, _ = _load(text)
    conns = doc.get("connections") if isinstance(doc, dict) else None
    return {str(k): _plain(v) for k, v in conns.items()} if isinstance(conns, dict) else {}


def apply_connections(text: str, conns: Any) -> str:
    """Write the ``connections`` section ``conns`` (``{name: {options}}``) into the config ``text``.

    Only that section's lines change: an unchanged connection keeps its bytes and comments, a
    changed one keeps its unchanged keys where they were; the rest of the file is untouched.
    """
    if not isinstance(conns, dict) or not all(isinstance(k, str) and isinstance(v, dict) for k, v in conns.items()):
        raise DraftError('connections are {"name": {"type": "mqtt", ...}}')
    if conns == connections_model(text):
        return text
    doc, seq_indent, dash_offset = _load(text)
    if not isinstance(doc, CommentedMap):
        raise DraftError("the config file is not a mapping of sections")
    lines = text.splitlines(keepends=True)
    old = doc.get("connections")
    new = copy.deepcopy(old) if isinstance(old, CommentedMap) else CommentedMap()
    for k in [k for k in new if k not in conns]:
        del new[k]
    for name, opts in conns.items():
        if isinstance(new.get(name), CommentedMap):
            if _plain(new[name]) != opts:
                _update_map(new[name], opts)
        else:
            m = CommentedMap(opts)
            if (
                isinstance(old, CommentedMap)
                and old
                and all(isinstance(v, CommentedMap) and v.fa.flow_style() for v in old.values())
            ):
                m.fa.set_flow_style()  # in the style of its siblings
            new[name] = m
    y = _yaml()
    y.indent(mapping=2, sequence=seq_indent, offset=dash_offset)
    buf = io.StringIO()
    y.dump(CommentedMap([("connections", new)]) if new else CommentedMap([("connections", {})]), buf)
    out = buf.getvalue().splitlines(keepends=True)
    while out and (not out[-1].strip() or out[-1].lstrip().startswith("#")):
        out.pop()  # comments ruamel keeps after the section are already in the text after it
    block = "".join(out)
    keys = list(doc)
    if "connections" in doc:
        start = doc.lc.key("connections")[0]
        i = keys.index("connections")
        end = doc.lc.key(keys[i + 1])[0] if i + 1 < len(keys) else len(lines)
        while end > start + 1 and (not lines[end - 1].strip() or lines[end - 1].lstrip().startswith("#")):
            end -= 1  # blank lines and comments above the next section belong to it
    else:  # a new section before the pipelines (or at the end)
        start = end = doc.lc.key("pipelines")[0] if "pipelines" in doc else len(lines)
    return "".join([*lines[:start], block, *lines[end:]])
