"""Every error a user can cause is one line and a non-zero exit, never a traceback."""

import subprocess
import sys

import numpy as np
import pytest
from conftest import cli_env, image_folder

from ssl_eval.cli import main


def _folder(root, sizes=lambda c, i: (8, 8), n=6):
    return image_folder(root, {"train": n, "val": n}, shape=sizes)


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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("protocol", [["knn", "--set", "ks=[1]"], ["logreg@dinov3"]])
def test_folder_run_gives_no_warning(tmp_path, protocol):
    """No 'numpy array is not writable' (or any other) warning on a folder run: warnings are
    errors in this subprocess (logreg read the cached test features through a view of the
    read-only map)."""
    _folder(tmp_path / "data")
    r = _cli(
        [
            "run",
            "--backbone",
            "pixels",
            "--dataset",
            f"folder:{tmp_path / 'data'}",
            "--protocol",
            *protocol,
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


class _RunsCode:
    def __reduce__(self):
        return (print, ("this would run",))


def test_a_pickle_that_would_run_code_is_refused_as_such(tmp_path):
    import torch

    from ssl_eval.backbones.checkpoints import load_object
    from ssl_eval.core.errors import UserError

    p = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "extra": _RunsCode()}, p)
    with pytest.raises(UserError, match="would import or run code") as e:
        load_object(p)
    assert "corrupt" not in str(e.value) and "\n" not in str(e.value)


def test_other_torch_wordings_of_the_refusal_are_recognised(tmp_path, monkeypatch):
    import pickle

    import torch

    from ssl_eval.backbones.checkpoints import load_object
    from ssl_eval.core.errors import UserError

    p = tmp_path / "w.pth"
    torch.save({"w": torch.zeros(2)}, p)

    def refuse(*a, **k):
        raise pickle.UnpicklingError(
            "Weights only load failed. WeightsUnpickler error: Unsupported class os.system"
        )

    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(UserError, match="would import or run code"):
        load_object(p)


