"""The web console in real headless Chromium (Selenium, Debian's chromium-driver) against
`fracture-node serve` that received a real study over DICOM: log in, dashboard, study page with
the saliency overlay, a dead delivery retried by the operator and refused to the viewer.
Screenshots are kept in the pytest temporary folder (``console-screenshots``)."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from tests.support import free_port, storescp_running, wait_for_port
from tests.support.serve import BIN, ServeProcess, make_study, wait_until

NAMES = ["derived/CR_hip_RG2_uncompressed_explicitVRLE.dcm", "CR_cspine_tiny16x16_explicitVR.dcm",
         "negative_controls/CT_small.dcm"]
ACCESSION = "ACC-E2E-7"
PASSWORDS = {"vera": "viewer-pass-1", "otto": "operator-pass-1"}


@dataclass
class Console:
    serve: ServeProcess
    url: str
    study_uid: str
    down_port: int
    shots: Path

    def api(self, path: str) -> Any:
        answer = httpx.get(self.url + path, auth=("vera", PASSWORDS["vera"]), timeout=30)
        assert answer.status_code == 200, answer.text
        return answer.json()


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory, saliency_model: Path,
            samples_dir: Path) -> Iterator[Console]:
    """A served node with users vera (viewer) and otto (operator) that received one study:
    reported, delivered to ``pacs``, dead at ``down`` (nothing listens there yet)."""
    work = tmp_path_factory.mktemp("console-node")
    http_port, down_port = free_port(), free_port()
    with storescp_running(work / "pacs") as pacs_port:
        serve = ServeProcess(work, [("pacs", "PACS", pacs_port), ("down", "DOWN", down_port)],
                             model=saliency_model, extra=(
                                 f"[http]\nenabled = true\nport = {http_port}\n"
                                 "[delivery]\nfirst_retry_s = 0.2\nmax_retry_s = 0.4\n"
                                 "timeout_s = 3.0\ndeadline_s = 1.0\n"))
        # every image positive (regions drawn), scored by torch (no ONNX export at start)
        serve.config.write_text(serve.config.read_text().replace(
            "max_wait_ms = 50", 'max_wait_ms = 50\noperating_point = "0.01"\nengine = "torch"'))
        for name, role in (("vera", "viewer"), ("otto", "operator")):
            added = subprocess.run([str(BIN), "user", "add", name, "--role", role, "--config",
                                    str(serve.config), "--password-stdin"], cwd=work,
                                   input=PASSWORDS[name] + "\n", capture_output=True, text=True)
            assert added.returncode == 0, added.stderr
        serve.start()
        try:
            wait_for_port(http_port)
            files = make_study(samples_dir, work / "study", NAMES)
            for path in files:
                ds = pydicom.dcmread(path)
                ds.AccessionNumber = ACCESSION
                ds.save_as(path, enforce_file_format=True)
            sent = subprocess.run(["storescu", "-aec", "FRACTURE_NODE", "127.0.0.1",
                                   str(serve.port), *map(str, files)], capture_output=True,
                                  text=True, timeout=120)
            assert sent.returncode == 0, sent.stderr
            site = Console(serve, f"http://127.0.0.1:{http_port}", "", down_port,
                           tmp_path_factory.mktemp("console-screenshots"))
            wait_until(lambda: site.api("/api/dead-letters")["total"] == 1, timeout=180)
            [study] = site.api("/api/studies")["items"]
            site.study_uid = study["study_instance_uid"]
            yield site
        finally:
            if serve.proc and serve.proc.poll() is None:
                serve.stop()


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    """Debian's headless Chromium driven by its chromedriver (no download, no network)."""
    chromium = shutil.which("chromium")
    driver_path = shutil.which("chromedriver")
    assert chromium and driver_path, "chromium and chromium-driver: scripts/setup.sh --test"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1100"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _login(driver: WebDriver, console: Console, name: str) -> None:
    driver.get(console.url + "/")
    WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.ID, "username"))
    driver.find_element(By.ID, "username").send_keys(name)
    driver.find_element(By.ID, "password").send_keys(PASSWORDS[name])
    driver.find_element(By.ID, "login").click()
    WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.ID, "who"))


def _shot(driver: WebDriver, console: Console, name: str) -> Path:
    path = console.shots / f"{name}.png"
    assert driver.save_screenshot(str(path))
    return path


def test_login_shows_the_dashboard(browser: WebDriver, console: Console) -> None:
    """A viewer logs in and sees the study's images received and processed and the dead
    delivery."""
    _login(browser, console, "vera")
    assert browser.find_element(By.ID, "who").text == "vera (viewer)"
    assert int(browser.find_element(By.ID, "received").text) == 3
    assert int(browser.find_element(By.ID, "processed").text) == 2
    assert int(browser.find_element(By.ID, "reported").text) == 1
    assert int(browser.find_element(By.ID, "dead-deliveries").text) == 1
    _shot(browser, console, "dashboard")


