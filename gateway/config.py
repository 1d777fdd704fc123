"""Loading and validating the one YAML config file.

Every problem is reported as ``FILE:LINE: path.to.field: message``, all of them at once: YAML
syntax, ``${ENV}`` substitution, unknown keys, wrong types, pipeline graph errors (unknown
inputs, cycles, sinks used as inputs, duplicate ids) and node-specific checks such as
expressions that do not compile.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from .errors import ConfigError, ConfigIssue
from .node import ID_PATTERN, Duration, NodeOptions, get_node_type, node_types, types_needing_tls
from .redact import SECRET, remember, secrets_of
from .schema import LlmConfig, OutboxConfig, StateConfig

__all__ = [
    "ConsoleConfig",
    "ConsoleUser",
    "GatewayConfig",
    "LoadedConfig",
    "MqttConnection",
    "PipelineConfig",
    "SluiceConfig",
    "json_schema",
    "load_config",
    "parse_config",
]


# gateway.storage: low_wear: how often node state is saved and committed when gateway.state is not given
LOW_WEAR_CHECKPOINT = 30.0
LOW_WEAR_COMMIT = 5.0


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GatewayConfig(_Section):
    id: str = Field(pattern=ID_PATTERN, description="Names this gateway in MQTT topics and outgoing messages.")
    data_dir: str = Field("./data", description="Where state, dead letters and sequence numbers live.")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = Field("text", description="json: one JSON object per line.")
    queue_size: int = Field(10_000, ge=10, description="Events each pipeline buffers before its sources pause.")
    sink_queue_size: int = Field(10_000, ge=10, description="Events each sink buffers before the pipeline waits.")
    shutdown_timeout: Duration = Field(10.0, description="How long a clean stop may take to drain queues.")
    outbox: OutboxConfig = Field(
        default_factory=OutboxConfig, description="Store-and-forward for everything bound for the broker."
    )
    state: StateConfig = Field(
        default_factory=StateConfig, description="Node state (open windows, keyed state) saved in state.db."
    )
    storage: Literal["durable", "low_wear"] = Field(
        "durable",
        description="low_wear: fewer, larger writes for SD cards: state saved every 30 s (unless gateway.state "
        "says otherwise), and the outbox and alerts committed without waiting for the disk (a power cut may "
        "lose the last second of them; a crash of the process loses nothing). See docs/install.md.",
    )

    @model_validator(mode="after")
    def _low_wear_state(self) -> GatewayConfig:
        if self.storage == "low_wear" and "state" not in self.model_fields_set:
            self.state = StateConfig(checkpoint_interval=LOW_WEAR_CHECKPOINT, commit_interval=LOW_WEAR_COMMIT)
        return self


class MqttConnection(_Section):
    type: Literal["mqtt"]
    host: str = "localhost"
    port: int = Field(1883, ge=1, le=65535)
    username: str | None = None
    password: str | None = Field(None, json_schema_extra=SECRET)
    client_id: str | None = Field(None, description="Prefix for client ids; default: the gateway id.")
    keepalive: int = Field(30, ge=5, le=3600)
    version: Literal["5", "3.1.1"] = "5"
    status: bool = Field(True, description="Publish retained sluice/<gateway>/status with a last will.")
    reconnect_max: Duration = Field(30.0, description="Cap of the exponential reconnect backoff.")
    tls: bool = Field(
        False,
        description="Connect over TLS, verifying the broker's certificate and name "
        "(on by itself when ca_file or cert_file is set).",
    )
    ca_file: str | None = Field(
        None, description="PEM CA certificate(s) to verify the broker; default: the system's trust store."
    )
    cert_file: str | None = Field(None, description="PEM client certificate for mutual TLS.")
    key_file: str | None = Field(None, description="PEM private key of cert_file (if not in the same file).")
    tls_insecure: bool = Field(
        False, description="Skip verifying the broker's certificate and name: for a test bench only."
    )

    @model_validator(mode="after")
    def _tls(self) -> MqttConnection:
        if self.key_file and not self.cert_file:
            raise ValueError("`key_file` goes with `cert_file`")
        if self.ca_file or self.cert_file:
            object.__setattr__(self, "tls", True)
        return self


class ConsoleUser(_Section):
    name: str = Field(pattern=ID_PATTERN)
    password_hash: str = Field(
        pattern=r"^\$argon2(id|i|d)\$",
        description="An argon2 hash, e.g. from `sluice hash-password`; never the password.",
        json_schema_extra=SECRET,
    )
    role: Literal["viewer", "admin"] = "viewer"


class ConsoleConfig(_Section):
    enabled: bool = True
    host: str = Field("127.0.0.1", description="Bind address; localhost unless you mean otherwise.")
    port: int = Field(8080, ge=0, le=65535)
    auth: bool = Field(
        True,
        description="Require a login or API token for pages and /api/*; "
        "/healthz and /metrics stay open for monitoring.",
    )
    users: list[ConsoleUser] = Field(
        default_factory=list,
        description="Fixed accounts; when set, the console does not offer first-visit account creation.",
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host names the console may be reached by, besides localhost and its bind address; "
        "any other Host header is refused (DNS rebinding). Bound to a non-loopback address, the check "
        "applies once this is set.",
    )
    tls_cert: str | None = Field(None, description="PEM certificate file: serve HTTPS (with tls_key).")
    tls_key: str | None = Field(None, description="PEM private key file for tls_cert.")


class PipelineConfig(_Section):
    name: str = Field(pattern=ID_PATTERN)
    description: str | None = None
    enabled: bool = Field(
        True,
        description="false: the pipeline is kept in the file and validated, but not run "
        "(its saved state is kept for when it is enabled again).",
    )
    nodes: list[dict[str, Any]] = Field(min_length=1)


class SluiceConfig(_Section):
    gateway: GatewayConfig
    connections: dict[str, MqttConnection] = Field(default_factory=dict)
    llm: LlmConfig = Field(default_factory=LlmConfig, description="LLM providers, used by name by llm nodes.")
    pipelines: list[PipelineConfig] = Field(default_factory=list)
    console: ConsoleConfig = Field(default_factory=ConsoleConfig)


@dataclass
class LoadedConfig:
    """A validated config: the sections plus each pipeline's parsed node options."""

    config: SluiceConfig
    nodes: dict[str, list[NodeOptions]]
    path: str
    text: str
    lines: dict[tuple[Any, ...], int] = field(default_factory=dict)


