"""The report's dense pictures: for the newest record of each (backbone, dataset, segmentation
protocol), a few test images with their ground truth and predicted masks side by side (the
masks the protocol kept in ``details.examples``: thumbnails for display, never what was
scored; the scores are computed at each image's original resolution)."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from .figures import Figure, file_name, mpl_text, plt, to_png


def _decode(b64: str) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
        return np.array(im)


def _colours(mask: np.ndarray) -> np.ndarray:
    """Class ids -> RGB: a fixed palette per id (VOC's bit-interleaving), 255 (ignored) white."""
    ids = np.arange(256)
    rgb = np.zeros((256, 3), np.uint8)
    for bit in range(8):
        for ch in range(3):
            rgb[:, ch] |= (((ids >> (3 * bit + ch)) & 1) << (7 - bit)).astype(np.uint8)
    rgb[255] = 255
    return rgb[mask]


def dense_jobs(results_dir: Path) -> Iterator[tuple[str, Callable[[], Figure]]]:
    from ..records.store import load_records

    newest: dict[tuple, object] = {}
    for r in load_records(results_dir):
        if r.metric == "miou" and r.details.get("examples"):
            key = (r.backbone, r.dataset["name"], r.protocol["name"])
            if key not in newest or str(r.time) > str(newest[key].time):
                newest[key] = r
    for key, r in sorted(newest.items()):
        yield " x ".join(key), lambda r=r, key=key: _examples(r, key)


def _examples(r, key: tuple) -> Figure:
    p = plt()
    ex = r.details["examples"]
    fig, axes = p.subplots(len(ex), 3, figsize=(6.6, 2.2 * len(ex)), squeeze=False)
    for row, e in zip(axes, ex, strict=True):
        pictures = (
            _decode(e["image"]),
            _colours(_decode(e["truth"])),
            _colours(_decode(e["pred"])),
        )
        for ax, pic, title in zip(
            row, pictures, ("image", "ground truth", "prediction"), strict=True
        ):
            ax.imshow(pic, interpolation="nearest")
            ax.set_title(f"{title} (test #{e['row']})" if title == "image" else title, fontsize=8)
            ax.axis("off")
    title = f"{key[0]} on {key[1]}, {key[2]}: mIoU {100 * r.value:.1f}%"
    fig.suptitle(mpl_text(title), fontsize=9)
    return Figure(file_name("dense", *key), title, to_png(fig))
