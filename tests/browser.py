"""Headless Chromium driven by selenium, for the dashboard's tests and benchmark.

Debian's ``chromium`` and ``chromium-driver`` (installed by scripts/setup.sh) are named
explicitly, so selenium never looks for or downloads a driver. The browser may reach only
the one loopback address it is given: every other host name resolves to nothing and every
other connection goes to a dead loopback proxy, and Chromium's own background traffic
(updates, safe browsing, metrics) is switched off.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@contextlib.contextmanager
def chromium(allowed_host: str, width: int = 1500, height: int = 1100) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        f"--window-size={width},{height}", "--no-first-run", "--no-default-browser-check",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-default-apps", "--disable-extensions", "--disable-domain-reliability",
        "--disable-client-side-phishing-detection", "--no-pings", "--dns-prefetch-disable",
        "--disable-features=OptimizationHints,MediaRouter,Translate,AutofillServerCommunication",
        f"--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE {allowed_host}",
        "--proxy-server=http://127.0.0.1:9", f"--proxy-bypass-list={allowed_host}",
    ):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=CHROMEDRIVER, log_output=os.devnull)
    driver = webdriver.Chrome(options=opts, service=service)
    try:
        yield driver
    finally:
        driver.quit()


def console_errors(driver: Any) -> list[dict[str, Any]]:
    """The page's console messages at level SEVERE (errors, failed loads) since the last call."""
    return [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


def artifacts_dir() -> str:
    d = os.environ.get("NODEMESH_ARTIFACTS") or os.path.join(os.path.dirname(__file__), "artifacts")
    os.makedirs(d, exist_ok=True)
    return d
