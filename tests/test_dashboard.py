"""The router's live dashboard (``services/router/dashboard.py``, ``static/``) on a real local swarm
(a router, three relays, two llama.cpp nodes, the ledger's chain).

- Its JSON views over plain HTTP: every member with roles, state, load, reputation, credits; the
  request series moving after a request; the receipt check accepting a real answer's receipt and
  refusing a tampered one (a token changed), another node named as server, and malformed bodies.
- The page in a real browser (Debian's chromium, headless, driven by selenium through
  chromedriver): every member listed, a chat whose tokens arrive one by one through three relays,
  its receipt checked, the request in the charts, nothing loaded from anywhere but the router;
  a screenshot saved to ``bench/results/dashboard.png``. Skips without chromium.
"""

from __future__ import annotations

import asyncio
import base64
import re
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest

from swarmserve.node import ServiceNode
from tests.conftest import MODEL, Swarm, SwarmFactory

SCREENSHOT = Path(__file__).resolve().parents[1] / "bench" / "results" / "dashboard.png"


def every_node_id(s: Swarm) -> set[str]:
    nodes: list[ServiceNode] = [s.router, *s.relays, *s.inference]
    return {node.keys.identity.node_id for node in nodes}


def base_url(s: Swarm) -> str:
    assert s.router.http is not None
    return s.router.http.url


async def test_the_dashboard_views_show_the_swarm_and_check_receipts(swarm: SwarmFactory) -> None:
    async with (
        swarm(relays=3, inference=[{}, {}], default_hops=3, ledger=True, http_listen="127.0.0.1:0") as s,
        httpx.AsyncClient(base_url=base_url(s), timeout=60) as http,
    ):
        page = await http.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "/static/dashboard.js" in page.text
        assert not re.search(r'(src|href)="(https?:)?//', page.text)  # nothing from elsewhere (a CDN)

        view = (await http.get("/api/swarm")).json()
        members = {m["node_id"]: m for m in view["members"]}
        assert set(members) == every_node_id(s)
        assert members[view["router"]]["self"] and members[view["router"]]["roles"] == ["router"]
        for node in s.inference:
            member = members[node.keys.identity.node_id]
            assert member["state"] == "alive" and "inference" in member["roles"] and member["models"] == [MODEL]
            assert member["load"]["slots"] == 1 and member["reputation"]["trusted"]
            assert member["credits"]["bonded"] > 0  # the genesis stakes every provider
        for relay in s.relays:
            assert members[relay.keys.identity.node_id]["roles"] == ["relay"]

        def requests_charted(stats: dict[str, Any]) -> float:
            return sum(p["requests_per_s"] for p in stats["series"]) * stats["step_s"]

        before = requests_charted((await http.get("/api/stats")).json())
        asked = {"model": MODEL, "messages": [{"role": "user", "content": "Name a bird."}], "max_tokens": 8}
        answer = (await http.post("/v1/chat/completions", json=asked)).json()
        after = (await http.get("/api/stats")).json()
        assert requests_charted(after) == pytest.approx(before + 1)
        assert after["in_flight"] == 0

        extension, text = answer["swarmserve"], answer["choices"][0]["message"]["content"]
        checked = await http.post("/api/check-receipt", json={"swarmserve": extension, "text": text})
        assert checked.status_code == 200, checked.text
        assert checked.json()["checked"] and checked.json()["served_by"] == extension["served_by"]
        assert checked.json()["tokens"] == len(extension["token_ids"])

        tampered = dict(extension, token_texts=[base64.b64encode(b"X").decode(), *extension["token_texts"][1:]])
        other = next(n for n in every_node_id(s) if n != extension["served_by"])
        cases: list[tuple[str, Any, int]] = [
            ("a token's text changed", {"swarmserve": tampered}, 422),
            ("the text is not what the tokens spell", {"swarmserve": extension, "text": text + "!"}, 422),
            ("another node named as the server", {"swarmserve": dict(extension, served_by=other)}, 422),
            ("the receipt is not base64", {"swarmserve": dict(extension, receipt="%%%")}, 422),
            ("no swarmserve object", {"text": text}, 400),
            ("swarmserve is not an object", {"swarmserve": [1, 2]}, 400),
        ]
        for what, body, status in cases:
            reply = await http.post("/api/check-receipt", json=body)
            assert reply.status_code == status, what
            assert reply.json()["checked"] is False and reply.json()["reason"], what
        garbage = await http.post("/api/check-receipt", content=b"{not json")
        assert garbage.status_code == 400 and not garbage.json()["checked"]


CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="Debian's chromium and chromium-driver are not installed (CI installs them: .ci/run)",
)
async def test_the_dashboard_in_a_real_browser_lists_the_swarm_and_streams_a_chat(swarm: SwarmFactory) -> None:
    async with swarm(relays=3, inference=[{}, {}], default_hops=3, ledger=True, http_listen="127.0.0.1:0") as s:
        # selenium blocks: drive the browser from a thread while this loop serves the swarm.
        seen = await asyncio.to_thread(_drive_the_page, base_url(s), every_node_id(s))
    assert seen["listed"] == every_node_id(s)
    tokens, arrivals = seen["tokens"], seen["arrivals"]
    assert len(tokens) >= 4 and len(arrivals) == len(tokens)
    # One by one: the tokens came in many separate DOM updates spread over time, not at once.
    assert len({round(t) for t in arrivals}) >= len(tokens) // 2, arrivals
    assert arrivals[-1] - arrivals[0] > 20, arrivals
    assert seen["receipt"] == "checked", seen["status"]
    served_by = next(n.keys.identity.node_id for n in s.inference if n.keys.identity.node_id[:16] in seen["status"])
    assert f"served by {served_by[:16]} through 3 hops" in seen["status"]
    assert seen["bars"] >= 1  # the request shows in the rate chart
    assert seen["resources"] and all(r.startswith(base_url(s)) for r in seen["resources"]), seen["resources"]
    assert SCREENSHOT.stat().st_size > 10_000


def _drive_the_page(url: str, expected: set[str]) -> dict[str, Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,960",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        driver.get(url + "/")
        wait = WebDriverWait(driver, 30)

        # The page re-renders the table every 2 s: read it in one script, not element by element
        # (an element held across a re-render goes stale).
        def listed(d: Any) -> set[str]:
            rows = "return [...document.querySelectorAll('#members tr.member')].map(r => r.dataset.nodeId)"
            return set(d.execute_script(rows))

        wait.until(lambda d: listed(d) >= expected)
        models = "return [...document.getElementById('model').options].map(o => o.value)"
        wait.until(lambda d: MODEL in d.execute_script(models))
        Select(driver.find_element(By.ID, "hops")).select_by_visible_text("3")
        # Each token span's arrival time, as the browser saw it.
        driver.execute_script(
            "window.arrivals = [];"
            "new MutationObserver(ms => ms.forEach(m => m.addedNodes.forEach(n => {"
            "  if (n.classList && n.classList.contains('token')) window.arrivals.push(performance.now());"
            "}))).observe(document.getElementById('answer'), {childList: true});"
        )
        driver.find_element(By.ID, "send").click()
        WebDriverWait(driver, 120).until(
            lambda d: (
                d.find_element(By.ID, "answer").get_attribute("data-receipt")
                or d.find_element(By.ID, "answer").get_attribute("data-state") == "error"
            )
        )
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#chart-rate rect.bar"))
        answer = driver.find_element(By.ID, "answer")
        seen = {
            "listed": listed(driver),
            "tokens": [t.text for t in answer.find_elements(By.CSS_SELECTOR, "span.token")],
            "arrivals": driver.execute_script("return window.arrivals"),
            "receipt": answer.get_attribute("data-receipt"),
            "status": driver.find_element(By.ID, "answer-status").text,
            "bars": driver.execute_script("return document.querySelectorAll('#chart-rate rect.bar').length"),
            "resources": driver.execute_script(
                "return [location.href, ...performance.getEntriesByType('resource').map(e => e.name)]"
            ),
        }
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(SCREENSHOT))
        return seen
    finally:
        driver.quit()