def test_wrong_password_stays_on_the_login_page(browser: WebDriver, console: Console) -> None:
    """A wrong password shows the login page again with the reason, and no console."""
    browser.get(console.url + "/login")
    browser.find_element(By.ID, "username").send_keys("vera")
    browser.find_element(By.ID, "password").send_keys("not-her-password")
    browser.find_element(By.ID, "login").click()
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.ID, "error"))
    assert "Wrong user name or password" in browser.find_element(By.ID, "error").text
    assert not browser.find_elements(By.ID, "who")


def test_study_page_shows_probabilities_and_the_overlay(browser: WebDriver,
                                                        console: Console) -> None:
    """From the study list, the study page shows each image's probability, the out-of-scope
    image's reason and the saliency overlay, drawn by the browser."""
    _login(browser, console, "vera")
    browser.get(console.url + "/studies")
    browser.find_element(By.LINK_TEXT, console.study_uid).click()
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.ID, "instances"))
    rows = browser.find_elements(By.CSS_SELECTOR, "#instances tr.instance")
    assert len(rows) == 3
    assert sum("%" in r.find_element(By.CLASS_NAME, "probability").text for r in rows) == 2
    assert any("out_of_scope" in r.text for r in rows)
    overlays = browser.find_elements(By.CSS_SELECTOR, "img.overlay")
    assert len(overlays) == 2
    WebDriverWait(browser, 60).until(lambda d: all(
        d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img)
        for img in overlays))
    sizes = [browser.execute_script("return [arguments[0].naturalWidth, "
                                    "arguments[0].naturalHeight]", i) for i in overlays]
    assert sorted(sizes) == [[16, 16], [632, 768]]  # the tiny C-spine; the 2140 x 1760 hip
    #                                                 shrunk to 768 for the screen
    assert "Doe^Jane" not in browser.page_source and "PID-0001" not in browser.page_source
    assert browser.find_element(By.ID, "accession").text == ACCESSION
    browser.execute_script("arguments[0].scrollIntoView()", overlays[0])
    _shot(browser, console, "study")


def test_viewer_has_no_retry_and_a_forged_retry_is_refused(browser: WebDriver,
                                                           console: Console) -> None:
    """The viewer sees the dead letter without a retry button; a POST made anyway, with the
    session's CSRF token, is refused with 403 and the delivery stays dead."""
    _login(browser, console, "vera")
    browser.get(console.url + "/dead-letters")
    assert len(browser.find_elements(By.CSS_SELECTOR, "tr.dead-letter")) == 1
    assert browser.find_elements(By.CSS_SELECTOR, "button.retry") == []
    [dead] = console.api("/api/dead-letters")["items"]
    status = browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const body = new URLSearchParams({csrf_token:
            document.querySelector('input[name=csrf_token]').value});
        fetch(arguments[0], {method: 'POST', body}).then(r => done(r.status));
    """, f"/dead-letters/{dead['delivery_id']}/retry")
    assert status == 403
    assert console.api("/api/dead-letters")["total"] == 1
    _shot(browser, console, "dead-letters-viewer")


def test_operator_retries_the_dead_delivery(browser: WebDriver, console: Console) -> None:
    """Once the destination is back, the operator's Retry delivers the report there, and
    `audit actions` names the operator."""
    _login(browser, console, "otto")
    browser.get(console.url + "/dead-letters")
    [button] = browser.find_elements(By.CSS_SELECTOR, "button.retry")
    _shot(browser, console, "dead-letters-operator")
    (console.serve.workdir / "down-back").mkdir()
    back = subprocess.Popen(["storescp", "-aet", "DOWN", "-od",
                             str(console.serve.workdir / "down-back"), str(console.down_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(console.down_port)
        button.click()
        WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.ID, "flash"))
        assert "queued again" in browser.find_element(By.ID, "flash").text
        wait_until(lambda: {d["name"]: d for d in console.api("/api/destinations")}["down"]
                   ["deliveries"]["delivered"] == 1, timeout=60)
    finally:
        back.terminate()
        back.wait(10)
    assert console.api("/api/dead-letters")["total"] == 0
    _shot(browser, console, "dead-letters-after-retry")
    audit = subprocess.run([str(BIN), "audit", "actions", "--config", str(console.serve.config),
                            "--json"], cwd=console.serve.workdir, capture_output=True,
                           text=True, check=True)
    [row] = json.loads(audit.stdout)["rows"]
    assert (row["user_name"], row["role"], row["via"], row["action"], row["affected"]) == (
        "otto", "operator", "session", "retry_delivery", 1)