# --- YAML with line numbers --------------------------------------------------------------

_ENV = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")


# Aliases let a few hundred bytes stand for billions of values (a "billion laughs" bomb), and an
# alias inside the node it names would make the config infinitely deep. Both are refused while
# composing, before anything is expanded; the limits are far beyond any real config.
MAX_YAML_VALUES = 100_000
MAX_YAML_DEPTH = 64


class _AliasError(yaml.composer.ComposerError):
    """Refused aliases or nesting: reported as a config error at the line of the offending node."""


class _Loader(yaml.SafeLoader):
    """A safe loader made for one parse (it keeps what it constructs, so it is never shared).

    Composing counts what every node stands for with its aliases expanded, refuses an alias to a
    node that is still open (recursion) and nesting deeper than :data:`MAX_YAML_DEPTH`.
    """

    def __init__(self, text: str):
        super().__init__(text)
        self._open: set[str] = set()  # anchors of the nodes being composed
        self._values: dict[int, int] = {}  # id(node) -> values it stands for, aliases expanded
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self._open:
                raise _AliasError(
                    None,
                    None,
                    f"alias *{event.anchor} is inside the node &{event.anchor} it refers to (a recursive alias)",
                    event.start_mark,
                )
            return super().compose_node(parent, index)  # type: ignore[no-any-return]
        if self._depth >= MAX_YAML_DEPTH:
            raise _AliasError(None, None, f"nested more than {MAX_YAML_DEPTH} levels deep", event.start_mark)
        anchor = event.anchor
        if anchor is not None:
            self._open.add(anchor)
        self._depth += 1
        try:
            node: yaml.Node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
            if anchor is not None:
                self._open.discard(anchor)
        size = self._values
        if isinstance(node, yaml.SequenceNode):
            n = 1 + sum(size[id(item)] for item in node.value)
        elif isinstance(node, yaml.MappingNode):
            n = 1 + sum(size[id(k)] + size[id(v)] for k, v in node.value)
        else:
            n = 1
        if n > MAX_YAML_VALUES:
            raise _AliasError(
                None,
                None,
                f"aliases expand this to more than {MAX_YAML_VALUES:,} values; refused (an alias bomb?)",
                node.start_mark,
            )
        size[id(node)] = n
        return node


