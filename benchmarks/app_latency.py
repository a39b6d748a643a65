"""Time from uploading one photo to seeing its caption in the Streamlit app on this CPU, model cached.

    .venv/bin/python benchmarks/app_latency.py [--runs 20] [--no-browser]

Three views of the same path, each over `--runs` different 1024x768 JPEG photos (so no cache can answer):
  api      `Captioner.caption` exactly as app.py calls it (n-best 3, attention and gates on)
  apptest  one whole app script run after the upload (AppTest): decoding, overlay, charts, tables
  browser  headless Chromium against `streamlit run app.py`: a fresh page, upload, until the caption is shown
The model is the shipped default (its own encoder) when installed, else a random-weight decoder of the
default size with a 2,500-word vocabulary on the real EfficientNet-Lite0 encoder; a random decoder never ends
a caption early, so every caption runs to the maximum length (the slow case).
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from captioner import Captioner
from captioner.api import default_model_path
from captioner.config import DecodeConfig, ModelConfig
from captioner.models.checkpoint import new_model, save_model
from captioner.models.vocab import Vocabulary

ROOT = Path(__file__).resolve().parents[1]

CHROMIUM = Path("/usr/bin/chromium")
N_BEST = 3  # the app's default
WARMUP = 3


def model_checkpoint(workdir: Path) -> tuple[Path, str]:
    """The shipped model if present, else a random-weight decoder of the default size saved in `workdir`."""
    shipped = default_model_path()
    if shipped.is_file():
        return shipped, f"shipped model ({shipped.name})"
    torch.manual_seed(0)
    vocab = Vocabulary.build([" ".join(f"w{i:04d}" for i in range(2496))], min_count=1)  # + 4 specials
    model = new_model(ModelConfig(), vocab, encoder_dim=1280, decode_cfg=DecodeConfig())
    path = workdir / "random.safetensors"
    save_model(model, path)
    return path, f"random-weight decoder (no shipped model yet), default size, {len(vocab)} words"


def photos(n: int, size=(1024, 768)) -> list[bytes]:
    """n different photo-sized JPEGs: smooth noise with a few shapes."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)
        draw = ImageDraw.Draw(image)
        for _ in range(4):
            x, y = rng.integers(0, size[0] - 200), rng.integers(0, size[1] - 200)
            draw.ellipse((x, y, x + rng.integers(40, 200), y + rng.integers(40, 200)),
                         fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def time_api(cap: Captioner, images: list[bytes]) -> tuple[list[float], list[str]]:
    d = cap.decode_defaults
    times, texts = [], []
    for data in images:
        start = time.perf_counter()
        [result] = cap.caption([data], beam_size=d.beam_size, n_best=N_BEST, max_length=d.max_length,
                               min_length=d.min_length, length_penalty=d.length_penalty,
                               return_attention=True, return_gates=True, on_error="skip")
        times.append(time.perf_counter() - start)
        texts.append(result.text)
    return times, texts


def time_apptest(images: list[bytes], texts: list[str]) -> list[float]:
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120).run()  # loads and caches the model
    times = []
    for i, (data, text) in enumerate(zip(images, texts)):
        at.file_uploader[0].set_value((f"photo{i}.jpg", data, "image/jpeg"))
        start = time.perf_counter()
        at.run()
        times.append(time.perf_counter() - start)
        shown = [m.value for m in at.main.markdown]
        if f"### {text}" not in shown:
            raise RuntimeError(f"caption {text!r} not shown; exceptions: {at.exception}, errors: {at.error}")
    return times


def time_browser(images: list[bytes], texts: list[str], workdir: Path) -> list[float]:
    from playwright.sync_api import expect, sync_playwright

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.headless", "true",
           "--server.port", str(port), "--server.address", "127.0.0.1", "--server.fileWatcherType", "none",
           "--browser.gatherUsageStats", "false"]
    server = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    files = []
    for i, data in enumerate(images):
        files.append(workdir / f"photo{i}.jpg")
        files[-1].write_bytes(data)
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        for _ in range(240):
            try:
                opener.open(f"{url}/_stcore/health", timeout=2).close()
                break
            except OSError:
                time.sleep(0.25)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            times = []
            runs = [(True, files[0], texts[0])] + [(False, f, t) for f, t in zip(files, texts)]
            for warm, path, text in runs:  # the first run warms the browser and the server up
                page.goto(url)  # a fresh session each time; the model stays cached in the server
                expect(page.get_by_text("Upload one or more images")).to_be_visible(timeout=120_000)
                start = time.perf_counter()
                page.locator("input[type=file]").set_input_files(str(path))
                expect(page.get_by_role("heading", name=text, exact=True)).to_be_visible(timeout=120_000)
                if not warm:
                    times.append(time.perf_counter() - start)
            browser.close()
        return times
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=20)


def row(name: str, times: list[float]) -> str:
    ms = sorted(t * 1000 for t in times)
    p90 = ms[min(len(ms) - 1, round(0.9 * (len(ms) - 1)))]
    return f"| {name:<8} | {len(ms):>4} | {statistics.median(ms):>8.0f} | {p90:>8.0f} | {ms[-1]:>8.0f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--no-browser", action="store_true", help="skip the headless Chromium measurement")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        path, what = model_checkpoint(workdir)
        os.environ["CAPTIONER_CHECKPOINT"] = str(path)
        cap = Captioner.load(path)
        generated = photos(WARMUP + args.runs)
        warm, images = generated[:WARMUP], generated[WARMUP:]
        time_api(cap, warm)  # first calls pay for lazy initialisation (allocator, any JIT)
        api, texts = time_api(cap, images)
        results = [("api", api), ("apptest", time_apptest(images, texts))]
        if args.no_browser or not CHROMIUM.is_file():
            note = "browser: skipped" + ("" if args.no_browser else f" ({CHROMIUM} not installed)")
        else:
            results.append(("browser", time_browser(images, texts, workdir)))
            version = subprocess.run([str(CHROMIUM), "--version"], check=True, capture_output=True, text=True)
            note = f"browser: Chromium {version.stdout.split()[1]}"
    d = cap.decode_defaults
    print(f"model: {what}; encoder {cap.encoder.name} (pretrained)")
    print(f"decoding: beam {d.beam_size}, n-best {N_BEST}, max length {d.max_length}; photos 1024x768 JPEG; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; {note}")
    print(f"load average while measuring (other jobs on this machine): {os.getloadavg()[0]:.1f}")
    print(f"mean caption length: {statistics.mean(len(t.split()) for t in texts):.1f} words\n")
    print("| path     | runs |  p50 ms  |  p90 ms  |  max ms  |")
    print("|----------|------|----------|----------|----------|")
    for name, times in results:
        print(row(name, times))


if __name__ == "__main__":
    main()
