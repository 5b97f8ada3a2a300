"""LARS against MAE's util/lars.py update written out in NumPy, and the per-head SGD against
torch.optim.SGD."""

import numpy as np
import torch

from ssl_eval.protocols._lars import LARS, lars_step, sgd_step


def _mae_lars(p, g, mu, lr, wd, momentum=0.9, trust=0.001):
    """facebookresearch/mae util/lars.py, one parameter (float64): returns (p, mu)."""
    d = g
    if p.ndim > 1:
        d = g + wd * p
        pn, dn = np.linalg.norm(p), np.linalg.norm(d)
        q = trust * pn / dn if pn > 0 and dn > 0 else 1.0
        d = d * q
    mu = momentum * mu + d
    return p - lr * mu, mu


def test_lars_optimiser_is_maes_update_over_steps():
    rng = np.random.default_rng(0)
    params = [rng.normal(size=(5, 7)), rng.normal(size=7), np.zeros((3, 4))]  # zero norm: q = 1
    ts = [torch.tensor(p, requires_grad=True) for p in params]
    opt = LARS(ts, lr=0.7, weight_decay=0.05, momentum=0.9, trust_coefficient=0.001)
    ref = [(p.copy(), np.zeros_like(p)) for p in params]
    for _ in range(4):
        grads = [rng.normal(size=p.shape) for p in params]
        for t, g in zip(ts, grads, strict=True):
            t.grad = torch.tensor(g)
        opt.step()
        ref = [_mae_lars(p, g, mu, 0.7, 0.05) for (p, mu), g in zip(ref, grads, strict=True)]
    for t, (p, _) in zip(ts, ref, strict=True):
        np.testing.assert_allclose(t.detach().numpy(), p, rtol=1e-12, atol=1e-15)
    # the 1-D parameter moved by plain momentum SGD without weight decay: no trust scaling
    assert not np.allclose(params[1], ref[1][0])


def test_stacked_heads_each_update_as_if_alone():
    # three heads, each with its own lr and weight decay; norms per head, not over the stack
    rng = np.random.default_rng(1)
    W, b = rng.normal(size=(3, 4, 6)), rng.normal(size=(3, 4))
    lr, wd = np.array([0.1, 1.0, 3.0]), np.array([0.0, 0.01, 0.5])
    tW, tb = torch.tensor(W), torch.tensor(b)
    mW, mb = torch.zeros_like(tW), torch.zeros_like(tb)
    ref = [[(W[h], np.zeros_like(W[h])), (b[h], np.zeros_like(b[h]))] for h in range(3)]
    for _ in range(3):
        gW, gb = rng.normal(size=W.shape), rng.normal(size=b.shape)
        lars_step(tW, torch.tensor(gW), mW, torch.tensor(lr), torch.tensor(wd), heads=True)
        lars_step(tb, torch.tensor(gb), mb, torch.tensor(lr), torch.tensor(wd), heads=True)
        for h in range(3):
            ref[h][0] = _mae_lars(ref[h][0][0], gW[h], ref[h][0][1], lr[h], wd[h])
            ref[h][1] = _mae_lars(ref[h][1][0], gb[h], ref[h][1][1], lr[h], wd[h])
    for h in range(3):
        np.testing.assert_allclose(tW[h].numpy(), ref[h][0][0], rtol=1e-12)
        np.testing.assert_allclose(tb[h].numpy(), ref[h][1][0], rtol=1e-12)


def test_per_head_sgd_is_torch_sgd():
    torch.manual_seed(0)
    W = torch.randn(2, 3, 5, dtype=torch.float64)
    lr, wd = [0.3, 0.05], [0.0, 0.1]
    singles = [W[h].clone().requires_grad_() for h in range(2)]
    opts = [
        torch.optim.SGD([s], lr=lr[h], momentum=0.9, weight_decay=wd[h])
        for h, s in enumerate(singles)
    ]
    mu = torch.zeros_like(W)
    for _ in range(3):
        g = torch.randn_like(W)
        sgd_step(
            W,
            g,
            mu,
            torch.tensor(lr, dtype=W.dtype),
            torch.tensor(wd, dtype=W.dtype),
            0.9,
            heads=True,
        )
        for h in range(2):
            singles[h].grad = g[h].clone()
            opts[h].step()
    for h in range(2):
        torch.testing.assert_close(W[h], singles[h].detach(), rtol=1e-12, atol=1e-14)