class _Reader:
    def __init__(self, file: str, env: dict[str, str] | None, loader: _Loader):
        self.file = file
        self.env = env  # None: a draft, whose ${VAR} references stay as written
        self.loader = loader
        self.lines: dict[tuple[Any, ...], int] = {}
        self.issues: list[ConfigIssue] = []
        self.values: list[tuple[str, str, str]] = []  # (name, value, path) substituted: never echoed
        self.unresolved: dict[str, tuple[Any, ...]] = {}  # a draft's values holding ${VAR}, by dotted path

    def issue(self, line: int, path: tuple[Any, ...], message: str) -> None:
        self.issues.append(ConfigIssue(self.file, line, _dotted(path), message))

    def build(self, node: yaml.Node, path: tuple[Any, ...]) -> Any:
        line = node.start_mark.line + 1
        self.lines.setdefault(path, line)
        if isinstance(node, yaml.MappingNode):
            # YAML merge keys (`<<: *defaults`): merged pairs come first; the mapping's own keys
            # override them, and of several merged mappings the first wins (as the YAML spec says).
            # Only a key written twice in the mapping itself is a duplicate.
            merge_tag = "tag:yaml.org,2002:merge"
            n_own = sum(1 for k, _ in node.value if k.tag != merge_tag)
            try:
                self.loader.flatten_mapping(node)
            except yaml.constructor.ConstructorError as exc:
                mark = exc.problem_mark or node.start_mark
                self.issue(mark.line + 1, path, f"YAML merge: {exc.problem}")
                node.value = [(k, v) for k, v in node.value if k.tag != merge_tag]
            n_merged = len(node.value) - n_own
            out: dict[Any, Any] = {}
            own: set[Any] = set()
            for i, (k_node, v_node) in enumerate(node.value):
                key = self.loader.construct_scalar(k_node) if isinstance(k_node, yaml.ScalarNode) else None
                if key is None or not isinstance(k_node, yaml.ScalarNode):
                    self.issue(k_node.start_mark.line + 1, path, "mapping keys must be plain names")
                    continue
                if i >= n_merged:
                    if key in own:
                        self.issue(k_node.start_mark.line + 1, (*path, key), "duplicate key")
                        continue
                    own.add(key)
                elif key in out:
                    continue  # an earlier merged mapping already gave it
                self.lines[(*path, key)] = k_node.start_mark.line + 1
                out[key] = self.build(v_node, (*path, key))
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
        try:
            value = self.loader.construct_object(node, deep=True)
        except yaml.YAMLError as exc:  # e.g. a bare `=` (YAML 1.1's value tag) or an unknown !tag
            problem = getattr(exc, "problem", None) or str(exc)
            self.issue(line, path, f"YAML: {problem}; quote the value if it is text")
            return None
        except (ValueError, OverflowError, IndexError, AttributeError, TypeError) as exc:
            # PyYAML's constructors on what they do not expect: an integer of over 4,300 digits, a
            # date like 2001-13-45, an empty `!!int` or `!!timestamp`
            problem = str(exc).split(";")[0] if isinstance(exc, ValueError | OverflowError) else "not a valid value"
            self.issue(line, path, f"YAML: {problem}; quote the value if it is text")
            return None
        if isinstance(value, str) and "$" in value:
            value = self.substitute(value, line, path)
        return value

    def substitute(self, text: str, line: int, path: tuple[Any, ...]) -> str:
        env = self.env
        if env is None:
            if any(m.group(0) != "$$" for m in _ENV.finditer(text)):
                self.unresolved[_dotted(path)] = path
            return text

        def repl(m: re.Match[str]) -> str:
            if m.group(0) == "$$":
                return "$"
            name, default = m.group(1), m.group(2)
            if name in env and env[name] != "":
                self.values.append((name, env[name], _dotted(path)))
                return env[name]
            if default is not None:
                return default
            self.issue(line, path, f"environment variable {name} is not set (use ${{{name}:-default}} for a default)")
            return ""

        return _ENV.sub(repl, text)


def _dotted(path: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in path)


def _line_for(lines: dict[tuple[Any, ...], int], path: tuple[Any, ...]) -> int:
    for n in range(len(path), -1, -1):
        line = lines.get(tuple(path[:n]))
        if line is not None:
            return line
    return 1


def _close_matches(word: str, possibilities: list[str], n: int) -> list[str]:
    """``difflib.get_close_matches``, imported only when a config has a mistake to hint at."""
    import difflib

    return difflib.get_close_matches(word, possibilities, n=n)


