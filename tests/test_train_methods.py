"""Every registered method trains a step; no gradient reaches a target / stop-gradient branch;
every method's default config resolves and round-trips through YAML; augmentations are seeded
and batched."""

import pytest
import torch

from ssl_eval.backbones.archs import build_arch
from ssl_eval.backbones.base import FEATURE_KINDS
from ssl_eval.train.augment import make_views, step_generator
from ssl_eval.train.losses import negative_cosine
from ssl_eval.train.methods import METHODS
from ssl_eval.train.resolve import default_config, dump_yaml, resolve_config

TARGETS = {
    "byol": ["target_backbone", "target_projector"],
    "mocov3": ["key_backbone", "key_projector"],
    "dino": ["teacher_backbone", "teacher_head"],
}
SMALL = {
    "dino": {"out_dim": 64, "hidden": 32, "bottleneck": 16},
    "barlowtwins": {"proj_hidden": 64, "proj_dim": 64},
    "swav": {"proj_hidden": 32, "proj_dim": 16, "prototypes": 10},
    "mae": {"decoder_dim": 32, "decoder_depth": 1},
}


def _method(name: str):
    cfg = default_config(name)
    spec = METHODS.get(name)
    arch = "vit_micro_p4" if spec.default_arch.startswith("vit") else "cifar_resnet_tiny"
    torch.manual_seed(0)
    overrides = {
        k: v
        for k, v in {"proj_hidden": 32, "pred_hidden": 32, "proj_dim": 16}.items()
        if k in cfg.method_cfg
    }
    extra = {"num_classes": 4} if spec.uses_labels else {}  # the supervised reference
    m = spec.cls(build_arch(arch), spec.make_config({**overrides, **SMALL.get(name, {})}), **extra)
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    views = make_views(x, cfg.aug, step_generator(0, 0, 0), (0.5,) * 3, (0.25,) * 3)
    m.rng = step_generator(0, 0, 0, stream=1)
    return m, views


@pytest.mark.parametrize("name", METHODS.names())
def test_method_step_and_stop_gradient(name):
    m, views = _method(name)
    m.train()
    if METHODS.get(name).uses_labels:
        with pytest.raises(RuntimeError, match="labels"):  # never trains without them
            m(views, 0.1)
        loss = m(views, 0.1, torch.arange(8) % 4)
    else:
        loss = m(views, 0.1)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.backbone.parameters())
    for attr in TARGETS.get(name, []):
        for p in getattr(m, attr).parameters():
            assert not p.requires_grad and p.grad is None, f"{name}.{attr} received a gradient"
    m.before_step(0.1)
    m.after_step(0.1)


@pytest.mark.parametrize("image_size", [32, 224])
@pytest.mark.parametrize("name", METHODS.names())
def test_method_default_config_resolves_and_round_trips(name, image_size, tmp_path):
    spec = METHODS.get(name)
    cfg = resolve_config(name, image_size)
    assert (
        cfg == default_config(name, image_size)
        and cfg.method == name
        and cfg.image_size == image_size
    )
    assert spec.make_config(cfg.method_cfg) == spec.config() and spec.feature_kind in FEATURE_KINDS
    path = tmp_path / "train.yaml"
    path.write_text(dump_yaml(cfg))
    again = resolve_config(name, image_size, config_file=path)
    assert again == cfg and dump_yaml(again) == dump_yaml(cfg)


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
