"""The page of `moespac serve` (GET /) in a real headless Chromium driven by selenium.

A message typed and sent streams an answer into the chat, the request carries the conversation
and the page's controls, and the expert heatmap draws one cell per MoE layer and expert as the
stats endpoint reports them; with --api-key the page gets a 401 message without the key and an
answer with it. Needs Debian's chromium and chromium-driver (scripts/browser_deps.sh); skipped
without them.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from moespac_gguf.server.process import Server, serve

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM = "/usr/bin/chromium"
TIMEOUT = 60

# Records the body of every POST the page makes (window.fetch is looked up at call time).
RECORD_FETCH = """
window.__bodies = [];
const f = window.fetch;
window.fetch = (url, opts) => { if (opts && opts.body) window.__bodies.push(JSON.parse(opts.body)); return f(url, opts); };
"""


@pytest.fixture(scope="module")
def browser():
    driver_path = shutil.which("chromedriver") if not os.path.exists(CHROMEDRIVER) else CHROMEDRIVER
    chromium = next(
        (p for p in (CHROMIUM, shutil.which("chromium"), shutil.which("chromium-browser")) if p and os.path.exists(p)),
        None,
    )
    if not driver_path or not chromium:
        pytest.skip(
            "needs chromium and chromedriver (Debian: chromium chromium-driver; scripts/browser_deps.sh installs them)"
        )
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,900"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)  # installed but broken: an error, not a skip
    yield driver
    driver.quit()


def browser_errors(driver, *, network: bool = True) -> list[str]:
    """SEVERE entries of the browser console since the last call (JS errors; failed requests if `network`)."""
    try:
        entries = driver.get_log("browser")
    except (WebDriverException, AttributeError):
        return []
    return [e["message"] for e in entries if e["level"] == "SEVERE" and (network or e.get("source") != "network")]


def open_page(driver, server: Server) -> None:
    driver.get(server.url + "/")
    WebDriverWait(driver, TIMEOUT).until(lambda d: d.execute_script("return document.readyState") == "complete")
    driver.execute_script(RECORD_FETCH)


def send(driver, text: str, *, enter: bool = False) -> None:
    prompt = driver.find_element(By.ID, "prompt")
    prompt.send_keys(text)
    if enter:
        prompt.send_keys(Keys.ENTER)
    else:
        driver.find_element(By.ID, "send").click()


def wait_answers(driver, n: int) -> list:
    """Waits until the chat holds n assistant messages and none streams; returns them."""

    def done(d):
        msgs = d.find_elements(By.CSS_SELECTOR, "#messages .msg.assistant")
        if len(msgs) < n or d.find_element(By.ID, "send").text != "Send":
            return False
        return msgs if all("streaming" not in m.get_attribute("class").split() for m in msgs) else False

    return WebDriverWait(driver, TIMEOUT).until(done, f"no {n} finished answers in {TIMEOUT} s")


def test_page_streams_answers_and_draws_the_experts(browser, tiny_moe, tmp_path):
    with serve("-m", str(tiny_moe()), "-c", "512") as server:
        open_page(browser, server)
        model_id = server.get_json("/v1/models")["data"][0]["id"]
        browser.find_element(By.ID, "max-tokens").clear()
        browser.find_element(By.ID, "max-tokens").send_keys("24")

        send(browser, "Why are mixture-of-experts models cheap?")
        first = wait_answers(browser, 1)[0]
        assert "error" not in first.get_attribute("class").split(), first.text
        answer = first.find_element(By.CSS_SELECTOR, ".body").get_property("textContent")
        assert answer.strip(), "empty assistant message"

        # The second turn (sent with Enter) carries the whole conversation.
        # Shift+Enter is a new line in the message; Enter sends it.
        send(browser, "And per layer?" + Keys.SHIFT + Keys.ENTER + Keys.NULL + "Briefly.", enter=True)
        second = wait_answers(browser, 2)[1]
        assert "error" not in second.get_attribute("class").split(), second.text
        bodies = browser.execute_script("return window.__bodies")
        assert len(bodies) == 2, bodies
        assert bodies[0]["stream"] is True and bodies[0]["max_tokens"] == 24 and bodies[0]["temperature"] == 0
        assert bodies[0]["model"] == model_id
        roles = [m["role"] for m in bodies[1]["messages"]]
        assert roles == ["user", "assistant", "user"], bodies[1]
        assert bodies[1]["messages"][1]["content"] == answer  # the streamed text, exactly as shown
        assert bodies[1]["messages"][2]["content"] == "And per layer?\nBriefly."

        stats = server.get_json("/v1/moespac/stats")
        experts = stats["experts"]
        cells = len(experts["layers"]) * experts["n_expert"]
        assert cells > 0, json.dumps(stats)[:2000]
        heatmap = browser.find_element(By.ID, "heatmap")
        WebDriverWait(browser, 10).until(
            lambda d: (
                int(heatmap.get_attribute("data-draws") or 0) >= 1 and heatmap.get_attribute("data-cells") == str(cells)
            ),
            f"heatmap not drawn with {cells} cells: {heatmap.get_attribute('data-cells')}",
        )
        assert (
            stats["model"] in browser.find_element(By.ID, "model-name").text
            or model_id in browser.find_element(By.ID, "model-name").text
        )
        assert browser.find_element(By.ID, "plan").text.strip() == stats["memory_plan"].strip()
        assert browser.find_element(By.ID, "stats").text.strip()
        browser.save_screenshot(str(tmp_path / "server_page.png"))
        assert browser_errors(browser) == []


def test_page_sends_the_api_key(browser, tiny_moe, tmp_path):
    with serve("-m", str(tiny_moe()), "-c", "512", "--api-key", "secret") as server:
        open_page(browser, server)
        browser.find_element(By.ID, "api-key").clear()
        browser.find_element(By.ID, "max-tokens").clear()
        browser.find_element(By.ID, "max-tokens").send_keys("8")

        send(browser, "Hello?")
        refused = wait_answers(browser, 1)[0]
        assert "error" in refused.get_attribute("class").split() and "401" in refused.text, refused.text

        browser.find_element(By.ID, "api-key").send_keys("secret")
        send(browser, "Hello again?")
        answered = wait_answers(browser, 2)[1]
        assert "error" not in answered.get_attribute("class").split(), answered.text
        assert answered.find_element(By.CSS_SELECTOR, ".body").text.strip()
        # Only the refused turn's requests failed (401s are network errors, not script errors).
        assert browser_errors(browser, network=False) == []

        # The key survives a reload (localStorage), and the stats then load with it.
        browser.refresh()
        key = WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "api-key").get_attribute("value"))
        assert key == "secret"
        heatmap = browser.find_element(By.ID, "heatmap")
        WebDriverWait(browser, 10).until(lambda d: int(heatmap.get_attribute("data-draws") or 0) >= 1)
        browser.save_screenshot(str(tmp_path / "server_page_key.png"))
