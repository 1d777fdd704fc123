"""Stopping the gateway: the console goes away before the stores its pages read are closed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.alerts import AlertService
from tests.gateway._harness import running_gateway

from .conftest import base_url, config_text


async def test_a_page_polling_alerts_during_stop_never_gets_a_server_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A browser asking for /api/alerts right after the alert book closed (the alerts page polls
    every 5 s) got a 500 while the console was still serving; now the console is gone by then."""
    answers: list[Any] = []
    url: list[str] = []
    close = AlertService.close

    async def close_then_ask(self: AlertService) -> None:
        await close(self)
        try:
            async with aiohttp.ClientSession() as http, http.get(url[0] + "/api/alerts") as r:
                answers.append(r.status)
        except aiohttp.ClientConnectionError:
            answers.append("refused")

    monkeypatch.setattr(AlertService, "close", close_then_ask)
    async with running_gateway(config_text(tmp_path / "data", "{host: 127.0.0.1, port: 0, auth: false}")) as gw:
        url.append(base_url(gw))
    assert answers == ["refused"]
