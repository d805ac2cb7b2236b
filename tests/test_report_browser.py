"""The HTML report in a real headless browser (Debian's chromium + chromedriver, via Selenium):
no console errors or exceptions, every image decoded, the tables of the expected shape.

`.ci/run` installs chromium when it is missing, so in CI this test runs; elsewhere it skips
when no browser is installed.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from vitsam.report import build_report
from vitsam.study import tables

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and DRIVER):
        if os.environ.get("CI") == "true":
            pytest.fail("CI needs chromium and chromedriver (.ci/run installs them)")
        pytest.skip("no chromium/chromedriver installed (apt-get install chromium chromium-driver)")
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium fetch a driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield driver
    driver.quit()


def test_report_opens_cleanly_with_all_images_and_tables(study_dir: Path, browser) -> None:
    html, _ = build_report([study_dir])
    browser.get(html.resolve().as_uri())
    errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    assert not errors, errors
    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth]);")
    assert len(images) >= 8
    assert all(done and width > 0 for _, done, width in images), images
    for name in ("main", "inside", "sharpness"):
        rec = json.loads((study_dir / f"study-{name}.json").read_text())
        t = tables.study_tables(study_dir, rec)
        shape = browser.execute_script(
            "const t = document.querySelector(`table.results[data-study='${arguments[0]}']`);"
            "return [t.tBodies[0].rows.length, t.tHead.rows[0].cells.length,"
            " Array.from(t.tBodies[0].rows).map(r => r.cells.length)];", name)
        cols = [c for c in t["columns"] if any(c in r for r in t["agg"])]
        assert shape[0] == len(t["agg"]), name
        assert shape[1] == 1 + len(cols) and set(shape[2]) == {1 + len(cols)}, name
    # The first row of main's table reads what its run folders hold.
    text = browser.execute_script(
        "return document.querySelector(\"table.results[data-study='main'] tbody tr\").innerText;")
    rec = json.loads((study_dir / "study-main.json").read_text())
    first = tables.study_tables(study_dir, rec)["agg"][0]
    assert tables.fmt_cell(first["test_acc"], "test_acc") in text
