"""Every method trains a step; no gradient reaches a target / stop-gradient branch;
augmentations are seeded and batched."""

import pytest
import torch

from ssl_eval.backbones.archs import build_arch
from ssl_eval.train.api import default_config
from ssl_eval.train.augment import make_views, step_generator
from ssl_eval.train.losses import negative_cosine
from ssl_eval.train.methods import METHODS

TARGETS = {"byol": ["target_backbone", "target_projector"], "mocov3": ["key_backbone", "key_projector"],
           "dino": ["teacher_backbone", "teacher_head"]}
SMALL = {"dino": {"out_dim": 64, "hidden": 32, "bottleneck": 16}, "barlowtwins": {"proj_hidden": 64, "proj_dim": 64},
         "swav": {"proj_hidden": 32, "proj_dim": 16, "prototypes": 10}, "mae": {"decoder_dim": 32, "decoder_depth": 1}}


def _method(name: str):
    cfg = default_config(name)
    arch = "vit_micro_p4" if name in ("mae", "dino") else "cifar_resnet_tiny"
    torch.manual_seed(0)
    spec = METHODS.get(name)
    overrides = {k: v for k, v in {"proj_hidden": 32, "pred_hidden": 32, "proj_dim": 16}.items()
                 if k in cfg.method_cfg}
    m = spec.cls(build_arch(arch), spec.make_config({**overrides, **SMALL.get(name, {})}))
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    views = make_views(x, cfg.aug, step_generator(0, 0, 0), (0.5,) * 3, (0.25,) * 3)
    m.rng = step_generator(0, 0, 0, stream=1)
    return m, views


@pytest.mark.parametrize("name", ["simclr", "mocov3", "byol", "simsiam", "barlowtwins", "swav", "mae", "dino"])
def test_method_step_and_stop_gradient(name):
    m, views = _method(name)
    m.train()
    loss = m(views, 0.1)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.backbone.parameters())
    for attr in TARGETS.get(name, []):
        for p in getattr(m, attr).parameters():
            assert not p.requires_grad and p.grad is None, f"{name}.{attr} received a gradient"
    m.before_step(0.1)
    m.after_step(0.1)


def test_simsiam_stop_gradient_branch():
    p = torch.randn(4, 8, requires_grad=True)
    z = torch.randn(4, 8, requires_grad=True)
    negative_cosine(p, z).backward()
    assert p.grad is not None and z.grad is None


def test_views_seeded_batched_and_distinct():
    cfg = default_config("dino")
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    a = make_views(x, cfg.aug, step_generator(1, 2, 3), (0.5,) * 3, (0.25,) * 3)
    b = make_views(x, cfg.aug, step_generator(1, 2, 3), (0.5,) * 3, (0.25,) * 3)
    c = make_views(x, cfg.aug, step_generator(1, 2, 4), (0.5,) * 3, (0.25,) * 3)
    assert [v.shape for v in a] == [(6, 3, 32, 32)] * 2 + [(6, 3, 16, 16)] * cfg.aug.local_views
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[0], a[1])