def _message(err: dict[str, Any], model: type[BaseModel] | None) -> str:
    kind = err.get("type", "")
    loc = err.get("loc", ())
    if kind == "extra_forbidden":
        name = str(loc[-1]) if loc else "?"
        known: list[str] = []
        if model is not None:
            known = list(_fields_at(model, loc[:-1]))
        hint = _close_matches(name, known, n=1)
        msg = f"unknown field {name!r}"
        if hint:
            msg += f"; did you mean {hint[0]!r}?"
        elif known:
            msg += f"; known fields: {', '.join(sorted(known))}"
        return msg
    if kind == "missing":
        return "required field is missing"
    msg = str(err.get("msg", "invalid value"))
    return msg[0].lower() + msg[1:] if msg else msg


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    current: Any = model
    for part in loc:
        if isinstance(part, int) or not (isinstance(current, type) and issubclass(current, BaseModel)):
            ann = None
        else:
            f = current.model_fields.get(part)
            ann = f.annotation if f else None
        if ann is None:
            continue
        args = [a for a in getattr(ann, "__args__", ()) if isinstance(a, type)]
        current = next((a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _pydantic_issues(exc: ValidationError, prefix: tuple[Any, ...], r: _Reader, model: type[BaseModel]) -> None:
    for err in exc.errors(include_url=False):
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        path = (*prefix, *loc)
        r.issue(_line_for(r.lines, path), path, _message(err, model))


# --- loading -------------------------------------------------------------------------------


def load_config(path: str | os.PathLike[str], env: dict[str, str] | None = None) -> LoadedConfig:
    """Read and validate a config file; raise :class:`ConfigError` listing every problem."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([ConfigIssue(str(path), 1, "", f"cannot read config: {exc.strerror or exc}")]) from None
    except UnicodeDecodeError:
        raise ConfigError([ConfigIssue(str(path), 1, "", "config is not UTF-8 text")]) from None
    return parse_config(text, str(path), env)


def _syntax_line(text: str, exc: yaml.MarkedYAMLError) -> tuple[int, int]:
    """The line to blame for a YAML syntax error, and the line where the parser noticed it.

    The parser notices a missing `]`, `}` or quote only at the next token, which is often on a
    later line: an error found at the start of a line (or at the end of the text) is blamed on
    the last line with content before it; an unclosed quote or bracket that runs to the end of
    the text is blamed on the line where it opened.
    """
    mark = exc.problem_mark or exc.context_mark
    if mark is None:
        return 1, 1
    noticed = mark.line + 1
    if exc.context_mark is not None and "end of stream" in (exc.problem or ""):
        return exc.context_mark.line + 1, noticed
    lines = re.split("\r\n|[\r\n\x85\u2028\u2029]", text)  # YAML's line breaks
    if mark.line >= len(lines) or mark.line == 0 or lines[mark.line][: mark.column].strip():
        return noticed, noticed
    for i in range(mark.line - 1, -1, -1):
        if lines[i].strip() and not lines[i].lstrip().startswith("#"):
            return i + 1, noticed
    return noticed, noticed


def parse_config(
    text: str,
    file: str = "<config>",
    env: dict[str, str] | None = None,
    *,
    substitute: bool = True,
    model_paths: list[str] | None = None,
) -> LoadedConfig:
    """Parse and validate config text; raise :class:`ConfigError` listing every problem.

    ``substitute=False`` checks a draft that is not going to run (the console's validate): its
    ``${VAR}`` references are left as written and not looked up, and a value holding one is not
    judged. Values of substituted variables never appear in an error: the reference does instead.
    ``model_paths`` (given for text from the console) are the only files and directories a local
    model file may be (in); a path elsewhere is refused without looking at it.
    """
    try:
        loader = _Loader(text)  # one per parse: it keeps every object it constructs
        root = loader.get_single_node()
    except _AliasError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else 1
        raise ConfigError([ConfigIssue(file, line, "", f"YAML: {exc.problem}")]) from None
    except yaml.MarkedYAMLError as exc:
        line, noticed = _syntax_line(text, exc)
        where = f" (noticed at line {noticed})" if noticed != line else ""
        raise ConfigError([ConfigIssue(file, line, "", f"YAML syntax: {exc.problem or exc}{where}")]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([ConfigIssue(file, 1, "", f"YAML: {exc}")]) from None
    if root is None:
        raise ConfigError([ConfigIssue(file, 1, "", "config is empty; it needs at least a 'gateway' section")])
    r = _Reader(file, None if not substitute else dict(os.environ) if env is None else env, loader)
    data = r.build(root, ())
    if not isinstance(data, dict):
        raise ConfigError([ConfigIssue(file, 1, "", "config must be a mapping of sections")])

    cfg: SluiceConfig | None = None
    try:
        cfg = SluiceConfig.model_validate(data, context=_model_context(model_paths))
    except ValidationError as exc:
        _pydantic_issues(exc, (), r, SluiceConfig)
        if r.unresolved:
            # a draft: judge the rest as if its ${VAR} values were not there (their defaults apply)
            cfg = _draft_config(data, r.unresolved.values(), model_paths)

    nodes: dict[str, list[NodeOptions]] = {}
    raw_pipes = data.get("pipelines") if isinstance(data.get("pipelines"), list) else []
    seen_pipes: set[str] = set()
    for pi, pipe in enumerate(raw_pipes):
        if not isinstance(pipe, dict):
            continue
        name = pipe.get("name")
        if isinstance(name, str):
            if name in seen_pipes:
                where = ("pipelines", pi, "name")
                r.issue(_line_for(r.lines, where), where, f"duplicate pipeline name {name!r}")
            seen_pipes.add(name)
        raw_nodes = pipe.get("nodes") if isinstance(pipe.get("nodes"), list) else []
        parsed = _parse_nodes(raw_nodes, ("pipelines", pi, "nodes"), r, data)
        if isinstance(name, str):
            nodes[name] = parsed

    if r.unresolved:
        r.issues = [i for i in r.issues if not _under(i.path, set(r.unresolved))]
    if r.values:
        r.issues = [_without_values(i, r.values) for i in r.issues]
    if r.issues or cfg is None:
        r.issues.sort(key=lambda i: i.line)
        raise ConfigError(r.issues)
    if substitute:  # about to run: its secrets are looked for in everything that leaves the process
        remember(secrets_of(cfg))
        remember(s for opts in nodes.values() for o in opts for s in secrets_of(o))
    return LoadedConfig(cfg, nodes, file, text, r.lines)


def _draft_config(
    data: dict[str, Any], unresolved: Iterable[tuple[Any, ...]], model_paths: list[str] | None
) -> SluiceConfig | None:
    stripped = copy.deepcopy(data)
    for path in unresolved:
        parent: Any = stripped
        for part in path[:-1]:
            if isinstance(parent, dict):
                parent = parent.get(part)
            elif isinstance(parent, list) and isinstance(part, int) and part < len(parent):
                parent = parent[part]
        if isinstance(parent, dict):
            parent.pop(path[-1], None)
    try:
        return SluiceConfig.model_validate(stripped, context=_model_context(model_paths))
    except ValidationError as exc:
        # what is still wrong is either reported already or lies under a ${VAR} (required there)
        if all(isinstance(e["loc"], tuple) and e["type"] == "missing" for e in exc.errors()):
            return SluiceConfig.model_construct(**stripped)
        return None


def _under(path: str, prefixes: set[str]) -> bool:
    return any(path == p or path.startswith(p + ".") for p in prefixes)


def _without_values(issue: ConfigIssue, values: list[tuple[str, str, str]]) -> ConfigIssue:
    """The issue with every substituted variable's value written as its ``${NAME}`` instead (a
    value of a few characters only where it was substituted: elsewhere it is likely a coincidence)."""
    message = issue.message
    for name, value, where in sorted(values, key=lambda v: -len(v[1])):
        if len(value) >= 4 or _under(issue.path, {where}):
            message = message.replace(value, f"${{{name}}}")
    return ConfigIssue(issue.file, issue.line, issue.path, message) if message != issue.message else issue


def _model_context(model_paths: list[str] | None) -> dict[str, Any] | None:
    """Validation context: where local model files may be, when the text came from the console."""
    if model_paths is None:
        return None
    return {"model_paths": list(model_paths)}


# what a node type this process cannot load for want of OpenSSL needs (the editor's palette says it too)
NEEDS_TLS = (
    "needs restart (started without TLS): its library needs OpenSSL, which this gateway keeps out "
    "(SLUICE_TLS=auto); add the node in the config file and restart the gateway"
)


def _parse_nodes(raw: list[Any], prefix: tuple[Any, ...], r: _Reader, data: dict[str, Any]) -> list[NodeOptions]:
    out: list[NodeOptions] = []
    ids: dict[str, int] = {}
    broken: set[str] = set()  # ids of nodes already reported invalid: not also "unknown" as inputs
    for ni, item in enumerate(raw):
        path = (*prefix, ni)
        if not isinstance(item, dict):
            r.issue(_line_for(r.lines, path), path, "a node must be a mapping with id and type")
            continue
        if isinstance(item.get("id"), str):
            broken.add(item["id"])
        type_name = item.get("type")
        cls = get_node_type(type_name) if isinstance(type_name, str) else None
        if cls is None:
            known = sorted(node_types())
            if type_name in types_needing_tls():
                r.issue(_line_for(r.lines, (*path, "type")), (*path, "type"), f"node type {type_name!r} {NEEDS_TLS}")
                continue
            hint = _close_matches(str(type_name), known, n=1) if type_name else []
            what = "missing node type" if type_name is None else f"unknown node type {type_name!r}"
            more = f"; did you mean {hint[0]!r}?" if hint else f"; known types: {', '.join(known)}"
            r.issue(_line_for(r.lines, (*path, "type")), (*path, "type"), what + more)
            continue
        try:
            opts = cls.Options.model_validate(item)
        except ValidationError as exc:
            _pydantic_issues(exc, path, r, cls.Options)
            continue
        if opts.id in ids:
            first = f"pipelines.{prefix[1]}.nodes.{ids[opts.id]}" if len(prefix) > 1 else str(ids[opts.id])
            r.issue(
                _line_for(r.lines, (*path, "id")), (*path, "id"), f"duplicate node id {opts.id!r} (first at {first})"
            )
            continue
        ids[opts.id] = ni
        for fld, msg in cls.check(opts, data):
            fpath = (*path, *fld.split(".")) if fld else path
            r.issue(_line_for(r.lines, fpath), fpath, msg)
        out.append(opts)
    _check_graph(out, ids, prefix, r, broken - set(ids))
    return out


def _check_graph(
    nodes: list[NodeOptions], index: dict[str, int], prefix: tuple[Any, ...], r: _Reader, broken: set[str]
) -> None:
    by_id = {n.id: n for n in nodes}
    for n in nodes:
        path = (*prefix, index[n.id], "input")
        kind = get_node_type(n.type).kind  # type: ignore[union-attr]
        if kind == "source" and n.input:
            r.issue(_line_for(r.lines, path), path, f"{n.type!r} is a source and takes no input")
            continue
        if kind != "source" and not n.input:
            r.issue(_line_for(r.lines, path), path, f"node {n.id!r} needs an input (the id of an upstream node)")
            continue
        for up in n.input:
            if up == n.id:
                r.issue(_line_for(r.lines, path), path, f"node {n.id!r} cannot take its own output as input")
            elif up in broken:
                continue  # that node's own problems are reported where it is defined
            elif up not in by_id:
                hint = _close_matches(up, list(by_id), n=1)
                more = f"; did you mean {hint[0]!r}?" if hint else ""
                r.issue(_line_for(r.lines, path), path, f"unknown input {up!r}{more}")
            elif get_node_type(by_id[up].type).kind == "sink":  # type: ignore[union-attr]
                msg = f"{up!r} is a sink ({by_id[up].type}) and has no output to take"
                r.issue(_line_for(r.lines, path), path, msg)
    # cycles: depth-first search over valid edges
    state: dict[str, int] = {}

    def visit(nid: str, stack: list[str]) -> None:
        state[nid] = 1
        for up in by_id[nid].input:
            if up not in by_id or up == nid:
                continue
            if state.get(up) == 1:
                cyc = [*stack[stack.index(up) :], up] if up in stack else [nid, up]
                path = (*prefix, index[nid], "input")
                r.issue(_line_for(r.lines, path), path, "cycle: " + " -> ".join(reversed(cyc)))
            elif up not in state:
                visit(up, [*stack, up])
        state[nid] = 2

    for nid in by_id:
        if nid not in state:
            visit(nid, [nid])


def json_schema() -> dict[str, Any]:
    """JSON Schema of the whole config, with every registered node type's options."""
    option_models = [cls.Options for cls in node_types().values()]
    node_union = Annotated[Union[tuple(option_models)], Field(discriminator="type")]  # type: ignore[valid-type]  # noqa: UP007
    pipe = create_model("Pipeline", __base__=PipelineConfig, nodes=(list[node_union], ...))  # type: ignore[valid-type]
    root = create_model("SluiceConfigSchema", __base__=SluiceConfig, pipelines=(list[pipe], []))  # type: ignore[valid-type]
    schema = root.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Sluice gateway config"
    return schema
