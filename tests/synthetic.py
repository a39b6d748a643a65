"""A tiny captioning world made on the fly: coloured shapes on plain backgrounds, described by templates."""

from __future__ import annotations

import csv
import itertools
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (240, 220, 40)}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"white": (250, 250, 250), "black": (10, 10, 10)}
TEMPLATES = ("a {c} {s} on a {b} background", "there is a {c} {s} on {b}", "a {b} picture with a {c} {s}")


def draw(colour: str, shape: str, background: str, jitter: int, size: int = 96) -> Image.Image:
    image = Image.new("RGB", (size, size), BACKGROUNDS[background])
    pen = ImageDraw.Draw(image)
    lo, hi = 18 + jitter, size - 18 + jitter
    box = (lo, lo, hi, hi)
    fill = COLOURS[colour]
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    else:
        pen.polygon([(lo, hi), (hi, hi), ((lo + hi) // 2, lo)], fill=fill)
    return image


def make_shapes_dataset(folder: Path, copies: int = 2, seed: int = 0) -> tuple[Path, list[tuple[str, list[str]]]]:
    """Write images and `captions.csv` (image, caption); returns (csv path, [(image name, captions)])."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows, samples = [], []
    for n, (c, s, b) in enumerate(itertools.product(COLOURS, SHAPES, BACKGROUNDS)):
        for k in range(copies):
            name = f"{c}_{s}_{b}_{k}.png"
            draw(c, s, b, rng.randint(-6, 6)).save(folder / name)
            caps = [t.format(c=c, s=s, b=b) for t in TEMPLATES]
            samples.append((name, caps))
            rows += [(name, cap) for cap in caps]
    path = folder / "captions.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "caption"])
        writer.writerows(rows)
    return path, samples
