"""ImageNet from its folder layout (class folders, or flat val/ with the devkit's official
labels), the robustness sets as extra test sets scored with ImageNet's own head or bank, and
ImageNet-A/-R restricted to the classes they cover."""

import numpy as np
import pytest
import torch
from transfer_fakes import jpeg

from ssl_eval.core.errors import UserError
from ssl_eval.data.datasets import DatasetOptions, get_dataset
from ssl_eval.protocols.base import ProtocolInputs
from ssl_eval.protocols.knn import KnnParams, run_knn
from ssl_eval.protocols.linear import LinearParams, run_linear
from ssl_eval.protocols.robustness import restricted_hits, run_knn_robust, run_linear_robust

WNIDS = ["n01440764", "n01443537", "n01484850"]


def fake_imagenet(root, flat_val=False):
    for c, w in enumerate(WNIDS):
        for i in range(6):
            jpeg(root / "imagenet" / "train" / w / f"{w}_{i}.JPEG", c, i)
        for i in range(2):
            jpeg(root / "imagenetv2-matched-frequency-format-val" / str(c) / f"v2{i}.jpeg", c, i)
            jpeg(root / "sketch" / w / f"sketch_{i}.JPEG", c, i + 1)
            if c > 0:  # A and R cover two of the three classes
                jpeg(root / "imagenet-a" / w / f"a{i}.jpg", c, i + 2)
                jpeg(root / "imagenet-r" / w / f"r{i}.jpg", c, i + 3)
    if not flat_val:
        for c, w in enumerate(WNIDS):
            for i in range(2):
                jpeg(root / "imagenet" / "val" / w / f"ILSVRC2012_val_{c}{i}.JPEG", c, i)
        return
    from scipy.io import savemat

    # the devkit's IDs are not in wnid order: ID 1 is the third wnid here
    ids = {WNIDS[2]: 1, WNIDS[0]: 2, WNIDS[1]: 3}
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children"]
    synsets = np.array(
        [(ids[w], w, w, w, 0) for w in WNIDS] + [(1001, "n00000001", "entity", "", 3)],
        dtype=[(f, "O") for f in fields],
    )
    devkit = root / "imagenet" / "ILSVRC2012_devkit_t12" / "data"
    devkit.mkdir(parents=True)
    savemat(str(devkit / "meta.mat"), {"synsets": synsets})
    truth = [WNIDS[c] for c in (2, 0, 1, 1, 0, 2)]
    for n, w in enumerate(truth, 1):
        jpeg(root / "imagenet" / "val" / f"ILSVRC2012_val_{n:08d}.JPEG", WNIDS.index(w), n)
    (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text(
        "\n".join(str(ids[w]) for w in truth) + "\n"
    )


def test_folder_layouts_and_official_labels(tmp_path):
    fake_imagenet(tmp_path)
    b = get_dataset("imagenet-robust", DatasetOptions(tmp_path))
    assert b.classes == WNIDS and (len(b.train), len(b.test)) == (18, 6)
    assert set(b.extra_tests) == {"imagenet-v2", "imagenet-a", "imagenet-r", "imagenet-sketch"}
    assert b.extra_tests["imagenet-v2"].labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert b.class_subsets == {"imagenet-a": [1, 2], "imagenet-r": [1, 2]}
    assert get_dataset("imagenet", DatasetOptions(tmp_path)).extra_tests == {}
    (tmp_path / "imagenet-r").rename(tmp_path / "elsewhere")
    with pytest.raises(UserError, match=r"missing imagenet-r/ \(imagenet-r\)"):
        get_dataset("imagenet-robust", DatasetOptions(tmp_path))

    flat = tmp_path / "flat"
    fake_imagenet(flat, flat_val=True)
    b = get_dataset("imagenet", DatasetOptions(flat))
    assert b.test.labels.tolist() == [2, 0, 1, 1, 0, 2]
    (flat / "imagenet" / "ILSVRC2012_devkit_t12" / "data" / "meta.mat").unlink()
    with pytest.raises(UserError, match="meta.mat is missing"):
        get_dataset("imagenet", DatasetOptions(flat))


def test_restricted_hits_against_numpy():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(50, 10))
    subset = [1, 4, 5, 8]
    labels = rng.choice(subset, size=50)
    h = restricted_hits(torch.from_numpy(scores), torch.from_numpy(labels), subset)
    pred = np.array(subset)[scores[:, subset].argmax(1)]
    assert (h[1] == (pred == labels)).all()
    top5 = np.array(subset)[np.argsort(-scores[:, subset], 1)[:, :5]]
    assert (h[5] == (top5 == labels[:, None]).any(1)).all()  # 4 classes: always a hit


