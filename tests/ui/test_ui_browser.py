"""The dashboard in a real browser: headless Debian chromium driven by Selenium through the system chromedriver
(given explicitly, so nothing downloads a browser). Skips, with the reason, only where either is missing.

One browser session walks every view (about 10 s): the runs table lists the runs with markup shown as text and follows a live run, two
selected runs draw two train-loss curves whose points are the API's, the examples view shows the differing item,
and a promote is refused without the admin key and moves the alias with it (checked through the CLI).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time

import pytest

from tests.ui.conftest import HOSTILE_NAME, HOSTILE_VALUE, build_fake_registry

KEY = "browser-test-admin-key"
WAIT_S = 20


def _binaries() -> tuple[str, str]:
    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)
    driver = shutil.which("chromedriver") or next(
        (p for p in ("/usr/lib/chromium/chromedriver", "/usr/bin/chromedriver") if os.path.exists(p)), None)
    if browser is None or driver is None:
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver; "
                    ".ci/run installs them where it can)")
    return browser, driver


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install '.[test]')")
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = _binaries()
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not look for browsers on the network
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1280,900", "--disable-extensions", "--no-first-run"):
        options.add_argument(flag)
    try:
        driver = webdriver.Chrome(options=options, service=Service(driver_path))
    except Exception as exc:  # a browser that is installed but cannot start here (no /dev/shm, seccomp, ...)
        pytest.skip(f"chromium could not start: {str(exc).splitlines()[0]}")
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The dashboard on a free loopback port (uvicorn in a thread), over a fresh fake registry, with a key."""
    import uvicorn

    from tunesmith.ui.app import create_app
    from tunesmith.ui.sources import Catalog

    fake = build_fake_registry(tmp_path_factory.mktemp("ui-browser"))
    app = create_app(Catalog(fake["url"], fake["runs"]), admin_key=KEY, allowed_hosts=["127.0.0.1"])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT_S
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the dashboard server did not start"
        time.sleep(0.05)
    yield {**fake, "base": f"http://127.0.0.1:{port}"}
    server.should_exit = True
    thread.join(10)


