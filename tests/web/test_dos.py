"""An admin session (perhaps a stolen one) cannot freeze the gateway through the config API.

Alias bombs and recursive aliases are refused as config errors at their line, expressions beyond
the cost budget are refused at validation, and /healthz keeps answering meanwhile.
"""

from __future__ import annotations

import asyncio

import aiohttp

from gateway.runtime import Gateway
from tests._util import wait_for
from tests.gateway.test_config_dos import BILLION_LAUGHS, HOSTILE_CEL, pipeline_with_filter

from .conftest import Browserish, base_url


async def test_alias_bomb_and_recursive_alias_are_config_errors(gw: Gateway, admin: Browserish) -> None:
    bomb = "gateway: {id: g}\n" + BILLION_LAUGHS + "\n"
    for path in ("/api/config/validate", "/api/config/save"):
        status, r = await admin.post(path, bomb, headers={"Content-Type": "text/yaml"})
        assert status == 200 and r["valid"] is False, (path, status, r)
        (err,) = r["errors"]
        assert err["line"] == 7 and err["message"].startswith("YAML: aliases expand this to more than 100,000 values")
    recursive = "gateway: {id: g}\nconsole:\n  users: &u\n    - name: x\n    - *u\n"
    for path in ("/api/config/validate", "/api/config/save"):
        status, r = await admin.post(path, {"text": recursive})
        assert status == 200 and r["valid"] is False, (path, status, r)
        (err,) = r["errors"]
        assert err["line"] == 5 and "alias *u is inside the node &u" in err["message"], err
    # the running config is untouched
    status, d = await admin.get("/api/config")
    assert status == 200 and "name: plant" in d["text"]


async def test_healthz_answers_while_a_hostile_expression_is_validated(gw: Gateway, admin: Browserish) -> None:
    """CEL evaluates holding the GIL: a 13-million-iteration sample evaluation froze the whole process."""
    validating = asyncio.create_task(
        admin.post("/api/config/validate", {"text": pipeline_with_filter(HOSTILE_CEL)}), name="validate"
    )
    healthz: list[int] = []

    async def probe() -> None:
        async with aiohttp.ClientSession() as s, s.get(base_url(gw) + "/healthz") as r:
            healthz.append(r.status)

    prober = asyncio.create_task(probe(), name="healthz")
    await wait_for(lambda: healthz == [200], timeout=10)
    status, r = await validating
    await prober
    assert status == 200 and r["valid"] is False, r
    (err,) = r["errors"]
    assert err["path"] == "pipelines.0.nodes.1.where" and err["line"] == 9
    assert err["message"].startswith("comprehensions nested 3 deep"), err
