"""The web page, in a real Chromium (Debian's, driven by Playwright), against the real service."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from conftest import ROOT, image_bytes, ready_gunicorn

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
    with ready_gunicorn(tmp_path_factory.mktemp("keyed"),
                        {"SVD_MODEL": str(tiny_model_dir), "API_KEY": "page-key"}) as server:
        yield server


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
    for label in ("Motion amount", "Frames per second", "Frames", "Seed", "Format"):
        expect(page.get_by_label(label, exact=True)).to_be_visible()
    advanced = ("Width", "Height", "Fitting the image", "Loop", "Playback rate (fps)", "Segments (longer video)",
                "Frames decoded at once (lower = less GPU memory)")
    for label in advanced:  # under Advanced, closed until opened
        expect(page.get_by_label(label, exact=True)).to_be_hidden()
    page.click("#advanced summary")
    for label in advanced:
        expect(page.get_by_label(label, exact=True)).to_be_visible()
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
    # Function form: a string expression is evaluated with eval() in the page once the first check fails, and the
    # page's CSP (no 'unsafe-eval') refuses it; passing depended on the condition being true at once.
    page.wait_for_function("() => document.querySelector('#result-media video').readyState >= 1")
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


def test_a_missing_image_is_reported_by_the_image_until_one_is_chosen(page, picture):
    page.click("#generate")
    expect(page.locator('[data-error-for="image"]')).to_contain_text("no image")
    page.set_input_files("#image", str(picture))
    expect(page.locator('[data-error-for="image"]')).to_have_text("")  # no stale red line under a good image


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
    for _ in range(3):  # the API link in the header, then the image
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "drop":
            break
    assert page.evaluate("document.activeElement.id") == "drop"
    page.keyboard.press("Enter")
    page.wait_for_function("() => window.pickerOpened === true")
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
    generate, advanced = page.locator("#generate").bounding_box(), page.locator("#advanced").bounding_box()
    assert generate["y"] < advanced["y"]  # Generate comes before Advanced, never behind it
    OUTPUT.mkdir(exist_ok=True)
    page.screenshot(path=str(OUTPUT / "page-phone.png"), full_page=True)
    context.close()


def visible_controls(page) -> int:
    """What a user sees to set before opening Advanced: the image, each field (a slider beside its number counts
    with it), each choice."""
    return page.evaluate("""() => {
        const seen = (e) => e.checkVisibility();
        const fields = [...document.querySelectorAll('#generate-form .field')].filter(seen).length;
        return fields + (seen(document.querySelector('#drop')) ? 1 : 0); }""")


def test_the_first_screen_at_1280_by_800(browser, gunicorn_server):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.goto(gunicorn_server.url + "/")
    expect(page.locator("#app")).to_be_visible()
    assert visible_controls(page) <= 9
    for button in ("#generate", "#copy-curl"):
        box = page.locator(button).bounding_box()
        assert box["y"] + box["height"] <= 800, button  # above the fold
    progress_column = page.locator("#recent-card").bounding_box()
    assert progress_column["x"] > 600  # results and history beside the form, not under it
    # Advanced shows this server's defaults (the tiny model's), not formulas, with the API name in small type.
    page.click("#advanced summary")
    assert page.get_attribute("#param-num_inference_steps", "placeholder") == "8"
    assert page.get_attribute("#param-width", "placeholder") == "256"
    assert page.locator(".api-name", has_text="decode_chunk_size").is_visible()
    assert page.locator("#slider-motion_bucket_id").count() == 1
    page.fill("#param-motion_bucket_id", "200")
    assert page.input_value("#slider-motion_bucket_id") == "200"
    assert page.get_attribute("#api-link", "href") == "openapi.json"  # relative: right under a path prefix too
    for path in ("/favicon.ico", "/" + page.get_attribute('link[rel="icon"]', "href")):
        assert page.request.get(gunicorn_server.url + path).status == 200
    OUTPUT.mkdir(exist_ok=True)
    page.click("#advanced summary")
    page.screenshot(path=str(OUTPUT / "page-1280x800.png"))
    context.close()


def test_while_it_runs_generate_is_disabled_and_time_is_shown(page, picture):
    page.set_input_files("#image", str(picture))
    fill(page, num_frames=14, width=64, height=64, num_inference_steps=100)
    page.keyboard.press("Control+Enter")  # the shortcut generates
    expect(page.locator("#progress-text")).to_contain_text("Denoising", timeout=30_000)
    expect(page.locator("#generate")).to_be_disabled()
    expect(page.locator("#cancel")).to_be_visible()
    expect(page.locator("#progress-time")).to_contain_text("left", timeout=10_000)
    assert "Elapsed" in page.inner_text("#progress-time")
    page.keyboard.press("Escape")  # and Esc cancels
    expect(page.locator("#progress-text")).to_have_text("Canceled", timeout=30_000)
    expect(page.locator("#generate")).to_be_enabled()


def test_copy_as_curl_runs_and_makes_the_same_video(page, picture, tmp_path):
    import subprocess

    page.set_input_files("#image", str(picture))
    fill(page, num_frames=14, width=64, height=64, num_inference_steps=2, seed=4242)
    page.click("#copy-curl")  # before any generation
    command = page.inner_text("#curl-text")
    assert "-F 'seed=4242'" in command and "Authorization" not in command and "image=@input.png" in command
    page.click("#generate")
    expect(page.locator("#result-media video")).to_be_visible(timeout=60_000)
    from_page = page.evaluate("""async () => Array.from(new Uint8Array(await (await fetch(
        document.querySelector('#download').href)).arrayBuffer()))""")
    result = subprocess.run(["bash", "-c", command], cwd=picture.parent, capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (picture.parent / "video.mp4").read_bytes() == bytes(from_page)


def test_history_keeps_a_thumbnail_and_reuses_every_setting(page, picture):
    page.set_input_files("#image", str(picture))
    fill(page, num_frames=14, width=64, height=64, num_inference_steps=2, seed=77, fps=7)
    page.select_option("#param-loop", "pingpong")
    page.click("#generate")
    expect(page.locator("#result-media video")).to_be_visible(timeout=60_000)
    expect(page.locator("#result-input")).to_be_visible()  # before and after, side by side
    page.wait_for_function("() => document.querySelector('#recent li img.thumb').src.startsWith('data:image/jpeg')")
    page.reload()
    expect(page.locator("#recent li")).to_have_count(1)
    assert page.get_attribute("#recent li img.thumb", "src").startswith("data:image/jpeg")
    fill(page, fps=9, seed=1)
    page.select_option("#param-loop", "none")
    page.click("#recent li button.reuse")
    assert (page.input_value("#param-fps"), page.input_value("#param-seed")) == ("7", "77")
    assert page.input_value("#param-loop") == "pingpong" and page.input_value("#param-width") == "64"


def test_use_the_last_frame_as_the_next_input(page, picture):
    page.set_input_files("#image", str(picture))
    fill(page, num_frames=14, width=64, height=64, num_inference_steps=2)
    page.click("#generate")
    expect(page.locator("#result-media video")).to_be_visible(timeout=60_000)
    page.wait_for_function("() => document.querySelector('#result-media video').readyState >= 2")
    page.click("#use-as-input")
    expect(page.locator("#drop-help")).to_contain_text("last-frame.png")
    size = page.evaluate("""() => new Promise((resolve) => { const image = new Image();
        image.onload = () => resolve([image.naturalWidth, image.naturalHeight]);
        image.src = document.querySelector('#preview').src; })""")
    assert size == [64, 64]


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
    page.click("#copy-curl")
    command = page.inner_text("#curl-text")
    assert "Authorization: Bearer YOUR_API_KEY" in command and "page-key" not in command  # never the key
    page.click("#generate")
    expect(page.locator("#result-media img")).to_be_visible(timeout=60_000)
    context.close()


def test_a_wan_server_shows_a_prompt_box_and_no_svd_controls(browser, tmp_path, picture):
    with ready_gunicorn(tmp_path / "wan", {"MODEL": "tiny-wan"}) as server:
        context = browser.new_context(viewport={"width": 1000, "height": 1400})
        try:
            page = context.new_page()
            page.goto(server.url + "/")
            prompt = page.get_by_label("Prompt", exact=True)
            expect(prompt).to_be_visible()  # up front, with the image
            expect(page.get_by_label("Negative prompt", exact=True)).to_be_hidden()  # under Advanced
            expect(page.get_by_label("Motion amount", exact=True)).to_have_count(0)
            page.set_input_files("#image", str(picture))
            prompt.fill("a boat at dusk, slow pan")
            fill(page, seed=5)
            page.click("#generate")
            expect(page.locator("#result-media video")).to_be_visible(timeout=60_000)
            task_id = page.evaluate("() => JSON.parse(localStorage.getItem('video-diffusion.recent'))[0].id")
            status = page.evaluate(f"async () => (await (await fetch('/status/{task_id}')).json())")
            assert status["params"]["prompt"] == "a boat at dusk, slow pan" and status["params"]["num_frames"] == 9
        finally:
            context.close()
