"""The attention explorer in a real headless Chromium (Debian's chromium + chromedriver):
translate (streamed: tokens and their alignment rows as they are chosen), check the alignment grid, classify a bundled sample, check labels and overlay; the
page's screenshot is kept in test-artifacts/."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from selenium import webdriver
from selenium.webdriver.chrome.service import Service as Driver
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.conftest import Service

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[3]
ARTIFACTS = ROOT / "test-artifacts"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    if not Path(CHROMEDRIVER).exists():
        pytest.fail("chromium-driver is not installed (make system-deps installs it)")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,1500",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Driver(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver: webdriver.Chrome, condition: object, timeout: float = 30) -> object:
    return WebDriverWait(driver, timeout).until(condition)


def test_explorer_translates_and_classifies(service: Service, browser: webdriver.Chrome) -> None:
    browser.get(service.url + "/")
    wait(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
    # -- translation: an RNN's alignment grid, one cell per (target, source) token pair
    Select(browser.find_element(By.ID, "translation-model")).select_by_value("dates-bahdanau")
    text = browser.find_element(By.ID, "text")
    text.clear()
    text.send_keys("3 juin 1980")
    browser.find_element(By.ID, "translate").click()
    wait(browser, lambda d: d.find_element(By.ID, "translation").text == "1980-06-03")
    expected = requests.post(
        f"{service.url}/v1/models/dates-bahdanau/translate", json={"text": "3 juin 1980"}, timeout=30
    ).json()["translations"][0]
    cells = browser.find_elements(By.CSS_SELECTOR, "#grid td.cell")
    assert len(cells) == len(expected["target_tokens"]) * len(expected["source_tokens"])
    # the page streamed it: one server-sent token event per target token, then the answer
    streamed = browser.find_element(By.TAG_NAME, "body").get_attribute("data-streamed-tokens")
    assert streamed == str(len(expected["target_tokens"]))
    rows = browser.find_elements(By.CSS_SELECTOR, "#grid tbody tr")
    ActionChains(browser).move_to_element(rows[0]).perform()
    assert "active" in rows[0].get_attribute("class")
    assert browser.find_elements(By.CSS_SELECTOR, "#grid th.src.lit"), "hovering lights its sources"
    # -- a Transformer: every layer and head, selectable
    Select(browser.find_element(By.ID, "translation-model")).select_by_value("dates-transformer")
    browser.find_element(By.ID, "translate").click()
    wait(browser, lambda d: d.find_element(By.ID, "layer-head").is_displayed())
    Select(browser.find_element(By.ID, "head")).select_by_value("0")
    assert browser.find_elements(By.CSS_SELECTOR, "#grid td.cell")
    # -- an image: a bundled sample, labels and the rollout overlay
    Select(browser.find_element(By.ID, "image-model")).select_by_value("fashion-vit")
    browser.find_element(By.CSS_SELECTOR, "#samples button[data-sample='bag']").click()
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#labels li")) == 5)
    painted = browser.execute_script(
        "const d = document.getElementById('overlay').getContext('2d').getImageData(0, 0, 288, 288).data;"
        "let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n;"
    )
    assert painted > 288 * 288 * 0.9, "the rollout heatmap covers the picture"
    metrics = browser.find_element(By.ID, "image-metrics").text
    assert "version" in metrics and "batch" in metrics
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "explorer.png"))
    assert browser.find_element(By.ID, "status").get_attribute("class") != "error"
