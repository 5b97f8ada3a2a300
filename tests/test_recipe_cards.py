"""Recipe cards against the numbers of the official scripts they follow, restated here from
the scripts (not from ssl-eval's output): facebookresearch/dinov2 dinov2/eval/linear.py,
facebookresearch/dinov3 dinov3/eval/linear.py, facebookresearch/dino eval_knn.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ssl_eval.protocols._linear_grid import (
    cosine_lr,
    feature_kind,
    num_heads,
    settings_of,
    total_steps,
)
from ssl_eval.protocols.base import ProtocolInputs
from ssl_eval.protocols.cards import load_card

# dinov2/eval/linear.py get_args_parser defaults; dinov3 _DEFAULT_LR_LIST is the same list
LEARNING_RATES = [1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1]
BATCH_PER_GPU, GPUS = 128, 8  # --batch-size default; run/submit.py --ngpus default (1 node)
EPOCHS, EPOCH_LENGTH = 10, 1250


def _script_heads(n_last_blocks_list, avgpools):
    """setup_linear_classifiers' loops: (n, avgpool, scale_lr(lr, batch_size))."""
    return [
        (n, avgpool, lr * (BATCH_PER_GPU * GPUS) / 256.0, 0.0)
        for n in n_last_blocks_list
        for avgpool in avgpools
        for lr in LEARNING_RATES
    ]


@pytest.mark.parametrize(
    "card, blocks, avgpools, heads",
    [("linear@dinov2", [1, 4], [False, True], 52), ("linear@dinov3", [1], [True], 13)],
)
def test_linear_recipe_grid_and_schedule(card, blocks, avgpools, heads):
    p = load_card(card).params
    assert num_heads(p) == heads == len(_script_heads(blocks, avgpools))
    got = settings_of(p)
    want = _script_heads(blocks, avgpools)
    assert [s[:2] for s in got] == [s[:2] for s in want]  # the script's order: ties go first
    assert [s[2] for s in got] == pytest.approx([s[2] for s in want], rel=1e-12)
    assert feature_kind(p) == f"layers:{max(blocks)}"
    # max_iter = epochs * epoch_length at the script's global batch, whatever the data size
    for n in (1_281_167, 1_000):
        assert total_steps(n, p)[2] == EPOCHS * EPOCH_LENGTH
    assert p.momentum == 0.9 and p.weight_decays == (0.0,) and p.init_std == 0.01
    assert not p.batchnorm and p.report_test_choice
    # the script's rates as a user types them (1e-5: a string to YAML 1.1) are numbers
    assert load_card(card, ["lrs=[1e-5, 2e-5]"]).params.lrs == (1e-5, 2e-5)
    # CosineAnnealingLR(optimizer, max_iter, eta_min=0) stepped after each iteration
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=got[-1][2], momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, EPOCHS * EPOCH_LENGTH, eta_min=0)
    for s in range(0, 2001):
        if s in (0, 1, 1250, 2000):
            assert cosine_lr(got[-1][2], s, EPOCHS * EPOCH_LENGTH) == pytest.approx(
                opt.param_groups[0]["lr"], rel=1e-9
            )
        opt.step()
        sched.step()
    lr0 = 0.1 * 1024 / 256
    s = 6250
    assert cosine_lr(lr0, s, 12500) == pytest.approx(lr0 * (1 + math.cos(math.pi * s / 12500)) / 2)


def _dino_knn(train_f, train_y, test_f, test_y, k, T, C):
    """eval_knn.py knn_classifier, restated in numpy: top-k dot products of L2-normalised
    features, votes exp(sim / T) summed per class, top-1 and top-5 of the votes."""
    tr = train_f / np.linalg.norm(train_f, axis=1, keepdims=True)
    te = test_f / np.linalg.norm(test_f, axis=1, keepdims=True)
    sim = te @ tr.T
    idx = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    d = np.take_along_axis(sim, idx, 1)
    votes = np.zeros((len(te), C))
    for q in range(len(te)):
        np.add.at(votes[q], train_y[idx[q]], np.exp(d[q] / T))
    order = np.argsort(-votes, axis=1, kind="stable")
    return (order[:, 0] == test_y).mean(), (order[:, :5] == test_y[:, None]).any(1).mean()


def test_knn_dino_card_is_the_scripts_classifier():
    card = load_card("knn@dino")
    p = card.params
    assert list(p.ks) == [10, 20, 100, 200] and p.temperature == 0.07  # --nb_knn, --temperature
    rng = np.random.default_rng(0)
    C = 6
    centres = rng.normal(size=(C, 8))
    ytr, yte = rng.integers(0, C, 300), rng.integers(0, C, 80)
    xtr = (centres[ytr] + rng.normal(scale=1.5, size=(300, 8))).astype(np.float32)
    xte = (centres[yte] + rng.normal(scale=1.5, size=(80, 8))).astype(np.float32)
    fixed = load_card("knn@dino", ["select_k=20"]).params  # the paper's k, no choice
    inp = ProtocolInputs(xtr, ytr, xte, yte, np.arange(250), np.arange(250, 300), C)
    out = card.protocol.run(inp, fixed)
    for k in (10, 20, 100, 200):
        t1, t5 = _dino_knn(xtr, ytr, xte, yte, k, 0.07, C)
        assert out.metrics[f"top1@k{k}"] == pytest.approx(t1)
        assert out.metrics[f"top5@k{k}"] == pytest.approx(t5)
    assert out.metrics["top1"] == out.metrics["top1@k20"]
    chosen = card.protocol.run(inp, p)  # the card: k chosen on validation
    assert chosen.details["selected_k"] in p.ks and chosen.details["val_top1"]


@pytest.mark.slow
def test_linear_dinov2_end_to_end_records_the_selected_head(tmp_path, capsys):
    from ssl_eval.cli import main
    from ssl_eval.records.store import load_records

    common = ["--dataset", "digits", "--image-size", "16", "--no-progress"]
    common += ["--results-dir", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c")]
    args = ["run", "--backbone", "random:vit_micro_p4", "--protocol", "linear@dinov2"]
    sets = ["--set", "n_last_blocks=[1,2]", "--set", "iterations=20", "--set", "batch_size=256"]
    assert main(args + sets + common) == 0
    rec = next(r for r in load_records(tmp_path / "r") if r.metric == "top1")
    d = rec.details
    assert len(d["val_top1"]) == 52 and d["steps"] == 20
    sel = d["selected"]
    name = f"blocks={sel['n_last_blocks']},avgpool={sel['avgpool']},lr={sel['lr']:g},wd=0.0"
    assert d["val_top1"][name] == max(d["val_top1"].values())  # chosen on validation
    assert sel["lr"] == pytest.approx(sel["base_lr"] * 256 / 256)
    assert d["features_read"]["feature_kind"] == "layers:2"
    assert d["features_read"]["layout"]["poolings"] == ["cls", "patch_mean"]
    assert "script_choice" in d and rec.ci95 is not None
    assert rec.protocol["params"]["n_last_blocks"] == [1, 2]

    # a layer count beyond the depth (2 blocks): one line, non-zero exit
    deep = ["--set", "n_last_blocks=[1,3]", "--set", "iterations=5"]
    assert main(args + deep + common) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert any("has 2; ask for at most 2" in line for line in err)
    assert "Traceback" not in "\n".join(err)
