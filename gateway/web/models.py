"""The shapes of the console API's request and response bodies, for the OpenAPI document.

Bodies with a fixed shape are pydantic models (each becomes ``#/components/schemas/<Name>``);
the larger read-only answers whose keys come from the runtime's own ``describe()`` dicts are JSON
Schema dicts next to them. The route table (:mod:`gateway.web.routes`) names one of either per
request body and per answer.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from ..node import ID_PATTERN

Role = Literal["viewer", "admin"]
_NAME_PATTERN = "^[A-Za-z_][A-Za-z0-9_\\-]{0,63}$"


class Error(BaseModel):
    error: str


class Ok(BaseModel):
    ok: bool = True


# --- auth ----------------------------------------------------------------------------------


class Credentials(BaseModel):
    name: str
    password: str
    next: str = Field("", description="Where the page wants to go next")


class SetupRequest(BaseModel):
    name: str = Field(pattern=_NAME_PATTERN)
    password: str = Field(min_length=10)
    code: str


class NewUser(BaseModel):
    name: str = Field(pattern=_NAME_PATTERN)
    password: str = Field(min_length=10)
    role: Role = "viewer"


class UserChange(BaseModel):
    role: Role = "viewer"
    password: str = Field("", min_length=10)


class PasswordChange(BaseModel):
    current: str = Field(description="The password you log in with now")
    password: str = Field(min_length=10, description="The new password")


class NewToken(BaseModel):
    name: str = ""
    role: Role = "viewer"


class Session(BaseModel):
    user: str
    role: Role
    csrf: str


class LoggedIn(Session):
    next: str


class SessionState(BaseModel):
    auth: bool
    user: str | None = None
    role: Role | None = None
    csrf: str
    needs_setup: bool


class UserInfo(BaseModel):
    name: str = ""
    role: Role = "viewer"
    fixed: bool = False
    last_admin: bool = Field(False, description="The only admin: it can be neither removed nor made a viewer")


class Users(BaseModel):
    users: list[UserInfo] = []


class UserChanged(BaseModel):
    name: str = ""
    role: Role = "viewer"
    csrf: str = ""


class TokenInfo(BaseModel):
    id: str = ""
    name: str = ""
    role: Role = "viewer"
    created: float = 0.0
    last_used: float | None = None


class Tokens(BaseModel):
    tokens: list[TokenInfo] = []


class TokenCreated(BaseModel):
    id: str
    name: str = ""
    role: Role = "viewer"
    token: str


# --- config --------------------------------------------------------------------------------


class ConfigText(BaseModel):
    text: str


class ConfigFile(BaseModel):
    path: str
    text: str


class ConfigProblem(BaseModel):
    line: int
    path: str
    message: str


class ConfigCheck(BaseModel):
    valid: bool
    errors: list[ConfigProblem]
    pipelines: int = 0
    nodes: int = 0


class ConfigSaved(BaseModel):
    valid: bool
    errors: list[ConfigProblem]
    reloaded: bool = False
    saved: bool = False
    note: str | None = None
    changed: list[str] = []
    added: list[str] = []
    removed: list[str] = []
    unchanged: list[str] = []


class ConfigRefused(BaseModel):
    error: str
    reloaded: bool = False


# --- alerts --------------------------------------------------------------------------------


class SuppressRequest(BaseModel, extra="forbid"):
    alert_key: str = Field(min_length=1, max_length=200, description="glob, e.g. boiler/hot/*")
    until: float | datetime = Field(description="epoch seconds or an ISO 8601 time with an offset")
    note: str = Field("", max_length=2000)


class Suppression(BaseModel):
    id: int = 0
    pattern: str = ""
    until: float = 0.0
    note: str | None = None
    created_at: float = 0.0
    created_by: str = ""


class Suppressed(BaseModel):
    suppression: Suppression = Field(default_factory=Suppression)


class Suppressions(BaseModel):
    suppressions: list[Suppression] = []


class Unsuppressed(BaseModel):
    deleted: int = 0


# --- ingest --------------------------------------------------------------------------------


class IngestResult(BaseModel):
    accepted: int
    rejected: int
    errors: list[str] = []


# --- JSON Schema for the runtime's own describe() dicts ------------------------------------


def obj(props: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        out["required"] = required
    return out


STR: dict[str, Any] = {"type": "string"}
NUM: dict[str, Any] = {"type": "number"}
INT: dict[str, Any] = {"type": "integer"}
ANY_OBJ: dict[str, Any] = {"type": "object"}
SOURCE_ID: dict[str, Any] = {"type": "string", "pattern": ID_PATTERN}

_COUNTERS = obj({k: INT for k in ("in", "out", "errors", "dropped")})
_QUEUE = {"anyOf": [obj({k: INT for k in ("depth", "capacity", "high_water", "waiting_producers")}), {"type": "null"}]}
_NODE = obj(
    {
        "id": STR,
        "type": STR,
        "kind": {"type": "string", "enum": ["source", "operator", "sink"]},
        "inputs": {"type": "array", "items": STR},
        "counters": _COUNTERS,
        "queue": _QUEUE,
        "health": ANY_OBJ,
        "state": STR,
    },
    ["id", "type", "kind", "inputs", "counters"],
)
_PIPELINE = obj(
    {"name": STR, "state": STR, "started_at": {"type": ["number", "null"]}, "nodes": {"type": "array", "items": _NODE}},
    ["name", "state", "nodes"],
)
PIPELINES = obj(
    {"gateway_id": STR, "state": STR, "pipelines": {"type": "array", "items": _PIPELINE}},
    ["gateway_id", "state", "pipelines"],
)
HEALTH = obj(
    {
        "status": STR,
        "gateway_id": STR,
        "version": STR,
        "state": STR,
        "started_at": NUM,
        "uptime": NUM,
        "problems": {"type": "array", "items": STR},
        "connections": ANY_OBJ,
        "pipelines": ANY_OBJ,
        "dead_letters": INT,
    },
    ["status", "gateway_id", "state"],
)
_SYSTEM = obj(
    {
        "cpu_percent": NUM,
        "cpus": INT,
        "memory": ANY_OBJ,
        "disk": {"type": ["object", "null"]},
        "process": ANY_OBJ,
        "load": {"type": "array", "items": NUM},
    }
)
_PIPELINE_SUMMARY = obj(
    {
        "name": STR,
        "state": STR,
        "health": STR,
        "events_in": INT,
        "events_out": INT,
        "errors": INT,
        "queue_depth": INT,
        "dead_letters": INT,
    }
)
OVERVIEW = obj(
    {"gateway": HEALTH, "system": _SYSTEM, "pipelines": {"type": "array", "items": _PIPELINE_SUMMARY}, "ts": NUM},
    ["gateway", "system", "pipelines"],
)
NODE_DETAIL = obj({"id": STR, "options": ANY_OBJ}, ["id", "options"])
DEADLETTERS = obj({"total": INT, "recent": {"type": "array", "items": ANY_OBJ}}, ["total", "recent"])
ALERTS = obj({"alerts": {"type": "array", "items": ANY_OBJ}, "summary": ANY_OBJ}, ["alerts", "summary"])
ALERT = obj({"alert": ANY_OBJ}, ["alert"])
LOGS = obj({"lines": {"type": "array", "items": ANY_OBJ}})

# the editor's model of the config file
_EDITOR_NODE = obj(
    {
        "id": STR,
        "type": STR,
        "input": {"type": "array", "items": STR},
        "options": ANY_OBJ,
        "readonly": {"type": ["string", "null"], "description": "why the editor shows this node read-only"},
        "was": {"type": "string", "description": "in a draft: the node's id before a rename"},
    },
    ["id", "type"],
)
EDITOR_MODEL = obj(
    {
        "pipelines": {
            "type": "array",
            "items": obj(
                {
                    "name": STR,
                    "description": {"type": ["string", "null"]},
                    "nodes": {"type": "array", "items": _EDITOR_NODE},
                },
                ["name", "nodes"],
            ),
        }
    },
    ["pipelines"],
)
_EDITOR_ERROR = obj(
    {
        "pipeline": {"type": ["string", "null"]},
        "node": {"type": ["string", "null"]},
        "field": {"type": "string", "description": "dotted path inside the node, e.g. sensors.0.base"},
        "line": INT,
        "message": STR,
    }
)
EDITOR_CHECKED = obj(
    {
        "valid": {"type": "boolean"},
        "errors": {"type": "array", "items": _EDITOR_ERROR},
        "changed": {"type": "boolean"},
        "diff": {"type": "string", "description": "unified diff of the YAML file"},
    }
)
