"""The dashboard in a real headless browser (Debian's chromium and chromedriver)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from pathlib import Path
from urllib.parse import urlsplit

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
                 "--window-size=1200,1100",
                 # the network closed: every host but 127.0.0.1 fails to resolve, and anything not on the
                 # loopback goes through a proxy that is not there (the page must need nothing else)
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                 f"--proxy-server=http://127.0.0.1:{free_port()}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # every request the browser makes
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
    browser.execute_script("localStorage.removeItem('impressions.apiKey')")  # a browser that never had a key
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
             browser.find_elements(By.CSS_SELECTOR, '#chart tr.series[data-key="ad-0"]'), timeout=30, what="ad-0 on the page")
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
                    points: JSON.stringify(impressions.charts.chart.u.data[
                      impressions.charts.chart.u.series.findIndex(s => s.label === "ad-0")]),
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
    wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, "#chart tr.series")) == 2 and
             len(browser.find_elements(By.CSS_SELECTOR, ".total")) == 2, timeout=30, what="a second line on the chart")
    _screenshot(browser, "dashboard.png")
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


def _requests(driver) -> list[str]:
    """The URLs the browser asked for since the last call (chromedriver's performance log)."""
    urls = []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] == "Network.requestWillBeSent":
            urls.append(msg["params"]["request"]["url"])
    return urls


def _view_marks(driver, view: str) -> tuple[float, float]:
    el = driver.find_element("id", view)
    return float(el.get_attribute("data-loaded") or 0), float(el.get_attribute("data-failed") or 0)


def _wait_view(driver, view: str, after: float, ok: bool = True, cond=lambda: True):
    """Wait until ``view`` loaded (or failed to load) data after ``after`` (seconds) and ``cond()``;
    then it must have loaded (``ok``) or failed (not ``ok``)."""
    wait_for(lambda: max(_view_marks(driver, view)) > after * 1000 and cond(), timeout=60,
             what=f"the {view} view to load data")
    loaded, failed = _view_marks(driver, view)
    error = driver.find_element("css selector", f"#{view} .view-error")
    if ok:
        assert loaded > failed and not error.is_displayed(), error.text
    else:
        assert failed > loaded and error.is_displayed(), "the view loaded where it should have failed"
    return error.text


CHART = """
const c = window.impressions && window.impressions.charts[arguments[0]];
if (!c) return null;
const u = c.u, canvas = u.root.querySelector('canvas');
// pixels of the first line's colour (#1f77b4) on the canvas: uPlot drew the line
const px = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
let line = 0;
for (let i = 0; i < px.length; i += 4)
  if (Math.abs(px[i] - 31) < 24 && Math.abs(px[i + 1] - 119) < 24 && Math.abs(px[i + 2] - 180) < 24 && px[i + 3] > 200) line++;
return {holder: u.root.parentElement.id, uplot: typeof uPlot === 'function' && u.root.classList.contains('uplot')
          && document.getElementById(arguments[0]).firstElementChild === u.root, canvas: canvas.width > 0 && canvas.height > 0, line,
        labels: u.series.map(s => s.label), show: u.series.map(s => s.show), data: u.data,
        bands: u.bands.map(b => ({series: b.series, fill: !!b.fill})), open: c.meta.lines.map(l => l.open),
        axes: u.axes.map(a => a.label)};
"""


BAND = """
const done = arguments[arguments.length - 1];
const holder = document.createElement('div');
holder.id = 'band-check';
holder.className = 'plot';
document.body.appendChild(holder);
const t0 = 1.7e9, points = [...Array(24).keys()].map((i) => ({x: t0 + 600 * i, span: [t0 + 600 * i - 300, t0 + 600 * i + 300],
  y: 1000, lo: arguments[0], hi: arguments[1], open: false}));
plot('band-check', [{label: 'check', color: COLORS[0], points}], {axis: 'time (UTC)', legend: 'step'});
setTimeout(() => {  // uPlot draws in a microtask after it is made
  const canvas = holder.querySelector('canvas'), px = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  let n = 0;  // pixels of the band's fill: #1f77b4 at 18 % (the canvas is transparent, over the page's white)
  for (let i = 0; i < px.length; i += 4)
    if (Math.abs(px[i] - 31) < 12 && Math.abs(px[i + 1] - 119) < 12 && Math.abs(px[i + 2] - 180) < 12 && Math.abs(px[i + 3] - 46) < 8) n++;
  clearChart('band-check');
  holder.remove();
  done(n);
}, 50);
"""


