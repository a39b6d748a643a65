"""A real browser against `streamlit run app.py`: headless Debian Chromium driven by Playwright."""

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

from captioner import Captioner
from tests.conftest import write_images

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-proxy-server"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"{CHROMIUM} not installed (apt-get install chromium)"),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
def app_url(tmp_path, tiny_checkpoint):
    """`streamlit run app.py` on a free port with the tiny checkpoint; its process group is always killed."""
    port = _free_port()
    log = tmp_path / "streamlit.log"
    env = {**os.environ, "CAPTIONER_CHECKPOINT": str(tiny_checkpoint)}
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
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        except ProcessLookupError:
            pass


def test_uploaded_photo_gets_its_caption_in_chromium(app_url, tmp_path, tiny_checkpoint):
    from playwright.sync_api import expect, sync_playwright

    [image] = write_images(tmp_path / "photos", 1, size=(320, 240))
    photo = image.rename(image.with_name("beach_day*1.jpg"))  # markdown characters must show as typed
    expected = Captioner.load(tiny_checkpoint).caption([photo.read_bytes()], n_best=3)[0].text
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
            expect(images).to_have_count(2)  # the photo and its attention overlay
            page.wait_for_function("[...document.querySelectorAll('[data-testid=stImage] img')]"
                                   ".every(img => img.complete && img.naturalWidth > 0)")
            assert page.locator("[data-testid=stException]").count() == 0
            page.screenshot(path=str(shots[0]))
            page.get_by_role("tab", name="LSTM gates").click()
            expect(page.get_by_text("Mean gate activation per word")).to_be_visible()
            expect(page.get_by_text("Memory cells that changed most at word 1")).to_be_visible()
            page.screenshot(path=str(shots[1]))
        finally:
            browser.close()
    assert all(shot.stat().st_size > 10_000 for shot in shots)
