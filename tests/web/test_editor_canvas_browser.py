"""The editor's canvas in Chromium: Fit keeps a big pipeline's text readable (the rest is a pan
away), and a bad wire turns red while the draft has that error and back when it is mended.
Screenshots (desktop and 390 px) land next to the other console shots."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from gateway.runtime import Gateway

from .conftest import base_url
from .test_browser import browser, page, shot  # noqa: F401 -- fixtures
from .test_editor_browser import connect, expect, login, node, started  # noqa: F401 -- fixtures

READABLE_PX = 9  # what the editor promises for a node's title after Fit

# The demo's boiler pipeline in shape (17 nodes, 9 columns deep), without its broker and model.
BIG = """\
gateway: {{id: editor-canvas, data_dir: "{data}"}}
pipelines:
  - name: boiler
    nodes:
      - {{id: sensors, type: simulate, interval: 1s,
         sensors: [{{key: boiler/temp, base: 82}}, {{key: pump/vibration, base: 2.5}},
                   {{key: room/humidity, base: 55}}]}}
      - {{id: plausible, type: filter, input: sensors, where: "value > -40.0 && value < 200.0"}}
      - {{id: history, type: history, input: plausible}}
      - {{id: boiler_temp, type: filter, input: plausible, where: 'key == "boiler/temp"'}}
      - {{id: boiler_fahrenheit, type: map, input: boiler_temp, value: "value * 1.8 + 32.0"}}
      - {{id: boiler_hot, type: threshold, input: boiler_fahrenheit, above: 194, clear_below: 188.6}}
      - {{id: pump_vibration, type: filter, input: plausible, where: 'key == "pump/vibration"'}}
      - {{id: pump_shaking, type: threshold, input: pump_vibration, above: 6.0, clear_below: 4.0}}
      - {{id: humidity, type: filter, input: plausible, where: 'key == "room/humidity"'}}
      - {{id: room_damp, type: threshold, input: humidity, above: 70, clear_below: 65}}
      - {{id: alerts_out, type: log, input: [boiler_hot, pump_shaking, room_damp]}}
      - {{id: alert_log, type: log, input: [boiler_hot, pump_shaking, room_damp]}}
      - {{id: raised, type: filter, input: [boiler_hot, pump_shaking, room_damp], where: 'value.state == "raised"'}}
      - {{id: explain, type: map, input: raised, value: "1.0"}}
      - {{id: explained, type: filter, input: explain, where: "true"}}
      - {{id: explanations_out, type: log, input: explained}}
      - {{id: alert_book, type: alert, input: [boiler_hot, pump_shaking, room_damp]}}
console: {{host: 127.0.0.1, port: 0}}
"""

CHAIN = """\
gateway: {{id: editor-canvas, data_dir: "{data}"}}
pipelines:
  - name: line
    nodes:
      - {{id: sensors, type: simulate, interval: 1s, sensors: [{{key: boiler/temp, base: 82}}]}}
      - {{id: first, type: filter, input: sensors, where: "value > 0.0"}}
      - {{id: second, type: filter, input: first, where: "value < 500.0"}}
      - {{id: out, type: log, input: second}}
