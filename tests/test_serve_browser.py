"""The page of serve.py in a real browser: headless Chromium (driven by Selenium through the system's chromedriver)
uploads a photo and must show the class inference.py gives, the probability bars and the Grad-CAM overlay.

Run with `make test-browser` (it installs Chromium and Selenium when missing); `make test` leaves it out, since a
fresh machine has no browser. Without a browser it fails: it never passes by skipping.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import inference
from tests.conftest import ROOT
from tests.test_serve import free_port, wait_ready

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM = os.environ.get("SKINCLF_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("SKINCLF_CHROMEDRIVER", "/usr/bin/chromedriver")


@pytest.fixture(scope="module")
def server(tiny_run):
    port = free_port()
    process = subprocess.Popen([sys.executable, "serve.py", "--model_path", str(tiny_run), "--port", str(port),
                                "--abstain", "coverage=0.5", "--threads", "1"], cwd=ROOT, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process)
        yield url
    finally:
        process.terminate()
        process.wait(30)


@pytest.fixture(scope="module")
def browser():
    if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()):
        pytest.fail(f"no browser: {CHROMIUM} or {CHROMEDRIVER} is missing; `make test-browser` installs Chromium")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,1400",
                     "--lang=ko-KR"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_a_clinician_uploads_a_photo_and_sees_class_bars_and_overlay(server, browser, tiny_run, lesion_dataset,
                                                                     tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as seen
    from selenium.webdriver.support.ui import WebDriverWait

    photo = tmp_path / "photo" / "malignant_0000.jpg"
    photo.parent.mkdir()
    shutil.copy(lesion_dataset / "testset" / "malignant" / "malignant_0000.jpg", photo)
    inference.main(inference.parse_args(["--model_path", str(tiny_run), "--inference_folder", str(photo.parent),
                                         "--inference_output", str(tmp_path / "offline"), "--num_workers", "0",
                                         "--abstain", "coverage=0.5"]))
    offline = json.loads((tmp_path / "offline" / "predictions.json").read_text(encoding="utf-8"))[0]

    browser.get(server + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(seen.text_to_be_present_in_element((By.ID, "model"), "클래스"))
    assert "benign, malignant, normal" in browser.find_element(By.ID, "model").text
    browser.find_element(By.ID, "pick").send_keys(str(photo))
    wait.until(seen.text_to_be_present_in_element((By.ID, "status"), "완료"))
    answer = browser.find_element(By.ID, "answer").text
    assert answer.startswith(offline["predicted_label"] + " (")
    assert f"{100 * offline['confidence']:.1f}%" in answer
    decision = browser.find_element(By.ID, "decision").text
    assert ("불확실" in decision) == (offline["decision"] == "uncertain")
    bars = browser.find_elements(By.CSS_SELECTOR, "#bars .bar-row")
    assert sorted(bar.get_attribute("data-cls") for bar in bars) == ["benign", "malignant", "normal"]
    assert bars[0].get_attribute("data-cls") == offline["predicted_label"]  # the longest bar first
    wait.until(lambda driver: driver.execute_script(
        "const img = document.getElementById('overlay'); return img.complete && img.naturalWidth > 0;"))
    overlay = browser.find_element(By.ID, "overlay")
    assert overlay.is_displayed() and overlay.get_attribute("src").startswith("data:image/png;base64,")
    assert not browser.find_element(By.ID, "error").text
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not errors, errors  # no script error, no refused load (the page's CSP allows nothing from elsewhere)
    screenshot = os.environ.get("SKINCLF_SCREENSHOT")
    if screenshot:
        browser.save_screenshot(screenshot)


def test_a_file_that_is_not_a_photo_gets_its_reason_on_the_page(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as seen
    from selenium.webdriver.support.ui import WebDriverWait

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    browser.get(server + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(seen.text_to_be_present_in_element((By.ID, "model"), "클래스"))
    browser.find_element(By.ID, "pick").send_keys(str(broken))
    wait.until(seen.text_to_be_present_in_element((By.ID, "error"), "분류할 수 없습니다"))
    assert browser.find_element(By.ID, "result").get_attribute("hidden") is not None
