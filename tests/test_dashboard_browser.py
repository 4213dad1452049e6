"""The dashboard in a real browser (headless Chromium, Debian's package, driven by Playwright) against a live mesh:
a real broker, a worker with a real llama-server, and the gateway. The run also saves the README's screenshot,
docs/dashboard.png."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from playwright.sync_api import Browser, Page, sync_playwright

from meshkit import MODEL, BrokerThread, GatewayThread, run_cli, worker_threads
from qmesh.gateway.bridge import Bridge
from qmesh.testing import ROOT, free_endpoint, qmesh_command

KEY = "sk-dashboard-test"
SCREENSHOT = ROOT / "docs" / "dashboard.png"
WAIT_MS = 60_000  # for what the mesh has to do first (an answer on a busy 2-core machine), not a timing claim
# Chromium as root in a container, on a machine with no network: no sandbox, and none of its own connections.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
NO_CHROMIUM = (
    "Debian's chromium package is not installed and scripts/setup could not install it (it needs apt-get as root); "
    "the browser tests need /usr/bin/chromium"
)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip(NO_CHROMIUM)
    with sync_playwright() as playwright:
        # Playwright gives every launch a fresh, empty profile directory of its own.
        launched = playwright.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def mesh() -> Iterator[dict[str, Any]]:
    """One mesh for the module, with two gateways in front of it: one open, one that wants an API key."""
    with (
        BrokerThread() as broker,
        worker_threads(broker.endpoint, count=1, slots=2) as nodes,
        GatewayThread(Bridge(broker.endpoint, connect_timeout=5)) as front,
        GatewayThread(Bridge(broker.endpoint, connect_timeout=5), (KEY,)) as keyed,
    ):
        yield {
            "broker": broker.endpoint,
            "worker": nodes[0].worker_name,
            "url": f"http://127.0.0.1:{front.port}",
            "keyed_url": f"http://127.0.0.1:{keyed.port}",
        }


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A laptop-sized page; the test fails on any uncaught error in the page's script."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    yield opened
    context.close()
    assert not errors, f"errors in the page's script: {errors}"


def newest_seq(url: str, headers: dict[str, str] | None = None) -> int:
    data = requests.get(f"{url}/dashboard/data", headers=headers or {}, timeout=10).json()
    return max((r["seq"] for r in data["requests"]), default=0)


def play(page: Page, prompt: str, max_tokens: int) -> None:
    page.select_option("#play-model", MODEL)
    page.fill("#play-prompt", prompt)
    page.fill("#play-max", str(max_tokens))
    page.click("#play-send")


def test_the_page_lists_the_running_workers_with_their_model_and_slots(mesh, page):
    loaded: list[str] = []
    page.on("request", lambda request: loaded.append(request.url))
    page.goto(mesh["url"] + "/")  # redirected to /dashboard
    row = page.wait_for_selector(f'#workers tr[data-worker="{mesh["worker"]}"]', timeout=WAIT_MS)
    cells = [cell.inner_text() for cell in row.query_selector_all("td")]
    assert cells[0] == mesh["worker"] and cells[2] == MODEL
    busy, slots = cells[3].split("/")
    assert slots == "2" and 0 <= int(busy) <= 2
    assert cells[-1] in ("ready", "busy")
    model = page.wait_for_selector(f'#models tr[data-model="{MODEL}"]', timeout=WAIT_MS)
    assert model.query_selector_all("td")[3].inner_text() == "1"  # one worker serves it
    assert "live" in page.inner_text("#status")
    assert page.url == mesh["url"] + "/dashboard"
    outside = [url for url in loaded if not url.startswith(mesh["url"] + "/") and not url.startswith("data:")]
    assert not outside, f"the page loaded something from elsewhere: {outside}"


def test_a_request_through_qmesh_client_appears_in_the_recent_requests(mesh, page):
    page.goto(mesh["url"] + "/dashboard")
    page.wait_for_selector("#workers tbody tr", timeout=WAIT_MS)
    before = newest_seq(mesh["url"])
    done = run_cli(
        "qmesh-client",
        "--broker",
        mesh["broker"],
        "--jsonl",
        "--max-tokens",
        "12",
        "--temperature",
        "0",
        stdin="Name a colour.\n",
    )
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    row = page.wait_for_function(
        """([before, worker, tokens]) => [...document.querySelectorAll("#requests tbody tr")].find((row) =>
               Number(row.dataset.seq) > before && row.querySelector(".worker").textContent === worker
               && row.querySelector(".tokens").textContent === String(tokens))""",
        arg=[before, answer["worker"], answer["tokens"]],
        timeout=WAIT_MS,
    ).as_element()
    assert answer["worker"] == mesh["worker"] and answer["tokens"] > 0
    cells = [cell.inner_text() for cell in row.query_selector_all("td")]
    assert cells[1] == MODEL and cells[3] == "ok"
    assert cells[8] == f"{answer['cached_tokens']}/{answer['prompt_tokens']}"  # cached of all prompt tokens


def test_the_playground_streams_an_answer(mesh, page):
    page.goto(mesh["url"] + "/dashboard")
    page.wait_for_selector(f'#play-model option[value="{MODEL}"]', state="attached", timeout=WAIT_MS)
    before = newest_seq(mesh["url"])
    play(page, "Write a long story about a lighthouse keeper and her cat.", 150)
    # Part of the answer is on the page while the rest is still being generated...
    partial = page.wait_for_function(
        """() => { const answer = document.getElementById("answer");
                   return answer.dataset.state === "streaming" && answer.textContent.length > 0
                          && answer.textContent; }""",
        timeout=WAIT_MS,
    ).json_value()
    page.wait_for_function("document.getElementById('answer').dataset.state === 'done'", timeout=WAIT_MS)
    whole = page.inner_text("#answer")
    assert whole.startswith(partial.strip()) and len(whole) > len(partial)
    assert "tokens" in page.inner_text("#play-stats")
    # ... and it went through the mesh like any other request.
    page.wait_for_function(
        "(before) => [...document.querySelectorAll('#requests tbody tr')].some((r) => Number(r.dataset.seq) > before)",
        arg=before,
        timeout=WAIT_MS,
    )


def test_with_api_keys_the_page_asks_for_one_and_the_data_needs_it(mesh, page):
    refused = requests.get(mesh["keyed_url"] + "/dashboard/data", timeout=10)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    page.goto(mesh["keyed_url"] + "/dashboard")
    page.wait_for_selector("#key-section", state="visible", timeout=WAIT_MS)
    assert page.query_selector_all("#workers tbody tr") == []
    page.fill("#key", "sk-wrong")
    page.click("#key-form button")
    page.wait_for_selector("#key-message:has-text('not accepted')", timeout=WAIT_MS)
    page.fill("#key", KEY)
    page.click("#key-form button")
    page.wait_for_selector(f'#workers tr[data-worker="{mesh["worker"]}"]', timeout=WAIT_MS)
    assert page.is_hidden("#key-section")
    play(page, "Say hello.", 8)  # the playground sends the key too: without it the answer would be a 401
    page.wait_for_function("document.getElementById('answer').dataset.state === 'done'", timeout=WAIT_MS)
    assert page.inner_text("#answer").strip()


def test_the_page_says_when_the_broker_is_out_of_reach(page):
    with GatewayThread(Bridge(free_endpoint(), connect_timeout=5)) as front:
        page.goto(f"http://127.0.0.1:{front.port}/dashboard")
        status = page.wait_for_selector("#status[data-state='error']", timeout=WAIT_MS)
        page.wait_for_function(
            "(status) => status.textContent.includes('cannot reach the broker')", arg=status, timeout=WAIT_MS
        )
        assert page.inner_text("#tile-workers") == "0"


def test_it_reads_on_a_phone(mesh, browser):
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    try:
        phone = context.new_page()
        phone.goto(mesh["url"] + "/dashboard")
        phone.wait_for_selector(f'#workers tr[data-worker="{mesh["worker"]}"]', timeout=WAIT_MS)
        # Wide tables scroll inside their cards; the page itself never needs sideways scrolling.
        width, viewport = phone.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
        assert width <= viewport, f"the page is {width} px wide on a {viewport} px screen"
        assert phone.is_visible("#play-send") and phone.is_visible("#chart-tokens")
    finally:
        context.close()


def test_screenshot_of_a_busy_mesh(mesh, page):
    """Saves docs/dashboard.png: the mesh once qmesh-client has sent a few prompts while the playground streamed."""
    page.goto(mesh["url"] + "/dashboard")
    page.wait_for_selector(f'#play-model option[value="{MODEL}"]', state="attached", timeout=WAIT_MS)
    before = newest_seq(mesh["url"])
    prompts = [
        "Why is the sky blue?",
        "Name three rivers.",
        "What is a prime number?",
        "Describe a forest.",
        "How do bees make honey?",
        "Explain rain to a child.",
    ]
    command = qmesh_command("qmesh-client", "--broker", mesh["broker"], "--max-tokens", "60", "--concurrency", "3")
    with subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=ROOT) as load:
        assert load.stdin is not None
        load.stdin.write("\n".join(prompts) + "\n")
        load.stdin.close()
        play(page, "Write a haiku about the sea.", 60)
        assert load.wait(timeout=WAIT_MS / 1000) == 0
    page.wait_for_function("document.getElementById('answer').dataset.state === 'done'", timeout=WAIT_MS)
    page.wait_for_function(
        """([before, count]) => [...document.querySelectorAll("#requests tbody tr")]
               .filter((row) => Number(row.dataset.seq) > before).length >= count""",
        arg=[before, len(prompts) + 1],
        timeout=WAIT_MS,
    )
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert SCREENSHOT.stat().st_size > 10_000
