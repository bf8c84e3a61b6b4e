"""The page of `xception serve` at /, in a real headless Chromium (Playwright): an image chosen in its file
input comes back as the same top-5 that POST /predict gives for the same bytes. XCEPTION_SCREENSHOT=PATH
also saves the screenshot there (docs/serve-page.png is made so)."""

import os
import shutil

import pytest

from test_serve import CLASSES, Server, httpx, noise_image, tiny_checkpoint

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def chromium():
    """The system's Chromium (Playwright's own browsers are not installed here), or a skip saying why."""
    pytest.importorskip("playwright.sync_api", reason="the page test needs playwright (pip install playwright)")
    for path in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if path and os.access(path, os.X_OK):
            return path
    pytest.skip("the page test needs Chromium at /usr/bin/chromium or `chromium` on PATH (apt-get install chromium)")


@pytest.fixture(scope="module")
def page_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve-page")
    server = Server(tiny_checkpoint(folder / "tiny.pth.tar"), folder)
    try:
        yield folder, server.wait_ready()
    finally:
        server.stop()


def test_the_page_shows_the_top5_of_predict_for_a_chosen_image(page_server, tmp_path):
    executable = chromium()
    from playwright.sync_api import sync_playwright
    folder, server = page_server
    image = noise_image(tmp_path / "upload.jpg", seed=7, size=(80, 76))
    want = httpx.post(server.url + "/predict", content=open(image, "rb").read(),
                      headers={"Content-Type": "image/jpeg"}, timeout=60).json()["top"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 430})
            page.goto(server.url + "/")
            page.wait_for_function("document.getElementById('meta').textContent.includes('classes')", timeout=60_000)
            page.set_input_files("#file", image)
            page.wait_for_selector("#results .row", timeout=60_000)
            labels = page.locator("#results .row .label").all_inner_texts()
            probs = page.locator("#results .row .prob").all_inner_texts()
            shot = tmp_path / "serve-page.png"
            page.screenshot(path=str(shot))
            assert "5 classes" in page.inner_text("#meta")
        finally:
            browser.close()
    assert labels == [t["class"] for t in want] and len(labels) == 5 and set(labels) == set(CLASSES)
    for shown, t in zip(probs, want):
        assert shown.endswith("%") and abs(float(shown[:-1]) - 100 * t["probability"]) <= 0.006, (probs, want)
    assert shot.stat().st_size > 5000
    if os.environ.get("XCEPTION_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["XCEPTION_SCREENSHOT"])
