"""The SSL losses against hand computations and their defining properties."""

import math

import torch
from torch import nn

from ssl_eval.train import losses
from ssl_eval.train.methods.mae import random_mask
from ssl_eval.train.monitor import diagnostics, is_collapsed, rankme


def test_nt_xent_matches_hand_computation():
    # 2 images x 2 views = 4 embeddings; T = 0.5
    z1 = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    z2 = torch.tensor([[1.0, 1.0], [-1.0, 1.0]])
    t = 0.5
    vecs = [[a / math.hypot(*v) for a in v] for v in ([1, 0], [0, 1], [1, 1], [-1, 1])]
    pos = {0: 2, 1: 3, 2: 0, 3: 1}
    total = 0.0
    for i in range(4):
        sims = {
            j: (vecs[i][0] * vecs[j][0] + vecs[i][1] * vecs[j][1]) / t for j in range(4) if j != i
        }
        total += -math.log(math.exp(sims[pos[i]]) / sum(math.exp(s) for s in sims.values()))
    expected = total / 4
    assert abs(float(losses.nt_xent(z1, z2, t)) - expected) < 1e-5


def test_ema_update_formula():
    online, target = nn.Linear(3, 2), nn.Linear(3, 2)
    before = [p.clone() for p in target.parameters()]
    losses.ema_update(target, online, 0.9)
    for b, o, t in zip(before, online.parameters(), target.parameters(), strict=True):
        assert torch.allclose(t, 0.9 * b + 0.1 * o)


def test_barlow_twins_zero_at_identity_correlation():
    # decorrelated, standardised, identical views: C = I, loss 0
    z = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    assert float(losses.barlow_twins(z, z, 0.005)) < 1e-6
    # correlated dimensions are penalised off the diagonal
    zc = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [1.0, 1.0], [-1.0, -1.0]])
    assert abs(float(losses.barlow_twins(zc, zc, 0.5)) - 0.5 * 2) < 1e-5


def test_sinkhorn_equal_partition():
    g = torch.Generator().manual_seed(0)
    scores = torch.nn.functional.normalize(
        torch.randn(64, 16, generator=g), dim=1
    ) @ torch.nn.functional.normalize(
        torch.randn(16, 8, generator=g), dim=0
    )  # cosine scores, as against L2-normalised prototypes
    q = losses.sinkhorn(scores, eps=0.05, iters=200)
    assert torch.allclose(q.sum(1), torch.ones(64), atol=1e-4)  # each sample: a distribution
    assert torch.allclose(q.sum(0), torch.full((8,), 64 / 8), atol=1e-3)  # each prototype: B/K


def test_dino_centre_moves_by_momentum():
    c = torch.zeros(1, 4)
    out = torch.tensor([[1.0, 2.0, 3.0, 4.0], [3.0, 2.0, 1.0, 0.0]])
    new = losses.update_center(c, out, 0.9)
    assert torch.allclose(new, 0.1 * out.mean(0, keepdim=True))
    assert torch.allclose(
        losses.update_center(new, out, 0.9), 0.9 * new + 0.1 * out.mean(0, keepdim=True)
    )


def test_mae_masks_75_percent_and_ignores_visible_patches():
    g = torch.Generator().manual_seed(0)
    keep, mask, restore = random_mask(5, 64, 0.75, g)
    assert keep.shape == (5, 16) and (mask.sum(1) == 48).all()
    assert (mask.gather(1, keep) == 0).all()  # kept patches are the unmasked ones
    pred, target = torch.randn(5, 64, 12, generator=g), torch.randn(5, 64, 12, generator=g)
    base = losses.mae_loss(pred, target, mask)
    pred2 = pred.clone()
    pred2[mask == 0] += 100.0  # change every visible-patch prediction
    assert torch.equal(losses.mae_loss(pred2, target, mask), base)
    pred3 = pred.clone()
    pred3[mask == 1] += 1.0
    assert not torch.equal(losses.mae_loss(pred3, target, mask), base)


def test_constant_encoder_is_collapsed_and_spread_is_not():
    g = torch.Generator().manual_seed(0)
    const = torch.ones(200, 16) + 1e-6 * torch.randn(200, 16, generator=g)
    d = diagnostics(const, const, const, ratio=0.1)
    assert d["collapsed"] and d["rank"] < 1.5
    spread = torch.randn(200, 16, generator=g)
    d2 = diagnostics(spread, spread, spread + 0.01, ratio=0.1)
    assert not d2["collapsed"] and d2["rank"] > 10 and d2["alignment"] < 1e-3
    assert is_collapsed(0.001, 256, 0.1) and not is_collapsed(1 / 16, 256, 0.1)
    assert rankme(torch.eye(8)) > 7.9