def test_a_truncated_pickle_is_called_corrupt(tmp_path):
    import torch

    from ssl_eval.backbones.checkpoints import load_object
    from ssl_eval.core.errors import UserError

    p = tmp_path / "w.pth"
    torch.save({"w": torch.zeros(1000)}, p)
    p.write_bytes(p.read_bytes()[:300])
    with pytest.raises(UserError, match="corrupt or truncated"):
        load_object(p)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--lr", "-1"], "learning rate must be > 0"),
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--image-size", "0"], "at least 1 pixel"),
        (["--set", "aug.global_views=[{flip_p: 2}]"], "flip_p is a probability"),
        (["--set", "optim.name=lamb"], "'adamw' or 'sgd'"),
    ],
)
def test_invalid_trainer_settings_are_refused(tmp_path, capsys, args, message):
    assert (
        main(
            [
                "train",
                "--method",
                "simclr",
                "--dataset",
                "digits",
                "--out",
                str(tmp_path / "o"),
                *args,
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # refused before any work


@pytest.mark.parametrize(
    "dataset, protocol, listed, not_listed",
    [
        ("shapes-depth", "knnseg@capi", ["shapes-seg", "voc2012-seg", "ade20k"], ["nyu-depth"]),
        ("shapes-seg", "lindepth@dinov3", ["shapes-depth", "nyu-depth"], ["voc2012-seg"]),
    ],
)
def test_dense_protocol_on_another_task_names_datasets_of_its_own_task(
    tmp_path, capsys, monkeypatch, dataset, protocol, listed, not_listed
):
    """A segmentation card on a depth dataset (and the other way round) is refused in one line
    naming the datasets it can score, not those of the other task."""
    from ssl_eval.data import dense

    monkeypatch.setattr(dense, "SHAPES_DENSE_TRAIN", 20)
    monkeypatch.setattr(dense, "SHAPES_DENSE_TEST", 10)
    argv = ["run", "--backbone", "random:cifar_resnet_tiny", "--dataset", dataset,
            "--protocol", protocol, "--no-progress", "--results-dir", str(tmp_path / "r"),
            "--cache-dir", str(tmp_path / "c")]  # fmt: skip
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert all(d in line for d in listed) and not any(d in line for d in not_listed), line


@pytest.mark.slow
def test_lindepth_views_that_cannot_fit_say_how_to_train_without_them(
    tmp_path, capsys, monkeypatch
):
    """shapes-depth's 32 px images are 28x28 after the NYU crop, and a ViT at 32 px takes only
    32x32: no train_crop serves both. Each refusal names the way out (train on the cached crops,
    augment none, train_crop unset), and that way loads."""
    from ssl_eval.data import dense
    from ssl_eval.protocols.cards import load_card

    monkeypatch.setattr(dense, "SHAPES_DENSE_TRAIN", 20)
    monkeypatch.setattr(dense, "SHAPES_DENSE_TEST", 10)
    way_out = "--set augment=none --set 'train_crop=[]'"
    for backbone, crop in (("random:cifar_resnet_tiny", 32), ("random:vit_tiny_patch16_224", 16)):
        argv = ["run", "--backbone", backbone, "--image-size", "32", "--dataset", "shapes-depth",
                "--protocol", "lindepth@dinov3", "--set", "size=0", "--set",
                f"train_crop=[{crop},{crop}]", "--no-progress", "--results-dir",
                str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c")]  # fmt: skip
        assert main(argv) == 2
        err = capsys.readouterr().err
        (line,) = [ln for ln in err.splitlines() if ln.startswith("ssl-eval: error")]
        assert way_out in line and "Traceback" not in err, line
    load_card("lindepth@dinov3", ["augment=none", "train_crop=[]"])


def _nyu(root, n=2, h=48, w=64):
    from PIL import Image

    for listed, scene in (("nyu_train.txt", "kitchen"), ("nyu_test.txt", "bathroom")):
        lines = []
        for i in range(n):
            img, dep = f"{scene}/rgb_{i:05d}.jpg", f"{scene}/sync_depth_{i:05d}.png"
            (root / scene).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((h, w, 3), 40 * i, np.uint8)).save(root / img)
            Image.fromarray(np.full((h, w), 2500, np.uint16)).save(root / dep)
            lines.append(f"/{img} /{dep} 518.8579")
        (root / listed).write_text("\n".join(lines) + "\n")


@pytest.mark.slow
def test_fixed_size_backbones_under_the_dense_cards_say_what_to_set(tmp_path, capsys):
    """A ViT of fixed input size: lindepth's test runs each image whole at its native 48x64,
    which the ViT at 32 px does not take: refused in one line before training (it was a
    traceback after it), naming mode slide; linseg's 512 px crops: the line names
    --image-size 512 (the card's own geometry) beside size=0."""
    _nyu(tmp_path / "nyu")
    common = ["--backbone", "random:vit_tiny_patch16_224", "--image-size", "32",
              "--no-progress", "--results-dir", str(tmp_path / "r"),
              "--cache-dir", str(tmp_path / "c")]  # fmt: skip
    argv = ["run", "--dataset", "nyu-depth", "--data-root", str(tmp_path / "nyu"),
            "--protocol", "lindepth@dinov3", "--set", "size=0", "--set", "augment=none",
            "--set", "train_crop=[]", "--set", "batch_size=2", "--set", "samples=4",
            "--set", "warmup_samples=2", *common]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("ssl-eval: error")]
    assert "48x64" in line and "--set mode=slide" in line and "Traceback" not in err, line
    assert "depth head" not in err  # before any training
    argv = ["run", "--dataset", "shapes-seg", "--protocol", "linseg@dinov3", *common]
    assert main(argv) == 2
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert "--image-size 512" in line and "--set size=0" in line, line
