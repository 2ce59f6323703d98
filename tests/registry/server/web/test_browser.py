"""The pages in a real browser: headless Chromium (Debian's `chromium` + `chromium-driver`,
driven by Selenium) against a live registry process on 127.0.0.1 holding the catalog. Checks
what is visible, that no request leaves the host, and saves a screenshot of each page (also
into $DELTASTORE_WEB_SCREENSHOTS when set)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from tests.support.harness import RegistryProcess, migrate

from .catalog import HOSTILE, fill_catalog
from .conftest import ADMIN, ADMIN_SECRET, make_token

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
webdriver = pytest.importorskip(
    "selenium.webdriver", reason="selenium is not installed (pip install selenium)"
)
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip(
        "headless Chromium is not installed: run .ci/browser.sh (apt-get install chromium chromium-driver)",
        allow_module_level=True,
    )

from selenium.common.exceptions import NoAlertPresentException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


def start_registry(tmp: Path, **settings: str) -> RegistryProcess:
    env = {
        "DELTASTORE_DATA_DIR": str(tmp / "data"),
        "DELTASTORE_DATABASE_URL": f"sqlite:///{tmp}/registry.db",
        **{f"DELTASTORE_{k.upper()}": v for k, v in settings.items()},
    }
    (tmp / "data").mkdir(parents=True, exist_ok=True)
    migrate(env)
    return RegistryProcess(env, log_path=tmp / "registry.log").start()


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1440,900",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-default-apps",
        "--disable-sync",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("web-browser")
    server = start_registry(tmp)
    with server.client() as client:
        fill_catalog(client)
    yield server
    server.stop()


def requested_urls(driver) -> list[str]:
    """Every URL the browser asked for since the last call (Chrome's network log)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def visit(driver, server, path: str, shots: Path, name: str, *, ready: str = "h1") -> str:
    """Load `path`, wait for `ready`, save a full-page screenshot; the page's visible text."""
    requested_urls(driver)  # drop what earlier pages asked for
    driver.get(server.url + path)
    WebDriverWait(driver, 20).until(lambda d: d.find_elements(By.CSS_SELECTOR, ready))
    time.sleep(0.2)  # late requests (fonts, icons) reach the log
    shots.mkdir(parents=True, exist_ok=True)
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
    (shots / f"{name}.png").write_bytes(base64.b64decode(shot["data"]))  # the whole page, not the window
    if keep := os.environ.get("DELTASTORE_WEB_SCREENSHOTS"):  # to look at them, or refresh docs/img
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shots / f"{name}.png", Path(keep) / f"{name}.png")
    off_host = [u for u in requested_urls(driver) if not u.startswith((server.url + "/", "data:"))]
    assert not off_host, f"{path} asked for {off_host}"
    problems = [
        e["message"]
        for e in driver.get_log("browser")
        if e["level"] == "SEVERE"
        and "status of 404" not in e["message"]
        and "status of 401" not in e["message"]
    ]
    assert not problems, f"{path}: {problems}"
    return driver.find_element(By.TAG_NAME, "body").text


def test_every_page_shows_its_content_and_loads_nothing_off_host(browser, registry, tmp_path):
    shots = tmp_path / "screenshots"
    text = visit(browser, registry, "/", shots, "index")
    assert "org/llama-tiny" in text and "qwen/Qwen2-mini" in text and "LlamaForCausalLM" in text

    browser.find_element(By.LINK_TEXT, "org/llama-tiny").click()
    WebDriverWait(browser, 10).until(lambda d: d.current_url.endswith("/bases/org/llama-tiny"))
    text = visit(browser, registry, "/bases/org/llama-tiny?sort=size", shots, "base")
    assert (
        "acme/math" in text and "lab/secret" in text and "gain kept 89.0% · KL 0.0125 · top-1 94.5%" in text
    )

    text = visit(browser, registry, "/acme/math", shots, "repo", ready="svg.chart polyline")
    assert "Grade-school math fine-tune" in text and "v4" in text and "deltactl pull acme/math" in text
    assert (
        len(browser.find_elements(By.CSS_SELECTOR, "button.copy-button")) == 2
    )  # the script ran under the CSP
    assert len(browser.find_elements(By.CSS_SELECTOR, "svg.chart circle")) == 8  # 4 versions × 2 series

    text = visit(browser, registry, "/acme/math@3", shots, "version")
    assert "binarized (sign + scale)" in text and "gsm8k-train" in text and "prod" in text

    text = visit(browser, registry, "/acme/code", shots, "escaped")
    assert HOSTILE in text  # shown as text...
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text  # noqa: B018 - ...and never run
    assert browser.execute_script("return document.querySelectorAll('main script, main b').length") == 0

    text = visit(browser, registry, "/search?q=acme", shots, "search")
    assert "acme/empty" in text and "qwen-fans/chat" not in text
    text = visit(browser, registry, "/acme/none", shots, "not-found")
    assert "404" in text and "repository acme/none does not exist" in text

    visit(browser, registry, "/docs", shots, "docs", ready=".swagger-ui .opblock")
    assert len(browser.find_elements(By.CSS_SELECTOR, ".opblock")) > 20  # Swagger UI rendered the API offline
    print(f"screenshots in {shots}")
    assert sorted(p.name for p in shots.iterdir()) == sorted(
        f"{n}.png" for n in ("index", "base", "repo", "version", "escaped", "search", "not-found", "docs")
    )


def test_login_form_in_the_browser_reveals_private_repositories(browser, tmp_path):
    server = start_registry(tmp_path, auth_enabled="true", admin_token=ADMIN_SECRET)
    try:
        with server.client() as client:
            fill_catalog(client, headers=ADMIN)
            token = make_token(client, ("lab", "read"))
        shots = tmp_path / "screenshots"
        browser.delete_all_cookies()
        text = visit(browser, server, "/lab/secret", shots, "login")
        assert "Log in" in text and "needs a token with read access" in text
        browser.find_element(By.ID, "token").send_keys(token)
        browser.find_element(By.CSS_SELECTOR, "form.stack button").click()
        WebDriverWait(browser, 10).until(lambda d: d.current_url.endswith("/lab/secret"))
        text = visit(browser, server, "/lab/secret", shots, "private")
        assert "internal experiments" in text and "token:web" in text
        assert browser.execute_script("return document.cookie").find("deltastore_token") == -1  # HttpOnly
        browser.find_element(By.CSS_SELECTOR, "header form button").click()  # log out
        WebDriverWait(browser, 10).until(lambda d: d.current_url == server.url + "/")
        assert "lab/secret" not in visit(browser, server, "/search?q=secret", shots, "after-logout")
    finally:
        server.stop()
