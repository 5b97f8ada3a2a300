"""knnseg's CAPI rules (facebookresearch/capi @ 98b4fa1, eval_segmentation.py KNNClassifier):
the per-pixel vote (``neighbor_labels.mode(dim=1)``: at each pixel position of a patch the most
common label among its neighbours' pixel labels, ties to the smallest), the patches dropped
(``labels.mode(dim=-1)`` ignored), the L2 distance (``torch.cdist``) beside cosine, the grid
chosen on validation; and the neutral values (share vote, cosine) giving the records made
before them, which the default suite pins."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_dense_probes import _bundle, _inputs, _tiny_vit
from torch import nn

from ssl_eval.backbones.base import Backbone
from ssl_eval.core.errors import UserError
from ssl_eval.data.transforms import Preprocessing
from ssl_eval.protocols import dense_knn
from ssl_eval.protocols.dense.common import TargetBank, train_tokens
from ssl_eval.protocols.dense_knn import KnnsegParams, run_knnseg

ROOT = Path(__file__).resolve().parents[1]
IGNORE = 255


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (conftest)


def capi_mode(labels: list[int]) -> int:
    """CAPI's vote at one pixel position, written out: the label the most neighbours give
    there, the smallest of those tied (torch.mode's rule on the CPU, where CAPI takes it)."""
    counts = {v: labels.count(v) for v in labels}
    top = max(counts.values())
    return min(v for v, c in counts.items() if c == top)


def test_pixel_mode_is_capis_per_pixel_mode_where_the_share_vote_disagrees():
    # three neighbours of one test patch, each with its 4 pixel labels (classes 0..2)
    neigh = [[1, 1, 1, 1], [2, 2, 0, 0], [2, 2, 0, 1]]
    # the share vote: mean class shares (0, 1, 0), (.5, 0, .5), (.25, .25, .5) -> class 1 for
    # the whole patch; the per-pixel mode: 2, 2, 0, 1
    shares = np.mean([np.bincount(n, minlength=3) / 4 for n in neigh], 0)
    assert int(shares.argmax()) == 1
    want = [capi_mode([n[i] for n in neigh]) for i in range(4)]
    assert want == [2, 2, 0, 1]
    got = dense_knn.pixel_mode(torch.tensor([neigh], dtype=torch.uint8))
    assert got.tolist() == [want] and got.dtype == torch.uint8
    # ties to the smallest label; the ignored label votes, and loses a tie to a class
    # each position's labels among 4 neighbours: all tied, 1 and 2 tied, the ignored label
    # tied with 4, the ignored label most common, no tie
    at = [[3, 1, 2, 0], [2, 1, 1, 2], [255, 4, 4, 255], [255, 255, 1, 6], [5, 5, 5, 0]]
    ties = [list(n) for n in zip(*at, strict=True)]  # (neighbour, position)
    want = [capi_mode([n[i] for n in ties]) for i in range(5)]
    assert want == [0, 1, 4, 255, 5]
    assert dense_knn.pixel_mode(torch.tensor([ties], dtype=torch.uint8)).tolist() == [want]


def test_pixel_labels_are_each_patchs_block_row_by_row_and_go_back_in_place():
    """CAPI's ``(bs (ih ph) (iw pw)) -> ((bs ih iw) (ph pw))``: a patch's labels are its block
    of the crop, rows first; the one-hot map puts each predicted block back where it was."""
    t = torch.arange(2 * 8 * 12).reshape(2, 8, 12) % 7
    lab = dense_knn._pixel_labels(t, 2, 3)  # blocks of 4 x 4
    assert lab.shape == (2, 2, 3, 16) and lab.dtype == torch.uint8
    for n, i, j in [(0, 0, 0), (1, 1, 2), (0, 1, 1)]:
        assert (
            lab[n, i, j].tolist() == t[n, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4].flatten().tolist()
        )
    onehot = dense_knn._one_hot_map(lab.reshape(-1, 16), 2, 2, 3, (4, 4), 7)
    assert onehot.shape == (2, 8, 8, 12) and torch.equal(onehot.argmax(1), t)
    ign = dense_knn._one_hot_map(torch.full((1, 4), IGNORE, dtype=torch.uint8), 1, 1, 1, (2, 2), 3)
    assert (ign.argmax(1) == 3).all()  # ignored: the extra channel, no class
    with pytest.raises(UserError, match="whole patches"):
        dense_knn._pixel_labels(torch.zeros(1, 10, 10, dtype=torch.long), 3, 3)


def test_pixel_mode_drops_the_patches_whose_most_common_label_is_ignored():
    """CAPI's ``Classifier.fit``: ``labels.mode(dim=-1)`` in the ignore set is dropped, ties to
    the smallest label (half ignored, half class 1: kept); the share vote drops a patch only
    when no pixel is labelled."""
    t = torch.tensor([[[255, 255, 1, 255], [255, 1, 1, 1]]])  # patches: (255,255,255,1), ...
    t = t.reshape(1, 2, 4)  # one 2 x 4 crop, a 1 x 2 grid of 2 x 2 patches
    _, ok = dense_knn._patch_targets(t, 1, 2, 2, "pixel_mode")
    assert ok.tolist() == [False, True]  # (255, 255, 255, 1): mode 255; (1, 255, 1, 1): 1
    _, ok = dense_knn._patch_targets(t, 1, 2, 2, "share")
    assert ok.tolist() == [True, True]
    tie = torch.tensor([[[255, 1], [1, 255]]])
    assert dense_knn._patch_targets(tie, 1, 1, 2, "pixel_mode")[1].tolist() == [True]


def test_l2_and_cosine_choose_other_neighbours():
    """A query nearer one bank row in angle and another in distance: cosine (1 - the product of
    unit vectors) and L2 (``torch.cdist``) each find their own; on random rows of unequal
    norms the L2 search ranks as ``torch.cdist`` does."""
    bank = torch.tensor([[1.0, 0.0], [10.0, 1.0]])
    q = torch.tensor([[2.0, 0.3]])
    assert dense_knn._search(F.normalize(bank, dim=1), q, 1, "cosine", 64).tolist() == [[1]]
    assert dense_knn._search(bank, q, 1, "L2", 64).tolist() == [[0]]
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(500, 8, generator=g) * torch.rand(500, 1, generator=g) * 5
    q = torch.randn(40, 8, generator=g)
    want = torch.cdist(q, bank).argsort(1)[:, :5]
    assert torch.equal(dense_knn._search(bank, q, 5, "L2", 1), want)
    cos = 1 - F.normalize(q, dim=1) @ F.normalize(bank, dim=1).T
    got = dense_knn._search(F.normalize(bank, dim=1), q, 5, "cosine", 1)
    assert torch.equal(got, cos.argsort(1)[:, :5])
    assert not torch.equal(got, want)


class PatchConv(nn.Module):
    """A random stride-4 convolution: 4 x 4 patches, tokens of unequal norms (L2 and cosine
    rank differently)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 4, stride=4)

    def forward_features(self, x):
        return self.conv(x)


def _conv():
    return Backbone("patch-conv", PatchConv(), Preprocessing(crop=16))


def _miou(pred: np.ndarray, truth: np.ndarray, classes: int) -> float:
    keep = truth != IGNORE
    p, t = pred[keep], truth[keep]
    ious = []
    for c in range(classes):
        union = ((p == c) | (t == c)).sum()
        if union:
            ious.append(((p == c) & (t == c)).sum() / union)
    return float(np.mean(ious))


def test_validation_grid_is_capis_classifier_on_the_validation_crops(tmp_path):
    """Each (k, distance)'s validation mIoU is CAPI's KNNClassifier on the crops, written out
    here: pixel labels per patch, the ignored-mode patches dropped, the k nearest by 1 - cosine
    or ``torch.cdist``, the per-pixel mode; the choice the best of them."""
    bundle = _bundle()
    inp = _inputs(_conv(), bundle, tmp_path)
    p = KnnsegParams(ks=(1, 3, 5), vote="pixel_mode", distances=("cosine", "L2"), examples=0)
    out = run_knnseg(inp, p)

    def tokens_and_labels(rows):
        rows = np.sort(np.asarray(rows))
        src = train_tokens(inp, 16, rows, 64)
        x = torch.cat([tk for _, tk, _ in src.batches(rows, shared=True)]).float()
        t = TargetBank(bundle.dense.train, rows, 16, False, 2**20).get(rows)
        lab = t.reshape(len(rows), 4, 4, 4, 4).permute(0, 1, 3, 2, 4).reshape(-1, 16)
        return x.reshape(-1, x.shape[-1]), lab, t

    xt, yt, _ = tokens_and_labels(inp.train_idx)
    keep = yt.mode(dim=-1).values != IGNORE
    xt, yt = xt[keep], yt[keep]
    xv, _, tv = tokens_and_labels(inp.val_idx)
    assert out.details["bank_patches"] == len(xt)
    dists = {
        "cosine": 1 - F.normalize(xv, dim=1) @ F.normalize(xt, dim=1).T,
        "L2": torch.cdist(xv, xt),
    }
    assert not torch.equal(dists["cosine"].argmin(1), dists["L2"].argmin(1))
    want = {}
    for k in p.ks:
        for d in p.distances:
            idx = torch.topk(dists[d], k, dim=1, largest=False).indices
            pred = yt[idx].mode(dim=1).values  # (Q, k, 16) -> (Q, 16): CAPI's vote
            pred = pred.reshape(-1, 4, 4, 4, 4).permute(0, 1, 3, 2, 4).reshape(tv.shape)
            want[f"k={k},distance={d}"] = _miou(pred.numpy(), tv.numpy(), 2)
    got = out.details["val_miou_at_crop"]
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key
    assert len(set(want.values())) > 2  # the grid's cells differ
    order = [(k, d) for k in p.ks for d in p.distances]
    best = max(order, key=lambda c: (want[f"k={c[0]},distance={c[1]}"], -c[0], -order.index(c)))
    assert (out.details["k"], out.details["distance"]) == best


def test_the_grid_is_chosen_on_validation_never_on_test(tmp_path):
    """Other test images (their targets scrambled): another test mIoU, the same choice and the
    same validation numbers."""
    p = KnnsegParams(ks=(1, 3, 10), vote="pixel_mode", distances=("cosine", "L2"), examples=0)
    a = run_knnseg(_inputs(_conv(), _bundle(), tmp_path / "a"), p)
    other = _bundle()
    test = other.dense.test
    test.targets[:] = test.targets[:, ::-1, :].copy()
    b = run_knnseg(_inputs(_conv(), other, tmp_path / "b"), p)
    assert a.metrics["miou"] != b.metrics["miou"]
    for key in ("k", "distance", "val_miou_at_crop", "bank_patches"):
        assert a.details[key] == b.details[key], key


# knnseg at KnnsegParams() on the toy ViT, recorded at 93df5c5 (before vote and distances)
HEAD_VIT = {
    "metrics": {"miou": 0.6116202346041055, "pixel_acc": 0.9623842592592593},
    "intervals": {
        "miou": [0.4884099552068302, 0.742654018468937],
        "pixel_acc": [0.9531973379629629, 0.9733796296296297],
    },
    "k": 3,
    "val_miou_at_crop": {
        "1": 0.5145669291338583,
        "3": 0.5156919665105153,
        "10": 0.5089055673798588,
        "30": 0.46142578125,
    },
    "bank_patches": 320,
    "per_class_iou": {"grey": 0.961877, "red": 0.261364},
}


def test_the_neutral_values_give_the_records_made_before_them(tmp_path):
    """vote share and distances [cosine] (the defaults): the toy ViT's record at 93df5c5,
    value, interval and details; the params omit them (the setting of the old records)."""
    from ssl_eval.protocols.base import PROTOCOL_TYPES
    from ssl_eval.protocols.cards import ProtocolCard

    p = KnnsegParams(examples=0)
    out = run_knnseg(_inputs(_tiny_vit(), _bundle(), tmp_path), p)
    assert out.metrics == HEAD_VIT["metrics"]
    assert {k: list(v) for k, v in out.intervals.items()} == HEAD_VIT["intervals"]
    for key in ("k", "val_miou_at_crop", "bank_patches", "per_class_iou"):
        assert out.details[key] == HEAD_VIT[key], key
    assert "distance" not in out.details and "grid_edges" not in out.details
    card = ProtocolCard("x", 1, PROTOCOL_TYPES.get("knnseg"), p)
    assert "vote" not in card.params_dict() and "distances" not in card.params_dict()


def test_the_default_suite_pins_the_setting_of_its_references():
    """The default suite resolves knnseg@capi to the setting its reference records hold (the
    card's pixel_mode vote and cosine/L2 grid pinned back to share and cosine)."""
    from ssl_eval.orchestrate.suite.spec import load_job_suite
    from ssl_eval.protocols.cards import load_card, load_cards

    suite = load_job_suite("default")
    names = ["knnseg@capi"] + sorted(
        {c for cs in suite.dataset_protocols.values() for c in cs}
        | {c for cs in suite.arch_protocols.values() for c in cs}
        | set(suite.protocols)
    )
    names = list(dict.fromkeys(names))
    card = load_cards(names, list(suite.set))[0]
    refs = []
    for f in sorted((ROOT / "results/reference/default/records").glob("*.json")):
        for r in json.loads(f.read_text())["records"]:
            if r["protocol"]["name"] == "knnseg@capi":
                refs.append(r["setting"]["summary"]["column"]["protocol"])
    assert refs and all(r == refs[0] for r in refs)
    rec = card.to_record()
    assert {k: rec[k] for k in ("name", "version", "type", "params")} == refs[0]
    shipped = load_card("knnseg@capi").params
    assert (shipped.vote, shipped.distances) == ("pixel_mode", ("cosine", "L2"))


def test_bad_vote_or_distance_is_refused_in_one_line():
    with pytest.raises(UserError, match="share, pixel_mode"):
        KnnsegParams(vote="mode")
    for bad in ((), ("cosine", "cosine"), ("l2",)):
        with pytest.raises(UserError, match="cosine, L2"):
            KnnsegParams(distances=bad)
