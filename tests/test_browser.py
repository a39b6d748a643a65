"""A real browser against `streamlit run app.py`: headless Debian Chromium driven by Playwright; and
`captioner app` starting a healthy server.

    CAPTIONER_SCREENSHOT=docs/app.png pytest tests/test_browser.py   # also writes the README's screenshot
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from captioner import Captioner

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT_ENV = "CAPTIONER_SCREENSHOT"
SCREENSHOT_MODEL_ENV = "CAPTIONER_SCREENSHOT_CHECKPOINT"  # e.g. the shipped model, for docs/app.png
SCREENSHOT_WIDTH = 1200
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-proxy-server"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"{CHROMIUM} not installed (apt-get install chromium)"),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """Terminate the process group started with start_new_session, within bounded time."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


def _save_screenshot(png: Path, out: Path) -> None:
    """A small, optimised copy of a screenshot: SCREENSHOT_WIDTH wide, 256-colour PNG."""
    image = Image.open(png).convert("RGB")
    pixels = image.load()
    right = image.width - 1
    bottom = image.height - 1  # crop the empty page below the content (the main area's background colour)
    while bottom > 200 and all(pixels[x, bottom] == pixels[right, image.height - 1]
                               for x in range(image.width // 4, right, 7)):
        bottom -= 1
    image = image.crop((0, 0, image.width, min(image.height, bottom + 40)))
    image = image.resize((SCREENSHOT_WIDTH, round(image.height * SCREENSHOT_WIDTH / image.width)),
                         Image.Resampling.LANCZOS)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.quantize(256, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # localhost, never a proxy
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"streamlit exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with opener.open(f"{url}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.25)
    pytest.fail(f"streamlit not healthy after {timeout:.0f} s:\n{log.read_text()}")


@pytest.fixture
def app_checkpoint(tiny_checkpoint) -> Path:
    """The tiny checkpoint, or the one named by $CAPTIONER_SCREENSHOT_CHECKPOINT when rendering docs/app.png."""
    return Path(os.environ.get(SCREENSHOT_MODEL_ENV) or tiny_checkpoint)


def _scene(path: Path, size=(640, 480)) -> Path:
    """A generated picture with some structure: sky, grass, a sun and a red ball (no photo from a data set)."""
    from PIL import ImageDraw

    w, h = size
    image = Image.new("RGB", size, (135, 190, 235))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, int(h * 0.6), w, h), fill=(70, 150, 60))
    draw.ellipse((w - 140, 30, w - 60, 110), fill=(250, 220, 80))
    draw.ellipse((w // 3, int(h * 0.55), w // 3 + 120, int(h * 0.55) + 120), fill=(210, 40, 40))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, "JPEG", quality=90)
    return path


@pytest.fixture
def app_url(tmp_path, app_checkpoint):
    """`streamlit run app.py` on a free port with the tiny checkpoint; its process group is always killed."""
    port = _free_port()
    log = tmp_path / "streamlit.log"
    env = {**os.environ, "CAPTIONER_CHECKPOINT": str(app_checkpoint)}
    cmd = [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.headless", "true",
           "--server.port", str(port), "--server.address", "127.0.0.1", "--server.fileWatcherType", "none",
           "--browser.gatherUsageStats", "false"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, proc, log)
        yield url
    finally:
        _stop(proc)


def test_captioner_app_starts_a_healthy_server(tmp_path, tiny_checkpoint):
    port = _free_port()
    log = tmp_path / "app.log"
    code = ("import argparse, sys; from captioner.cli import app; p = argparse.ArgumentParser(); "
            "app.add_parser(p.add_subparsers()); a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))")
    cmd = [sys.executable, "-c", code, "app", "--checkpoint", str(tiny_checkpoint), "--server.headless", "true",
           "--server.port", str(port), "--server.address", "127.0.0.1", "--server.fileWatcherType", "none"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", proc, log)
    finally:
        _stop(proc)


def test_uploaded_photo_gets_its_caption_in_chromium(app_url, tmp_path, app_checkpoint):
    from playwright.sync_api import expect, sync_playwright

    photo = _scene(tmp_path / "photos" / "beach_day*1.jpg")  # markdown characters must show as typed
    expected = Captioner.load(app_checkpoint).caption([photo.read_bytes()], n_best=3)[0].text
    shots = tmp_path / "app.png", tmp_path / "gates.png"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            # Streamlit scrolls inside its own container, so a tall window stands in for a full-page shot.
            page = browser.new_page(viewport={"width": 1400, "height": 2400})
            page.goto(app_url)
            expect(page.get_by_text("Upload one or more images")).to_be_visible(timeout=30_000)
            page.locator("input[type=file]").set_input_files(str(photo))
            expect(page.get_by_role("heading", name=expected, exact=True)).to_be_visible(timeout=30_000)
            expect(page.get_by_text("1 of 1 images captioned.")).to_be_visible()
            expect(page.get_by_role("heading", name="1. beach_day*1.jpg", exact=True)).to_be_visible()
            images = page.locator("[data-testid=stImage] img")
            expect(images).to_have_count(3, timeout=30_000)  # the photo, its attention overlay, the legend
            page.wait_for_function("[...document.querySelectorAll('[data-testid=stImage] img')]"
                                   ".every(img => img.complete && img.naturalWidth > 0)")
            assert page.locator("[data-testid=stException]").count() == 0
            page.screenshot(path=str(shots[0]))
            page.get_by_role("tab", name="LSTM gates").click()
            expect(page.get_by_text("Reading guide")).to_be_visible()
            expect(page.locator(".vega-embed")).to_have_count(4, timeout=30_000)  # forget, input, output, change
            expect(page.get_by_text("Memory cells that changed most at word 1")).to_be_visible()
            page.screenshot(path=str(shots[1]))
        finally:
            browser.close()
    assert all(shot.stat().st_size > 10_000 for shot in shots)
    if os.environ.get(SCREENSHOT_ENV):
        _save_screenshot(shots[0], Path(os.environ[SCREENSHOT_ENV]))