def _inputs(extra):
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(4, 6)) * 2
    y = np.repeat(np.arange(4), 15)
    x = (centres[y] + rng.normal(size=(60, 6))).astype(np.float32)
    yt = np.repeat(np.arange(4), 5)
    xt = (centres[yt] + rng.normal(size=(20, 6)) * 1.5).astype(np.float32)
    inp = ProtocolInputs(x, y, xt, yt, np.arange(0, 60, 2) + 1, np.arange(0, 60, 2), 4)
    noisy = (centres[yt] + rng.normal(size=(20, 6)) * 4).astype(np.float32)  # many errors
    inp.extra_tests = {k: (xt if s is None else noisy, yt, s) for k, s in extra.items()}
    return inp


@pytest.mark.slow
def test_same_head_and_bank_as_linear_and_knn():
    """On ImageNet's own validation images the robust protocols give linear's and knn's
    numbers exactly; a test set equal to it scores the same with all classes, and with a
    subset, the arg max over that subset of the same scores."""
    from ssl_eval.protocols.search.knn import knn_classify

    inp = _inputs({"same": None, "sub": [0, 2, 3]})
    p = LinearParams(lrs=(0.01, 0.1), weight_decays=(0.0,), epochs=2, min_steps=20, batch_size=16)
    lin, rob = run_linear(inp, p), run_linear_robust(inp, p)
    assert (lin.per_sample["top1"] == rob.per_sample["top1"]).all()
    assert (rob.per_sample["top1:same"] == rob.per_sample["top1"]).all()
    k = KnnParams(ks=(3, 5), temperature=0.07, backend="torch", select_k="val", memory_mb=64)
    knn, krob = run_knn(inp, k), run_knn_robust(inp, k)
    assert (knn.per_sample["top1"] == krob.per_sample["top1"]).all()
    assert (krob.per_sample["top1:same"] == knn.per_sample["top1"]).all()
    best = knn.details["selected_k"]
    noisy = inp.extra_tests["sub"][0]
    votes = knn_classify(
        inp.train_x, torch.from_numpy(inp.train_y), noisy, [best], 0.07, 4, "torch", 64
    )[best].numpy()
    keep = np.isin(inp.test_y, [0, 2, 3])
    assert krob.details["test_sets"]["sub"] == {"size": 20, "classes": 3}
    pred = np.array([0, 2, 3])[votes[:, [0, 2, 3]].argmax(1)]
    # rows whose label is outside the subset cannot be hit (their position is -1)
    assert (krob.per_sample["top1:sub"][keep] == (pred == inp.test_y)[keep]).all()
    unrestricted = votes.argmax(1) == inp.test_y
    assert (unrestricted[keep] != (pred == inp.test_y)[keep]).any()  # the subset matters here


@pytest.mark.slow
def test_cli_robustness_records(tmp_path, capsys):
    from ssl_eval.cli import main
    from ssl_eval.records.store import load_records

    fake_imagenet(tmp_path / "data")
    rc = main(
        [
            "run",
            "--backbone",
            "pixels",
            "--dataset",
            "imagenet-robust",
            "--protocol",
            "knn@robust",
            "--set",
            "ks=[1,3]",
            "--data-root",
            str(tmp_path / "data"),
            "--results-dir",
            str(tmp_path / "res"),
            "--no-progress",
            "--val-fraction",
            "0.34",
        ]
    )
    assert rc == 0
    recs = {r.metric: r for r in load_records(tmp_path / "res")}
    for m in (
        "top1",
        "top1:imagenet-v2",
        "top1:imagenet-a",
        "top1:imagenet-r",
        "top1:imagenet-sketch",
    ):
        assert recs[m].ci95 is not None and recs[m].ci_method == "bootstrap-test"
    assert len({r.setting["hash"] for r in recs.values()}) == 1  # one setting
    assert recs["top1:imagenet-a"].details["test_sets"]["imagenet-a"] == {"size": 4, "classes": 2}
    # on a dataset without robustness sets: refused before any work, in one line
    args = ["run", "--backbone", "pixels", "--dataset", "imagenet", "--protocol", "knn@robust"]
    assert main([*args, "--data-root", str(tmp_path / "data"), "--no-progress"]) == 2
    assert "has none; use it with --dataset imagenet-robust" in capsys.readouterr().err
