"""The dashboard in a real headless browser (Debian's chromium and chromedriver)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import httpx
import pytest

from impressions.cluster.config import ClusterConfig
from impressions.sketch.store import SketchConfig
from tests.conftest import free_port, wait_for

OUT = Path(__file__).resolve().parent / "output"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def app(ray_cluster, tmp_path_factory):
    if not (CHROMIUM and CHROMEDRIVER):  # a failure, not a skip: the README's test command installs them
        pytest.fail("no headless browser: run the tests with `bash scripts/test.sh`, which installs Debian's "
                    "chromium and chromium-driver")
    from ray import serve

    from impressions.cluster.bootstrap import ensure_actors, teardown
    from impressions.cluster.client import Client
    from impressions.cluster.serve import start
    ns = "dash"
    cfg = ClusterConfig(sketch=SketchConfig(), shards=2, namespace=ns,
                        storage=f"file://{tmp_path_factory.mktemp('dash-store')}")
    ensure_actors(cfg)
    from impressions.cluster.workload import generate
    now = time.time()
    Client(start=False, namespace=ns).ingest(generate(60_000, days=1, visitors=20_000, keys=30, seed=2, end=now - 60),
                                             now=now)
    url = start(ns, port=free_port(), api_keys="reader:read,writer:write", name="dash-test")
    wait_for(lambda: httpx.get(url + "/healthz", timeout=2).status_code == 200, timeout=60, what="the app")
    yield url
    serve.delete("dash-test")
    teardown(ns)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    opts = Options()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--window-size=1200,1100"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


def _api(url, path, **params):
    r = httpx.get(url + path, params=params, headers={"Authorization": "Bearer reader"}, timeout=30)
    r.raise_for_status()
    return r.json()


def _marks(driver) -> tuple[float, float]:
    body = driver.find_element("tag name", "body")
    return float(body.get_attribute("data-loaded") or 0), float(body.get_attribute("data-failed") or 0)


def _wait_loaded(driver, after: float):
    """Wait until the page loaded (or failed to load) data after ``after`` (seconds)."""
    wait_for(lambda: max(_marks(driver)) > after * 1000, timeout=30, what="the page to load data")
    loaded, failed = _marks(driver)
    assert loaded > failed, driver.find_element("id", "error").text


def test_dashboard_shows_what_the_api_returns(app, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    browser.get(app + "/")
    # without a key the page says what is wrong, in plain words
    wait_for(lambda: browser.find_element(By.ID, "error").is_displayed(), timeout=30, what="the error banner")
    assert "needs an API key with the read scope" in browser.find_element(By.ID, "error").text
    # enter the key once (kept in the browser), choose a key and a range
    t = time.time()
    key_box = browser.find_element(By.ID, "api-key")
    key_box.send_keys("reader")
    browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", key_box)
    _wait_loaded(browser, t)
    assert browser.execute_script("return localStorage.getItem('impressions.apiKey')") == "reader"
    t = time.time()
    Select(browser.find_element(By.ID, "range")).select_by_value("6h")
    _wait_loaded(browser, t)
    t = time.time()
    browser.find_element(By.ID, "key-search").send_keys("ad-0")
    browser.find_element(By.ID, "add-key").click()
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, '.total[data-key="ad-0"]') and
             browser.find_elements(By.CSS_SELECTOR, 'path.series[data-key="ad-0"]'), timeout=30, what="ad-0 on the page")
    _wait_loaded(browser, t)
    # totals, chart and top keys: the same numbers as the API for the same range ("last 6 hours"
    # slides every minute, so if a minute passes between the page's calls and ours, look again)
    for attempt in range(3):
        want = _api(app, "/v1/unique", key="ad-0", last="6h")
        step = browser.find_element(By.ID, "status").text.split("step ")[1].split(";")[0].strip()
        series = _api(app, "/v1/series", key="ad-0", last="6h", step=step)
        top = _api(app, "/v1/keys", last="6h", limit=15)["keys"]
        page = browser.execute_script("""
            const t = document.querySelector('.total[data-key="ad-0"]');
            return {unique: t.querySelector('.unique').dataset.value, impressions: t.querySelector('.impressions').dataset.value,
                    points: document.querySelector('path.series[data-key="ad-0"]').dataset.points,
                    top: [...document.querySelectorAll('#top-keys tbody tr')].map(r => r.dataset.key)};""")
        same = (int(page["unique"]) == want["unique_visitors"] and int(page["impressions"]) == want["impressions"]
                and json.loads(page["points"]) == [p["unique_visitors"] for p in series["points"]]
                and page["top"] == [k["key"] for k in top])
        if same:
            break
        t = time.time()
        browser.find_element(By.ID, "refresh").click()
        _wait_loaded(browser, t)
    assert same, (page, want, [p["unique_visitors"] for p in series["points"]], top)
    assert len(series["points"]) > 10
    rows = browser.find_elements(By.CSS_SELECTOR, "#top-keys tbody tr")
    # a key from the top table joins the chart
    rows[1].find_element(By.TAG_NAME, "button").click()
    wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, "path.series")) == 2 and
             len(browser.find_elements(By.CSS_SELECTOR, ".total")) == 2, timeout=30, what="a second line on the chart")
    OUT.mkdir(exist_ok=True)
    browser.save_screenshot(str(OUT / "dashboard.png"))
    # auto-refresh picks up fresh events within seconds: a key with no past (a sliding
    # window would otherwise drop old events while new ones arrive)
    browser.find_element(By.ID, "key-search").send_keys("fresh-key")
    browser.find_element(By.ID, "add-key").click()
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, '.total[data-key="fresh-key"]'), timeout=30,
             what="the fresh key's total")
    browser.find_element(By.ID, "auto").click()
    httpx.post(app + "/v1/events", json=[{"ts": time.time(), "key": "fresh-key", "visitor": f"new-{i}"} for i in range(7)],
               headers={"X-API-Key": "writer"}, timeout=30).raise_for_status()

    def updated():  # read in one step: auto-refresh re-renders the totals under our feet
        v = browser.execute_script(
            "const e = document.querySelector('.total[data-key=\"fresh-key\"] .unique'); return e && e.dataset.value")
        return v is not None and int(v) == 7
    wait_for(updated, timeout=45, what="auto-refresh to show the new events")


def test_keys_route(app):
    r = httpx.get(app + "/v1/keys", params={"prefix": "ad-1", "limit": 5}, headers={"Authorization": "Bearer reader"})
    keys = r.json()["keys"]
    assert 0 < len(keys) <= 5 and all(k["key"].startswith("ad-1") for k in keys)
    assert [k["impressions"] for k in keys] == sorted((k["impressions"] for k in keys), reverse=True)
    assert httpx.get(app + "/v1/keys").status_code == 401
    assert httpx.get(app + "/").status_code == 200 and "Unique visitors" in httpx.get(app + "/").text
