"""The attention explorer in a real headless Chromium (Debian's chromium + chromedriver):
translate (streamed: tokens and their alignment rows as they are chosen), check the alignment grid, classify a bundled sample, check labels and overlay; the
page's screenshot is kept in test-artifacts/."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service as Driver
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.conftest import API_TOKEN, Service

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
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console, for get_log
    driver = webdriver.Chrome(service=Driver(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver: webdriver.Chrome, condition: object, timeout: float = 30) -> object:
    return WebDriverWait(driver, timeout).until(condition)


def ready(driver: webdriver.Chrome) -> bool:
    return driver.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true"


def translate_on_page(driver: webdriver.Chrome, model: str, text: str, expected: str) -> None:
    Select(driver.find_element(By.ID, "translation-model")).select_by_value(model)
    field = driver.find_element(By.ID, "text")
    field.clear()
    field.send_keys(text)
    driver.find_element(By.ID, "translate").click()
    wait(driver, lambda d: d.find_element(By.ID, "translation").text == expected)


def test_explorer_translates_and_classifies(service: Service, browser: webdriver.Chrome) -> None:
    browser.get(service.url + "/")
    wait(browser, ready)
    # -- translation: an RNN's alignment grid, one cell per (target, source) token pair
    translate_on_page(browser, "dates-bahdanau", "3 juin 1980", "1980-06-03")
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


def status_text(driver: webdriver.Chrome) -> str:
    return str(driver.find_element(By.ID, "status").text)


def test_with_a_token_the_page_asks_for_it_and_lists_the_models_once_typed(
    guarded: Service, browser: webdriver.Chrome
) -> None:
    """A service with an API token: the page said it could not list the models and stayed
    empty whatever was typed (the models were listed once, at load), then posted to
    ``/v1/models//translate``. Now it asks for the token, lists the models once it is entered,
    and a wrong one is named."""
    browser.get(guarded.url + "/")
    wait(browser, lambda d: "Enter the API token above" in status_text(d))
    browser.find_element(By.ID, "translate").click()
    wait(browser, lambda d: "enter the API token" in status_text(d))
    token = browser.find_element(By.ID, "token")
    token.send_keys("wrong-token-of-some-length" + Keys.ENTER)
    wait(browser, lambda d: "not valid" in status_text(d))
    token.clear()
    token.send_keys(API_TOKEN + Keys.ENTER)
    wait(browser, ready)
    assert "models ready" in status_text(browser)
    translate_on_page(browser, "dates-bahdanau", "3 juin 1980", "1980-06-03")
    listings = browser.find_element(By.TAG_NAME, "body").get_attribute("data-listings")
    browser.execute_script("document.getElementById('token').dispatchEvent(new Event('change'))")
    wait(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-listings") != listings)
    # listed again: each model once, the choice kept
    options = [
        o.get_attribute("value") for o in browser.find_elements(By.CSS_SELECTOR, "#translation-model option")
    ]
    assert sorted(options) == ["dates-bahdanau", "dates-transformer"]
    assert (
        Select(browser.find_element(By.ID, "translation-model")).first_selected_option.get_attribute("value")
        == "dates-bahdanau"
    )


#: the page's fetch, with its first call to the API (``/v1/…``) after it is installed held back
#: ``ms`` — the request itself, not a sample's download before it
SLOW_FIRST_FETCH = """
const real = window.fetch, ms = arguments[0];
let first = true;
window.fetch = (...args) => {
  const late = first && String(args[0]).startsWith("/v1/");
  if (late) first = false;
  return late ? new Promise((r) => setTimeout(r, ms)).then(() => real(...args)) : real(...args);
};
"""


SLOW_FIRST_BITMAP = """
const real = window.createImageBitmap, ms = arguments[0];
let first = true;
window.createImageBitmap = (...args) => {
  const late = first;
  first = false;
  return late ? new Promise((r) => setTimeout(r, ms)).then(() => real(...args)) : real(...args);
};
"""
PICTURE = "return document.getElementById('picture').toDataURL();"


def test_only_the_latest_request_shows_and_a_refusal_clears_the_panel(
    service: Service, browser: webdriver.Chrome, tmp_path: Path
) -> None:
    """A slow answer to an earlier request never overwrites a later one's (it did: the first
    translation's text and grid, and the first image's labels, came back last and stayed); after
    a refusal no earlier answer stays on screen; an image the browser cannot display (TIFF) still
    gets its labels, without a heatmap; the file input is reached from the keyboard; a text over
    the model's limit is translated when "truncate" is ticked."""
    browser.get(service.url + "/")
    wait(browser, ready)
    model, text = (
        Select(browser.find_element(By.ID, "translation-model")),
        browser.find_element(By.ID, "text"),
    )
    browser.execute_script(SLOW_FIRST_FETCH, 1500)
    model.select_by_value("dates-transformer")
    text.clear()
    text.send_keys("le 14 juillet 1789")
    browser.find_element(By.ID, "translate").click()
    model.select_by_value("dates-bahdanau")
    text.clear()
    text.send_keys("3 juin 1980")
    browser.find_element(By.ID, "translate").click()
    wait(browser, lambda d: "Translated by dates-bahdanau" in status_text(d))
    time.sleep(2.5)  # the first answer would be in by now
    assert browser.find_element(By.ID, "translation").text == "1980-06-03"
    assert "dates-bahdanau" in status_text(browser)
    # over the limit: refused, and the earlier answer leaves the screen; ticked, translated
    text.clear()
    text.send_keys("3 juin 1980 " * 30)
    browser.find_element(By.ID, "translate").click()
    wait(browser, lambda d: "truncate" in status_text(d))
    assert not browser.find_element(By.ID, "translation-result").is_displayed()
    browser.find_element(By.ID, "truncate").click()
    browser.find_element(By.ID, "translate").click()
    wait(browser, lambda d: "Translated by dates-bahdanau" in status_text(d))
    assert browser.find_element(By.ID, "translation-result").is_displayed()
    # images: the slow first sample never replaces the second one's labels
    Select(browser.find_element(By.ID, "image-model")).select_by_value("fashion-vit")
    browser.execute_script(SLOW_FIRST_FETCH, 1500)
    browser.find_element(By.CSS_SELECTOR, "#samples button[data-sample='bag']").click()
    browser.find_element(By.CSS_SELECTOR, "#samples button[data-sample='trouser']").click()
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#labels li")) == 5)
    time.sleep(3.5)  # the bag's classification, held back, would be in by now

    def top(sample: str) -> str:  # as the page writes it: "label — 12.3 %"
        best = requests.post(
            f"{service.url}/v1/models/fashion-vit/classify",
            files={
                "file": ("s.png", (ROOT / "docs" / "samples" / f"{sample}.png").read_bytes(), "image/png")
            },
            timeout=30,
        ).json()["predictions"][0]
        return f"{best['label']} — {100 * best['probability']:.1f} %"

    assert top("bag") != top("trouser")  # the check below can tell them apart
    assert browser.find_element(By.CSS_SELECTOR, "#labels li").text == top("trouser")
    # the first image's answer in first, its picture still decoding (a large photo): the second
    # one's picture stays under its labels (the first one's decode painted over it when done)
    browser.execute_script(SLOW_FIRST_BITMAP, 1500)
    browser.find_element(By.CSS_SELECTOR, "#samples button[data-sample='bag']").click()
    time.sleep(0.5)  # the bag's answer is in, its picture held back
    browser.find_element(By.CSS_SELECTOR, "#samples button[data-sample='trouser']").click()
    wait(browser, lambda d: "Classified by" in status_text(d))
    shown = browser.execute_script(PICTURE)
    time.sleep(2.5)  # the bag's picture would be painted by now
    assert browser.execute_script(PICTURE) == shown
    assert browser.find_element(By.CSS_SELECTOR, "#labels li").text == top("trouser")
    # a file that is no image: refused, the trouser's answer leaves the screen
    upload = browser.find_element(By.ID, "file")
    (tmp_path / "notes.txt").write_text("not an image")
    upload.send_keys(str(tmp_path / "notes.txt"))
    wait(browser, lambda d: d.find_element(By.ID, "status").get_attribute("class") == "error")
    assert not browser.find_element(By.ID, "image-result").is_displayed()
    # a TIFF: the service reads it, the browser cannot show it: labels, no picture, said so
    tiff = tmp_path / "bag.tiff"
    Image.open(ROOT / "docs" / "samples" / "bag.png").save(tiff)
    upload.send_keys(str(tiff))
    wait(browser, lambda d: "cannot display" in status_text(d))
    assert len(browser.find_elements(By.CSS_SELECTOR, "#labels li")) == 5
    assert not browser.find_element(By.ID, "picture").is_displayed()
    # the file input takes the keyboard's focus (it was display: none, out of the tab order)
    browser.find_element(By.ID, "image-model").click()
    focused = [browser.switch_to.active_element.get_attribute("id")]
    for _ in range(6):
        ActionChains(browser).send_keys(Keys.TAB).perform()
        focused.append(browser.switch_to.active_element.get_attribute("id"))
    assert "file" in focused, focused
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE" and "favicon" in e["message"]]
    assert not errors, errors
