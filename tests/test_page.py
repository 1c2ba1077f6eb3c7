"""The web page, in a real Chromium (Debian's, driven by Playwright), against the real service."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from conftest import ROOT, Gunicorn, image_bytes

pytestmark = pytest.mark.slow
OUTPUT = ROOT / "test-output"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory, tiny_model_dir):
    server = Gunicorn(tmp_path_factory.mktemp("keyed"), {"SVD_MODEL": str(tiny_model_dir), "API_KEY": "page-key"})
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture
def page(browser, gunicorn_server):
    context = browser.new_context(viewport={"width": 1000, "height": 1400})
    page = context.new_page()
    page.goto(gunicorn_server.url + "/")
    expect(page.locator("#app")).to_be_visible()
    yield page
    context.close()


@pytest.fixture
def picture(tmp_path) -> Path:
    path = tmp_path / "input.png"
    path.write_bytes(image_bytes(size=(320, 200), color=(30, 120, 200)))
    return path


def fill(page, **values):
    for name, value in values.items():
        if not page.locator(f"#param-{name}").is_visible():
            page.click("#advanced summary")
        page.fill(f"#param-{name}", str(value))


def test_generate_watch_progress_play_and_download(page, picture):
    expect(page.locator("#noise-banner")).to_be_visible()
    for name in ("motion_bucket_id", "fps", "num_frames", "seed", "format"):
        expect(page.get_by_label(name.replace("_", " "), exact=True)).to_be_visible()
    advanced = ("width", "height", "sizing", "loop", "output_fps", "segments")
    for name in advanced:  # under Advanced, closed until opened
        expect(page.get_by_label(name.replace("_", " "), exact=True)).to_be_hidden()
    page.click("#advanced summary")
    for name in advanced:
        expect(page.get_by_label(name.replace("_", " "), exact=True)).to_be_visible()
    page.set_input_files("#image", str(picture))
    expect(page.locator("#preview")).to_be_visible()
    fill(page, num_frames=14, width=64, height=64, num_inference_steps=40, seed=99)
    page.click("#generate")

    seen = set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not page.locator("#result-card").is_visible():
        seen.add(round(float(page.locator("#progress").get_attribute("value") or 0)))
        time.sleep(0.05)
    assert len({v for v in seen if 0 < v < 100}) >= 3, seen  # the bar moved through the steps

    video = page.locator("#result-media video")
    expect(video).to_be_visible()
    page.wait_for_function("document.querySelector('#result-media video').readyState >= 1")
    assert page.eval_on_selector("#result-media video", "v => v.duration") > 0
    expect(page.locator("#result-info")).to_contain_text("Seed 99")
    expect(page.locator("#cancel")).to_be_hidden()
    size = page.evaluate("async () => (await (await fetch(document.querySelector('#download').href)).blob()).size")
    header = page.evaluate("""async () => {
        const bytes = new Uint8Array(await (await fetch(document.querySelector('#download').href)).arrayBuffer());
        return String.fromCharCode(...bytes.slice(4, 8)); }""")
    assert size > 1000 and header == "ftyp"  # an MP4
    expect(page.locator("#recent li")).to_have_count(1)
    OUTPUT.mkdir(exist_ok=True)
    page.screenshot(path=str(OUTPUT / "page-finished.png"), full_page=True)

    page.reload()  # recent tasks live in this browser's local storage and reopen with a click
    expect(page.locator("#recent li")).to_contain_text("seed 99")
    page.click("#recent li button")
    expect(page.locator("#result-media video")).to_be_visible()
    expect(page.locator("#result-info")).to_contain_text("Seed 99")


def test_an_out_of_range_value_shows_the_apis_message_by_its_field(page, picture):
    page.set_input_files("#image", str(picture))
    fill(page, fps=99)
    page.click("#generate")
    error = page.locator('[data-error-for="fps"]')
    expect(error).to_have_text("`fps` must be 1 to 30, got '99'")
    expect(page.locator("#param-fps")).to_have_attribute("aria-invalid", "true")


def test_advanced_remembers_its_state_and_opens_on_its_own_errors(page, picture):
    page.click("#advanced summary")
    page.reload()
    expect(page.locator("#param-segments")).to_be_visible()  # still open after a reload
    page.click("#advanced summary")
    page.reload()
    expect(page.locator("#param-segments")).to_be_hidden()
    page.set_input_files("#image", str(picture))
    page.select_option("#param-format", "gif")
    page.evaluate("document.querySelector('#param-output_fps').value = '60'")  # typed while Advanced was open
    page.click("#generate")
    expect(page.locator('[data-error-for="output_fps"]')).to_contain_text("at most 50 with format=gif")
    expect(page.locator("#param-output_fps")).to_be_visible()  # Advanced opened to show it


def test_a_frames_zip_result_offers_its_download(page, picture):
    page.set_input_files("#image", str(picture))
    page.select_option("#param-format", "frames")
    fill(page, num_frames=14, width=64, height=64, num_inference_steps=2)
    page.select_option("#param-loop", "pingpong")
    page.click("#generate")
    expect(page.locator("#result-media")).to_contain_text("A ZIP of 26 PNG frames", timeout=60000)
    assert page.get_attribute("#download", "download").endswith(".zip")


def test_the_dice_button_draws_a_seed(page):
    page.fill("#param-seed", "")
    page.get_by_role("button", name="Random seed").click()
    assert 0 <= int(page.input_value("#param-seed")) < 2**32


def test_a_missing_image_is_reported_by_the_image(page):
    page.click("#generate")
    expect(page.locator('[data-error-for="image"]')).to_contain_text("no image")


def test_cancel(page, picture):
    page.set_input_files("#image", str(picture))
    fill(page, num_frames=14, width=64, height=64, num_inference_steps=100)
    page.click("#generate")
    expect(page.locator("#progress-text")).to_contain_text("Denoising", timeout=30_000)
    page.click("#cancel")
    expect(page.locator("#progress-text")).to_have_text("Canceled", timeout=30_000)
    expect(page.locator("#result-card")).to_be_hidden()


def test_keyboard_can_reach_the_image_picker_and_generate(page):
    page.evaluate("""() => document.querySelector('#image').addEventListener('click', (event) => {
        window.pickerOpened = true; event.preventDefault(); })""")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "drop"
    page.keyboard.press("Enter")
    page.wait_for_function("window.pickerOpened === true")
    for _ in range(30):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "generate":
            break
    assert page.evaluate("document.activeElement.id") == "generate"  # every control on the way is tabbable


def test_readable_on_a_phone(browser, gunicorn_server):
    context = browser.new_context(viewport={"width": 375, "height": 740}, is_mobile=True)
    page = context.new_page()
    page.goto(gunicorn_server.url + "/")
    expect(page.locator("#app")).to_be_visible()
    assert page.evaluate("document.documentElement.scrollWidth") <= 375  # no sideways scrolling
    context.close()


def test_with_an_api_key_the_page_asks_for_it(browser, keyed_server, picture):
    context = browser.new_context()
    page = context.new_page()
    page.goto(keyed_server.url + "/")
    expect(page.locator("#key-form")).to_be_visible()
    page.fill("#api-key", "wrong")
    page.click("#key-form button")
    expect(page.locator("#key-error")).to_have_text("That key was not accepted.")
    page.fill("#api-key", "page-key")
    page.click("#key-form button")
    expect(page.locator("#app")).to_be_visible()
    page.set_input_files("#image", str(picture))
    fill(page, num_frames=14, width=64, height=64, num_inference_steps=2)
    page.select_option("#param-format", "webp")
    page.click("#generate")
    expect(page.locator("#result-media img")).to_be_visible(timeout=60_000)
    context.close()
