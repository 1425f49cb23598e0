"""A screenshot of `moespac serve`'s chat page answering one question: bench/results/server_chat.png.

Starts `moespac serve -m smolmoe -md smollm2` (the demo models setup builds) on a free port,
opens its page in headless Chromium at 1400x900, sends one message, waits for the streamed
answer to finish and saves the screenshot; the server then gets SIGTERM. Needs Chromium and
chromedriver (scripts/browser_deps.sh) and selenium (in the test extras' venv).

    python scripts/server_screenshot.py [--out PATH] [--prompt TEXT] [-- extra serve args]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from moespac_gguf.server.process import serve

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Explain in two sentences why a mixture-of-experts model is cheaper per token."
WIDTH, HEIGHT = 1400, 900


def browser() -> webdriver.Chrome:
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        f"--window-size={WIDTH},{HEIGHT}",
        "--hide-scrollbars",
    ):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    # The window size includes the browser's frame: make the page itself WIDTH x HEIGHT.
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False},
    )
    return driver


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "bench/results/server_chat.png"))
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--timeout", type=float, default=300, help="seconds for the server to start and for the answer")
    ap.add_argument("serve_args", nargs="*", help="more `moespac serve` arguments (after --)")
    args = ap.parse_args()

    print("$ moespac serve -m smolmoe -md smollm2", *args.serve_args, flush=True)
    driver = None
    with serve("-m", "smolmoe", "-md", "smollm2", *args.serve_args, timeout=args.timeout) as server:
        try:
            driver = browser()
            driver.get(server.url + "/")
            wait = WebDriverWait(driver, args.timeout)
            wait.until(lambda d: d.find_element(By.ID, "heatmap").get_attribute("data-draws") not in (None, "", "0"))
            driver.find_element(By.ID, "prompt").send_keys(args.prompt)
            driver.find_element(By.ID, "send").click()
            # Finished: the Send button is back (it reads Stop while the answer streams).
            wait.until(lambda d: d.find_element(By.ID, "send").text == "Send")
            time.sleep(1.0)  # one more stats poll: the heatmap and numbers after the answer
            answer = driver.find_element(By.CSS_SELECTOR, "#messages .msg.assistant")
            print(answer.text)
            if "error" in answer.get_attribute("class").split():
                sys.exit("the page shows an error instead of an answer")
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(out))
            print(f"saved {out}")
        finally:
            if driver is not None:
                driver.quit()


if __name__ == "__main__":
    main()