console: {{host: 127.0.0.1, port: 0}}
"""

# What a node looks like on screen: the title's rendered size (its font size times the canvas's
# scale) and whether the node is wholly inside the canvas.
ON_SCREEN = """(id) => {
  const box = [...document.querySelectorAll('.drawflow-node')]
    .find((b) => b.querySelector(`.df-node[data-node="${id}"]`));
  const title = box.querySelector('.df-id');
  const scale = box.getBoundingClientRect().width / box.offsetWidth;
  const r = box.getBoundingClientRect(), c = document.querySelector('#drawflow').getBoundingClientRect();
  return {px: parseFloat(getComputedStyle(title).fontSize) * scale, left: r.left,
          inside: r.left >= c.left - 1 && r.right <= c.right + 1 && r.top >= c.top - 1 && r.bottom <= c.bottom + 1};
}"""


async def _on_screen(pg: Any, nid: str) -> dict[str, Any]:
    return await pg.evaluate(ON_SCREEN, nid)


async def _readable_from_its_start(pg: Any) -> None:
    """After Fit: the source wholly in view, and every title at least READABLE_PX on screen."""
    first = await _on_screen(pg, "sensors")
    assert first["inside"], first
    for nid in ("sensors", "explanations_out", "alert_book"):
        seen = await _on_screen(pg, nid)
        assert seen["px"] >= READABLE_PX, (nid, seen)


@pytest.mark.parametrize("started", [BIG], indirect=True)
async def test_fit_keeps_a_big_pipeline_readable_and_the_rest_a_pan_away(
    started: tuple[Gateway, Path],  # noqa: F811
    page: Any,  # noqa: F811
) -> None:
    gw, _ = started
    base = base_url(gw)
    await page.set_viewport_size({"width": 1366, "height": 900})
    await login(page, base)
    await page.goto(base + "/#/editor")
    await expect(page.locator("#ed-status")).to_have_text("ready")
    await expect(page.locator(".drawflow-node")).to_have_count(17)
    await _readable_from_its_start(page)  # the page opens fitted
    hint = page.locator("#ed-hint")
    await expect(hint).to_have_text(re.compile(r"^\d+ of 17 nodes in view: drag or scroll to pan"))
    shown = int((await hint.inner_text()).split()[0])
    assert 4 <= shown < 17, shown  # more than the first column, never the whole at an unreadable zoom

    # the wheel pans (Node-RED and Dify do the same); Fit brings the start back
    box = await page.locator("#drawflow").bounding_box()
    await page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    before = (await _on_screen(page, "sensors"))["left"]
    await page.keyboard.down("Shift")
    await page.mouse.wheel(0, 700)  # Shift+wheel: sideways
    await page.keyboard.up("Shift")
    await page.wait_for_function(
        "(x) => document.querySelector('.df-node[data-node=\"sensors\"]').getBoundingClientRect().left < x - 600",
        arg=before,
    )
    assert not (await _on_screen(page, "sensors"))["inside"]
    await page.click("#ed-fit")
    await _readable_from_its_start(page)
    assert (await _on_screen(page, "sensors"))["left"] == pytest.approx(before, abs=1)
    await shot(page, "editor-fit-big")

    # a phone: the same promise in a narrower canvas
    await page.set_viewport_size({"width": 390, "height": 844})
    await page.wait_for_function(
        "() => document.querySelector('#drawflow').getBoundingClientRect().width < 390",
    )
    await page.click("#ed-fit")
    await _readable_from_its_start(page)
    await expect(hint).to_be_visible()
    assert await page.evaluate("document.documentElement.scrollWidth") <= 391
    await shot(page, "editor-fit-big-phone")


@pytest.mark.parametrize("started", [CHAIN], indirect=True)
async def test_a_small_pipeline_is_fitted_whole_without_a_hint(
    started: tuple[Gateway, Path],  # noqa: F811
    page: Any,  # noqa: F811
) -> None:
    gw, _ = started
    base = base_url(gw)
    await page.set_viewport_size({"width": 1366, "height": 900})
    await login(page, base)
    await page.goto(base + "/#/editor")
    await expect(page.locator("#ed-status")).to_have_text("ready")
    for nid in ("sensors", "first", "second", "out"):
        seen = await _on_screen(page, nid)
        assert seen["inside"] and seen["px"] >= READABLE_PX, (nid, seen)
    await expect(page.locator("#ed-hint")).to_be_hidden()


WIRE = """(pair) => {
  const id = (n) => [...document.querySelectorAll('.drawflow-node')]
    .find((b) => b.querySelector(`.df-node[data-node="${n}"]`)).id;
  const path = document.querySelector(`.connection.node_out_${id(pair[0])}.node_in_${id(pair[1])} .main-path`);
  return path ? {bad: path.classList.contains('df-bad-wire'), stroke: getComputedStyle(path).stroke} : null;
}"""


async def _wire(pg: Any, a: str, b: str) -> dict[str, Any] | None:
    return await pg.evaluate(WIRE, [a, b])


@pytest.mark.parametrize("started", [CHAIN], indirect=True)
async def test_a_bad_wire_turns_red_and_back_when_mended(
    started: tuple[Gateway, Path],  # noqa: F811
    page: Any,  # noqa: F811
) -> None:
    """A wire from `second` back into `first` makes a cycle: the cycle's wires are drawn in the
    error colour (and only they: the source's wire into `first` stays as it was); deleting the new
    wire mends the draft and every wire is drawn as before."""
    gw, _ = started
    base = base_url(gw)
    await page.set_viewport_size({"width": 1366, "height": 900})
    await login(page, base)
    await page.goto(base + "/#/editor")
    await expect(page.locator("#ed-status")).to_have_text("ready")
    bad_rgb = await page.evaluate(
        "() => { const e = document.createElement('i'); e.style.color = 'var(--bad)'; document.body.append(e);"
        " const v = getComputedStyle(e).color; e.remove(); return v; }"
    )
    normal = await _wire(page, "sensors", "first")
    assert normal and not normal["bad"] and normal["stroke"] != bad_rgb, (normal, bad_rgb)
    assert await _wire(page, "second", "out") == normal

    await connect(page, "second", "first")
    await expect(page.locator("#ed-status")).to_have_text("1 error(s)")
    await expect(page.locator(".drawflow-node.df-has-error .df-err")).to_contain_text("cycle")
    await page.wait_for_function(f"(p) => ({WIRE})(p)?.bad", arg=["second", "first"])
    red = {"bad": True, "stroke": bad_rgb}
    assert await _wire(page, "second", "first") == red
    assert await _wire(page, "first", "second") == red
    assert await _wire(page, "sensors", "first") == normal  # the good wire into the same node
    assert await _wire(page, "second", "out") == normal
    await shot(page, "editor-bad-wire")

    # mended: click the new wire, delete it
    await page.evaluate(
        """(p) => {
          const id = (n) => [...document.querySelectorAll('.drawflow-node')]
            .find((b) => b.querySelector(`.df-node[data-node="${n}"]`)).id;
          document.querySelector(`.connection.node_out_${id(p[0])}.node_in_${id(p[1])}`).classList.add('ed-test-target');
        }""",
        ["second", "first"],
    )
    await page.locator(".ed-test-target .main-path").click()  # it loops under the nodes: in the open
    await page.keyboard.press("Delete")
    await expect(page.locator("#ed-status")).to_have_text("valid — same as the file")
    await expect(page.locator(".df-bad-wire")).to_have_count(0)
    await expect(page.locator(".drawflow-node.df-has-error")).to_have_count(0)
    assert await _wire(page, "second", "first") is None
    for a, b in (("sensors", "first"), ("first", "second"), ("second", "out")):
        assert await _wire(page, a, b) == normal, (a, b)


CANVAS_AT = """() => {
  const r = document.querySelector('.df-node[data-node="sensors"]').getBoundingClientRect();
  return {left: r.left, top: r.top, width: r.width, scrollY: window.scrollY,
          transform: document.querySelector('#drawflow .drawflow').style.transform};
}"""


async def _moved(pg: Any, before: dict[str, Any], **want: str) -> dict[str, Any]:
    """Wait until the source's box has moved as ``want`` says ("<" or ">" or "=" per axis, "zoom"
    for "<"/">" on its width), then return where it is."""
    js = {"<": "a < b - 1", ">": "a > b + 1", "=": "Math.abs(a - b) <= 1"}
    checks = " && ".join(
        f"((a, b) => {js[op]})(now.{'width' if axis == 'zoom' else axis}, before.{'width' if axis == 'zoom' else axis})"
        for axis, op in want.items()
    )
    await pg.wait_for_function(f"(before) => {{ const now = ({CANVAS_AT})(); return {checks}; }}", arg=before)
    return await pg.evaluate(CANVAS_AT)


@pytest.mark.parametrize("started", [BIG], indirect=True)
@pytest.mark.parametrize("user", ["admin", "viewer1"])
async def test_arrow_keys_pan_the_canvas_and_typing_in_a_field_stays_typing(
    started: tuple[Gateway, Path],  # noqa: F811
    page: Any,  # noqa: F811
    user: str,
) -> None:
    """A keyboard user pans with the arrow keys while the canvas has the focus (Shift: most of a
    screen) and zooms with + and -, in the edit and in the view mode; the page itself does not
    scroll. In a node's form the same keys are text: the caret moves, the characters land, the
    canvas stays where it was."""
    gw, _ = started
    base = base_url(gw)
    await page.set_viewport_size({"width": 1366, "height": 900})
    await login(page, base, user)
    await page.goto(base + "/#/editor")
    await expect(page.locator("#ed-status")).to_have_text("ready" if user == "admin" else "view only")
    canvas = page.locator("#drawflow")
    # the page fits the pipeline again when the canvas changes size (as it settles after loading):
    # the keys are pressed once it is fitted to the size it has
    await page.wait_for_function(
        "() => { const c = document.querySelector('#drawflow');"
        " return c.dataset.fitted === `${c.clientWidth}x${c.clientHeight}`; }"
    )
    await canvas.click(position={"x": 8, "y": 8})  # a click on its background makes it the keys' target
    at = await page.evaluate(CANVAS_AT)

    await page.keyboard.press("ArrowRight")  # look further right: the pipeline moves left
    at = await _moved(page, at, left="<", top="=")
    await page.keyboard.press("ArrowDown")
    at = await _moved(page, at, left="=", top="<")
    await page.keyboard.press("ArrowUp")
    at = await _moved(page, at, left="=", top=">")
    step = at["left"]
    await page.keyboard.press("ArrowLeft")
    at = await _moved(page, at, left=">", top="=")
    step = at["left"] - step
    await page.keyboard.press("Shift+ArrowRight")
    far = await _moved(page, at, left="<", top="=")
    assert at["left"] - far["left"] > 4 * step, (at, far, step)  # Shift: most of a screen
    await expect(page.locator("#ed-hint")).to_have_text(re.compile(r"arrow keys"))
    at = far
    await page.keyboard.press("+")
    at = await _moved(page, at, zoom=">")
    await page.keyboard.press("-")
    at = await _moved(page, at, zoom="<")
    assert at["scrollY"] == 0  # the keys moved the canvas, not the page
    await page.locator("#ed-locate").focus()  # another control took the focus: not the canvas's keys
    await page.keyboard.press("ArrowDown")
    await canvas.focus()  # Tab's way: the canvas focused
    await page.keyboard.press("ArrowRight")
    at = await _moved(page, at, left="<", top="=")

    # in a text field (a node's option; for a viewer, whose options are read-only, the find box)
    # the keys are text and the caret's
    await page.keyboard.press("f")  # Fit: back to the start, where `plausible` is in view
    await _moved(page, at, zoom="=")
    await node(page, "plausible").click()
    field = page.locator('#ed-form [data-path="where"] :is(input, textarea)')
    if user == "viewer1":
        await expect(field).to_be_disabled()
        field = page.locator("#ed-locate")
    await field.fill("")
    await field.type("ab")
    before = await page.evaluate(CANVAS_AT)
    await field.press("ArrowLeft")
    await field.type("+-f")
    await field.press("ArrowRight")
    await field.press("ArrowUp")
    await field.press("ArrowDown")
    await field.type("=")
    await expect(field).to_have_value("a+-fb=")
    assert await page.evaluate(CANVAS_AT) == before