def _aliases(url: str, capsys) -> list:
    from tunesmith.cli import main

    capsys.readouterr()
    assert main(["runs", "aliases", "--registry", url, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_dashboard_in_a_real_browser(browser, served, tmp_path, capsys):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    # the page redraws a table when a poll brings news; a wait re-reads the DOM instead of failing on old nodes
    wait = WebDriverWait(browser, WAIT_S, ignored_exceptions=(StaleElementReferenceException,))
    shots = tmp_path / "screenshots"
    shots.mkdir()

    # runs table: every run listed; markup in a name or a metric value is shown as text and never runs
    browser.get(served["base"] + "/#runs")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#runs-table tbody tr")) == 4)
    table = browser.execute_script("""return [...document.querySelectorAll('#runs-table tbody tr')].map(
        (tr) => [tr.dataset.id, [...tr.cells].map((td) => td.textContent)])""")
    rows = dict(table)
    assert set(rows) == {"alpha@1", "beta@1", f"{HOSTILE_NAME}@1", "dir:live"}
    assert rows[f"{HOSTILE_NAME}@1"][1] == HOSTILE_NAME and HOSTILE_VALUE in rows[f"{HOSTILE_NAME}@1"]
    assert browser.execute_script("return window.__pwned === undefined")
    assert "running" in rows["dir:live"]
    with (served["live"] / "metrics.jsonl").open("a") as handle:  # the live run logs a step: the table follows
        handle.write(json.dumps({"step": 5, "train_loss": 0.4321, "lr": 1e-4, "epoch": 0.8, "tokens": 640}) + "\n")
    wait.until(lambda d: "0.43210" in d.find_element(By.CSS_SELECTOR, '#runs-table tr[data-id="dir:live"]').text)
    first_row = 'return document.querySelector("#runs-table tbody tr").dataset.id'
    browser.find_element(By.CSS_SELECTOR, '#runs-table th[data-key="name"]').click()  # sorted by name: now descending
    wait.until(lambda d: d.execute_script(first_row) == "dir:live")
    browser.find_element(By.CSS_SELECTOR, '#runs-table th[data-key="m:test.exact_match"]').click()
    wait.until(lambda d: d.execute_script(first_row) == "beta@1")  # 0.667 < 1.0 < the markup string
    browser.find_element(By.CSS_SELECTOR, '#runs-table th[data-key="name"]').click()
    browser.find_element(By.ID, "filter").send_keys("beta")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#runs-table tbody tr")) == 1)
    browser.find_element(By.ID, "filter").clear()
    browser.find_element(By.ID, "filter").send_keys(" ")  # clear() fires no input event; the filter trims spaces
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#runs-table tbody tr")) == 4)
    browser.save_screenshot(str(shots / "runs.png"))

    # compare: two selected runs draw two train-loss curves (and two eval-loss curves) with the API's points
    for run_id in ("alpha@1", "beta@1"):
        browser.find_element(By.CSS_SELECTOR, f'#runs-table tr[data-id="{run_id}"] input.pick').click()
    browser.find_element(By.ID, "compare-selected").click()
    wait.until(lambda d: d.find_element(By.ID, "loss-chart").get_attribute("data-series") == "4")
    labels = json.loads(browser.find_element(By.ID, "loss-chart").get_attribute("data-labels"))
    assert [label for label in labels if label.endswith("train loss")] == ["alpha@1 train loss", "beta@1 train loss"]
    assert len(browser.find_elements(By.CSS_SELECTOR, "#loss-chart canvas")) == 1
    drawn = browser.execute_script("return window.tunesmith.charts.loss.data")
    api = browser.execute_script(
        "return fetch('/api/compare?id=alpha@1&id=beta@1').then(r => r.json())")
    for k, run in enumerate(api["runs"]):
        for j, key in enumerate(("train_loss", "eval_loss")):
            column = drawn[1 + 2 * k + j]
            points = [(x, y) for x, y in zip(drawn[0], column, strict=True) if y is not None]
            assert points == list(zip(run["series"][key]["x"], run["series"][key]["y"], strict=True))
    browser.find_element(By.ID, "log-y").click()
    wait.until(lambda d: d.execute_script("return window.tunesmith.charts.loss.scales.y.distr") == 3)
    Select(browser.find_element(By.ID, "x-axis")).select_by_visible_text("tokens")
    wait.until(lambda d: d.execute_script("return window.tunesmith.charts.loss.data[0][0]") == 128)
    assert "healthy" in browser.find_element(By.ID, "diagnoses").text
    assert "train.learning_rate" in browser.find_element(By.ID, "config-table").text
    assert "base (fake/base-model)" in browser.find_element(By.ID, "metrics-table").text
    browser.save_screenshot(str(shots / "compare.png"))

    # examples: the one test item where the two runs answered differently
    browser.find_element(By.CSS_SELECTOR, 'nav a[data-view="examples"]').click()
    Select(browser.find_element(By.ID, "ex-a")).select_by_value("alpha@1")
    Select(browser.find_element(By.ID, "ex-b")).select_by_value("beta@1")
    browser.find_element(By.ID, "ex-show").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#ex-list .example")) == 1)
    example = browser.find_element(By.CSS_SELECTOR, "#ex-list .example")
    assert "Parse 7." in example.find_element(By.CSS_SELECTOR, ".input").text
    assert example.find_element(By.CSS_SELECTOR, ".output-a").text == "7"
    assert example.find_element(By.CSS_SELECTOR, ".output-b").text == "8"
    assert "1 of 3" in browser.find_element(By.ID, "ex-summary").text
    browser.save_screenshot(str(shots / "examples.png"))

    # data: the prepared snapshot's report
    browser.find_element(By.CSS_SELECTOR, 'nav a[data-view="data"]').click()
    Select(browser.find_element(By.ID, "data-run")).select_by_value("alpha@1")
    wait.until(lambda d: "identity holds" in d.find_element(By.ID, "data-body").text)
    data_text = browser.find_element(By.ID, "data-body").text
    assert "empty_field" in data_text and "Realised mixture (40 records" in data_text and "general" in data_text
    browser.save_screenshot(str(shots / "data.png"))

    # registry: promote without the key is refused; with it the alias moves (the CLI sees it)
    browser.find_element(By.CSS_SELECTOR, 'nav a[data-view="registry"]').click()
    wait.until(lambda d: "no aliases yet" in d.find_element(By.ID, "aliases").text)
    Select(browser.find_element(By.ID, "promote-ref")).select_by_value("alpha@1")
    browser.find_element(By.CSS_SELECTOR, "#promote-form button").click()
    wait.until(lambda d: "refused" in d.find_element(By.ID, "action-result").text)
    assert "admin key" in browser.find_element(By.ID, "action-result").text
    assert _aliases(served["url"], capsys) == []
    browser.find_element(By.ID, "admin-key").send_keys(KEY)
    browser.find_element(By.CSS_SELECTOR, "#promote-form button").click()
    wait.until(lambda d: "production → alpha@1" in d.find_element(By.ID, "action-result").text)
    wait.until(lambda d: "revision 1" in d.find_element(By.ID, "aliases").text)
    assert [(a["alias"], a["ref"]) for a in _aliases(served["url"], capsys)] == [("production", "alpha@1")]
    browser.save_screenshot(str(shots / "registry.png"))
    assert all((shots / f"{v}.png").stat().st_size > 10_000 for v in ("runs", "compare", "examples", "data", "registry"))
    assert browser.execute_script("return window.__pwned === undefined")
