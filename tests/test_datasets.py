import numpy as np
import pytest
from PIL import Image

from ssl_eval.core.errors import UserError
from ssl_eval.data.datasets import DatasetOptions, get_dataset
from ssl_eval.data.shapes import generate
from ssl_eval.data.splits import stratified_val_split


def test_shapes_is_deterministic_and_has_all_label_sets():
    a, la = generate(50, 32, seed=5)
    b, lb = generate(50, 32, seed=5)
    c, _ = generate(50, 32, seed=6)
    assert a.shape == (50, 32, 32, 3) and a.dtype == np.uint8
    assert (a == b).all() and not (a == c).all()
    assert set(la) == {"shape", "colour", "size", "position"}
    assert all((la[k] == lb[k]).all() for k in la)


def test_digits_bundle():
    d = get_dataset("digits", DatasetOptions())
    assert len(d.train) + len(d.test) == 1797 and d.num_classes == 10
    assert d.train.load(0).shape == (8, 8, 3)


def test_val_split_is_stratified_seeded_and_disjoint():
    y = np.repeat(np.arange(5), 40)
    tr, va = stratified_val_split(y, 0.1, seed=0)
    tr2, va2 = stratified_val_split(y, 0.1, seed=0)
    assert (va == va2).all() and not set(tr) & set(va) and len(tr) + len(va) == len(y)
    assert (np.bincount(y[va]) == 4).all()


def test_cifar10_missing_files_error_names_them(tmp_path):
    with pytest.raises(UserError, match="cifar-10-batches-py"):
        get_dataset("cifar10", DatasetOptions(data_root=tmp_path))


def test_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 3)):
        for c in ("cat", "dog"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(
                    tmp_path / split / c / f"{i}.png"
                )
    d = get_dataset(f"folder:{tmp_path}", DatasetOptions())
    assert d.classes == ["cat", "dog"] and len(d.train) == 12 and len(d.test) == 6
    assert d.train.load(0).shape == (12, 10, 3)
    assert d.fingerprint["content_sha256"]


def test_image_folder_without_splits(tmp_path):
    (tmp_path / "cat").mkdir()
    with pytest.raises(UserError, match="train/ and val/"):
        get_dataset(f"folder:{tmp_path}", DatasetOptions())