def _chart(driver, holder: str) -> dict | None:
    return driver.execute_script(CHART, holder)


def _hover(driver, holder: str, i: int) -> str:
    """Put uPlot's cursor on point ``i`` of the chart; the legend's text then."""
    return driver.execute_script("""
        const u = impressions.charts[arguments[0]].u, i = arguments[1] < 0 ? u.data[0].length + arguments[1] : arguments[1];
        u.setCursor({left: u.valToPos(u.data[0][i], 'x'), top: 10});
        return u.root.querySelector('.u-legend').innerText;""", holder, i)


def _screenshot(driver, name: str):
    """The whole page into tests/output/ (a window as tall as the page, for the time of the shot)."""
    OUT.mkdir(exist_ok=True)
    size = driver.get_window_size()
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(size["width"], max(size["height"], height + 140))
    try:
        driver.save_screenshot(str(OUT / name))
    finally:
        driver.set_window_size(size["width"], size["height"])


def _band(points: list[dict], open_: list[bool]) -> tuple[list, list]:
    """The band's edges as the page should draw them: the interval of each point, none at open points."""
    return ([None if o else p["interval"][0] for p, o in zip(points, open_)],
            [None if o else p["interval"][1] for p, o in zip(points, open_)])


def _until_same(read, want, retry, what: str):
    """``read()`` (the page) and ``want()`` (the API) agree, within three tries: "last 6 hours" slides
    every minute, so a minute passing between the page's call and ours asks again (``retry()``)."""
    for _ in range(3):
        page, api = read(), want()
        if page == api:
            return page
        retry()
    assert page == api, what


