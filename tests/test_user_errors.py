"""Every error a user can cause is one line and a non-zero exit, never a traceback."""

import subprocess
import sys

import numpy as np
import pytest
from conftest import cli_env
from PIL import Image

from ssl_eval.cli import main


def _folder(root, sizes=lambda c, i: (8, 8), n=6):
    for split in ("train", "val"):
        for c in range(2):
            d = root / split / f"c{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = sizes(c, i)
                Image.fromarray(np.full((h, w, 3), 60 * c + i, dtype=np.uint8)).save(d / f"{i}.png")


def _cli(args, tmp_path):
    return subprocess.run(
        [sys.executable, "-W", "error::UserWarning", "-m", "ssl_eval.cli", *args],
        capture_output=True,
        text=True,
        env=cli_env(tmp_path),
        cwd=tmp_path,
        timeout=600,
    )


def _one_line_error(r):
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("ssl-eval: error")]
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(lines) == 1, r.stderr
    return lines[0]


def test_corrupt_image_in_a_dataloader_worker_is_one_line(tmp_path):
    _folder(tmp_path / "data")
    (tmp_path / "data" / "train" / "c1" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    r = _cli(
        [
            "run",
            "--backbone",
            "pixels",
            "--dataset",
            f"folder:{tmp_path / 'data'}",
            "--protocol",
            "knn",
            "--set",
            "ks=[1]",
            "--num-workers",
            "2",
            "--no-progress",
            "--results-dir",
            str(tmp_path / "r"),
        ],
        tmp_path,
    )
    line = _one_line_error(r)
    assert "cannot read image" in line and "3.png" in line and "Remove or replace" in line


def test_images_of_different_sizes_without_resize_is_one_line(tmp_path):
    _folder(tmp_path / "data", sizes=lambda c, i: (8, 8) if i else (10, 12))
    r = _cli(
        [
            "run",
            "--backbone",
            "pixels",
            "--dataset",
            f"folder:{tmp_path / 'data'}",
            "--protocol",
            "knn",
            "--set",
            "ks=[1]",
            "--no-progress",
            "--results-dir",
            str(tmp_path / "r"),
        ],
        tmp_path,
    )
    assert "--image-size" in _one_line_error(r)


def test_folder_run_gives_no_warning(tmp_path):
    """No 'numpy array is not writable' (or any other) warning on a folder run: warnings are
    errors in this subprocess."""
    _folder(tmp_path / "data")
    r = _cli(
        [
            "run",
            "--backbone",
            "pixels",
            "--dataset",
            f"folder:{tmp_path / 'data'}",
            "--protocol",
            "knn",
            "--set",
            "ks=[1]",
            "--no-progress",
            "--results-dir",
            str(tmp_path / "r"),
        ],
        tmp_path,
    )
    assert r.returncode == 0 and "Warning" not in r.stderr, r.stderr


def test_pixels_under_finetune_is_refused(tmp_path, capsys):
    assert (
        main(
            [
                "run",
                "--backbone",
                "pixels",
                "--dataset",
                "digits",
                "--protocol",
                "finetune",
                "--results-dir",
                str(tmp_path / "r"),
                "--no-progress",
            ]
        )
        == 2
    )
    assert "no trainable parameters" in capsys.readouterr().err


@pytest.mark.parametrize("size", ["0", "-5"])
def test_bad_image_size_is_refused(tmp_path, capsys, size):
    assert (
        main(
            [
                "run",
                "--backbone",
                "pixels",
                "--dataset",
                "digits",
                "--image-size",
                size,
                "--results-dir",
                str(tmp_path / "r"),
                "--no-progress",
            ]
        )
        == 2
    )
    assert "--image-size must be a positive number" in capsys.readouterr().err