def test_uplot_views(app, browser):
    """uPlot from /static only; the main chart with its band and its step in progress; the reach,
    overlap and rolling views show what their routes answer; a route's 400 shows in its view."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    browser.get(app + "/")
    browser.execute_script("localStorage.setItem('impressions.apiKey', 'reader')")
    _requests(browser)  # from here on, every request is looked at
    t = time.time()
    browser.get(app + "/")
    _wait_loaded(browser, t)

    # the main chart is uPlot's canvas: a line per key with its 95 % band, units on both axes
    main = _chart(browser, "chart")
    assert main and main["holder"] == "chart" and main["uplot"] and main["canvas"], main
    assert main["labels"][1:] == ["site-wide", "site-wide 95 % low", "site-wide 95 % high"]
    assert main["bands"] == [{"series": [3, 2], "fill": True}] and all(main["show"])
    assert main["axes"] == ["time (UTC)", "unique visitors"]
    assert main["line"] > 200, "no line drawn on the canvas"
    # the band is drawn: the test data is counted nearly exactly (bands as thin as the line), so the
    # page's chart code draws points with wide intervals once, in a chart of its own
    wide, none = browser.execute_async_script(BAND, 800, 1200), browser.execute_async_script(BAND, 1000, 1000)
    assert wide > 20_000 and none < 100, (wide, none)

    def main_page():
        c = _chart(browser, "chart")
        return c["data"][1:], c["open"][0]

    def main_api():  # the last step is open ("in progress") while it has not ended, and has no band
        step = browser.find_element(By.ID, "status").text.split("step ")[1].split(";")[0].strip()
        pts = _api(app, "/v1/series", last="24h", step=step)["points"]
        open_ = [i == len(pts) - 1 and p["end"] > time.time() for i, p in enumerate(pts)]
        return [[p["unique_visitors"] for p in pts], *_band(pts, open_)], open_

    def refresh():
        t = time.time()
        browser.find_element(By.ID, "refresh").click()
        _wait_loaded(browser, t)

    (values, lo, hi), open_ = _until_same(main_page, main_api, refresh, "the main chart and /v1/series")
    assert len(values) > 10 and all(x is not None for x in lo[:-1]) and all(a <= v <= b for a, v, b in zip(lo, values, hi)
                                                                            if a is not None)
    assert open_[-1], "the last step of a range ending now has not ended: it should be drawn as in progress"
    assert "in progress" in browser.find_element(By.ID, "chart-note").text
    # hover: the legend shows the value under the cursor, and says the open step is in progress
    assert "in progress" in _hover(browser, "chart", -1) and f"{values[-1]:,}" in _hover(browser, "chart", -1)
    assert f"{values[3]:,}" in _hover(browser, "chart", 3) and "in progress" not in _hover(browser, "chart", 3)

    # choose a range and two keys: the reach card shows their deduplicated reach, as /v1/reach says
    t = time.time()
    Select(browser.find_element(By.ID, "range")).select_by_value("6h")
    _wait_loaded(browser, t)
    for k in ("ad-0", "ad-1"):
        browser.find_element(By.ID, "key-search").send_keys(k)
        browser.find_element(By.ID, "add-key").click()
    _wait_view(browser, "reach", 0, cond=lambda: browser.find_element(By.ID, "reach").get_attribute("data-keys") == "ad-0,ad-1")

    def reach_page():
        return browser.execute_script("""
            const v = document.getElementById('reach');
            return {unique: +v.querySelector('.unique').dataset.value, impressions: +v.querySelector('.impressions').dataset.value,
                    frequency: +v.querySelector('.frequency').dataset.value, shown: !v.querySelector('.result').hidden,
                    text: v.querySelector('.result').innerText};""")

    def reach_api():
        r = _api(app, "/v1/reach", key=["ad-0", "ad-1"], last="6h")
        return {"unique": r["unique_visitors"], "impressions": r["impressions"], "frequency": r["frequency"]}

    def refresh_all():
        t = time.time()
        browser.find_element(By.ID, "refresh").click()
        _wait_view(browser, "reach", t)
        _wait_view(browser, "rolling", t)

    got = _until_same(lambda: {k: v for k, v in reach_page().items() if k in ("unique", "impressions", "frequency")},
                      reach_api, refresh_all, "the reach card and /v1/reach")
    page = reach_page()
    assert page["shown"] and f"{got['unique']:,}" in page["text"] and f"{got['impressions']:,}" in page["text"]
    one = _api(app, "/v1/unique", key="ad-0", last="6h")["unique_visitors"]
    assert one < got["unique"], "the reach of two keys is more than one key's"

    # the rolling chart: the chosen keys as one set, one point per window, open windows in progress
    def rolling_page():
        c = _chart(browser, "rolling-chart")
        return c and {"values": c["data"][1], "band": c["data"][2:4], "open": c["open"][0], "x": c["data"][0]}

    def rolling_api(**q):
        def want():
            pts = _api(app, "/v1/rolling", key=["ad-0", "ad-1"], last="6h", **q)["points"]
            open_ = [not p["complete"] for p in pts]
            return {"values": [p["unique_visitors"] for p in pts], "band": list(_band(pts, open_)), "open": open_,
                    "x": [p["end"] for p in pts]}
        return want

    _wait_view(browser, "rolling", 0, cond=lambda: json.loads(
        browser.find_element(By.ID, "rolling").get_attribute("data-query") or "{}").get("keys") == ["ad-0", "ad-1"])
    got = _until_same(rolling_page, rolling_api(window="1h", step="15m"), refresh_all, "the rolling chart and /v1/rolling")
    assert len(got["values"]) == (6 * 60 - 60) // 15 + 1 and got["open"][-1] and not any(got["open"][:-1])
    rolling = _chart(browser, "rolling-chart")
    assert rolling["uplot"] and rolling["bands"] == [{"series": [3, 2], "fill": True}] and rolling["line"] > 100
    assert rolling["axes"] == ["window end (UTC)", "unique visitors"]
    assert "in progress" in _hover(browser, "rolling-chart", -1)
    # cumulative: unique visitors since the start of the range, at every step
    t = time.time()
    browser.find_element(By.ID, "rolling-cumulative").click()
    _wait_view(browser, "rolling", t)
    got = _until_same(rolling_page, rolling_api(cumulative="true", step="15m"), refresh_all,
                      "the cumulative chart and /v1/rolling")
    assert len(got["values"]) == 6 * 60 // 15

    # the overlap of two selections: the visitors of both, as /v1/overlap says
    def overlap_page():
        return browser.execute_script("""
            const v = document.getElementById('overlap'), d = (s) => v.querySelector(s).dataset.value;
            return {both: +d('.both'), jaccard: +d('.jaccard'), a: +d('.only-a'), b: +d('.only-b'), union: +d('.union'),
                    note: v.querySelector('.note').hidden ? null : v.querySelector('.note').textContent};""")

    def overlap_api(**q):
        def want():
            r = _api(app, "/v1/overlap", last="6h", **q)
            return {"both": r["both"]["unique_visitors"], "jaccard": r["jaccard"], "a": r["a"]["unique_visitors"],
                    "b": r["b"]["unique_visitors"], "union": r["union"]["unique_visitors"], "note": r["note"]}
        return want

    def compare():
        t = time.time()
        browser.find_element(By.ID, "compare").click()
        _wait_view(browser, "overlap", t)

    browser.find_element(By.ID, "a-chosen").click()  # A: the keys chosen above
    assert browser.find_element(By.ID, "a-keys").get_attribute("value") == "ad-0, ad-1"
    browser.find_element(By.ID, "b-keys").send_keys("ad-2")
    compare()
    got = _until_same(overlap_page, overlap_api(a=["ad-0", "ad-1"], b="ad-2"), compare, "the overlap view and /v1/overlap")
    assert 0 < got["both"] < min(got["a"], got["b"])
    text = browser.find_element(By.CSS_SELECTOR, "#overlap .result").text
    assert f"{got['both']:,} visitors saw both A and B" in text and "Jaccard" in text
    # a prefix for B instead of keys
    browser.find_element(By.ID, "b-keys").clear()
    browser.find_element(By.ID, "b-prefix").send_keys("ad-1")
    compare()
    _until_same(overlap_page, overlap_api(a=["ad-0", "ad-1"], b_prefix="ad-1"), compare, "the overlap of a prefix")
    _screenshot(browser, "dashboard-views.png")

    # a window longer than the range: the API's 400 message shows in the rolling view, no chart
    t = time.time()
    browser.find_element(By.ID, "rolling-cumulative").click()
    _wait_view(browser, "rolling", t)
    t = time.time()
    Select(browser.find_element(By.ID, "rolling-window")).select_by_value("7d")
    shown = _wait_view(browser, "rolling", t, ok=False)
    r = httpx.get(app + "/v1/rolling", params={"key": ["ad-0", "ad-1"], "window": "7d", "step": "15m", "last": "6h"},
                  headers={"Authorization": "Bearer reader"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]
    assert shown == "The API refused the request: " + r.json()["error"]
    assert _chart(browser, "rolling-chart") is None and not browser.find_elements(By.CSS_SELECTOR, "#rolling-chart canvas")
    _screenshot(browser, "dashboard-error.png")
    # the other views are unaffected by it
    assert not browser.find_element(By.CSS_SELECTOR, "#reach .view-error").is_displayed()

    # uPlot came from /static, and no request left 127.0.0.1
    urls = _requests(browser)
    assert app + "/static/uPlot.iife.min.js" in urls and app + "/static/uPlot.min.css" in urls, urls
    away = [u for u in urls if not u.startswith("data:") and urlsplit(u).hostname != "127.0.0.1"]
    assert not away, away


def test_vendored_uplot(app):
    """The files the page loads are served, and VENDORED.md says what they are."""
    static = Path(__file__).resolve().parent.parent / "api" / "static"
    vendored = (static / "VENDORED.md").read_text()
    for name in ("uPlot.iife.min.js", "uPlot.min.css", "uPlot.LICENSE"):
        r = httpx.get(f"{app}/static/{name}", timeout=30)
        assert r.status_code == 200 and r.content == (static / name).read_bytes(), name
        assert hashlib.sha256(r.content).hexdigest() in vendored, f"{name}: its sha256 is not the one VENDORED.md gives"
    version = re.search(r"\(v([0-9.]+)\)", (static / "uPlot.iife.min.js").read_text()[:200]).group(1)
    assert f"| version | {version} |" in vendored and "integrity" in vendored and "MIT" in vendored
    assert "MIT License" in (static / "uPlot.LICENSE").read_text()
    page = httpx.get(app + "/", timeout=30).text
    assert '<script src="static/uPlot.iife.min.js">' in page and 'href="static/uPlot.min.css"' in page
