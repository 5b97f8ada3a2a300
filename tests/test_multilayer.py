"""Features from several layers (feature kind ``layers:N``) and the linear heads that read
column subsets of them: values against a direct pass through timm's blocks, the columns
against DINOv2's ``create_linear_input``, a head trained inside the grid against the same head
trained alone with torch's SGD and CosineAnnealingLR, the cache key, the one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from torch import nn

from ssl_eval.backbones.base import Backbone, WeightsInfo
from ssl_eval.core.errors import UserError
from ssl_eval.data.transforms import Preprocessing
from ssl_eval.features.layers import head_columns, layout
from ssl_eval.protocols._linear_grid import settings_of
from ssl_eval.protocols.linear import LinearParams, train_heads


def _vit(depth: int = 3, reg: int = 1) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224",
        img_size=16,
        patch_size=8,
        embed_dim=16,
        depth=depth,
        num_heads=2,
        reg_tokens=reg,
        num_classes=0,
    ).eval()


def _backbone(model: nn.Module, kind: str) -> Backbone:
    pre = Preprocessing(resize=16, crop=16, mean=(0.5,) * 3, std=(0.5,) * 3)
    return Backbone("test:vit", model, pre, kind, WeightsInfo("random-init", "0"))


def _direct(model: nn.Module, x: torch.Tensor, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(patch tokens, class token) of the last ``n`` blocks, after the final norm, registers
    left out: DINOv2's get_intermediate_layers(x, n, return_class_token=True), walked here
    through timm's own modules one block at a time."""
    h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    outs = []
    for blk in model.blocks:
        h = blk(h)
        outs.append(model.norm(h))
    p = model.num_prefix_tokens
    return [(o[:, p:], o[:, 0]) for o in outs[-n:]]


def _create_linear_input(x_tokens_list, use_n_blocks, use_avgpool):
    """dinov2/eval/linear.py's create_linear_input, restated."""
    inter = x_tokens_list[-use_n_blocks:]
    out = torch.cat([cls for _, cls in inter], dim=-1)
    if use_avgpool:
        out = torch.cat((out, inter[-1][0].mean(dim=1)), dim=-1)
    return out


def test_layers_values_match_a_direct_pass_through_the_blocks():
    model = _vit()
    x = torch.randn(4, 3, 16, 16)
    row = _backbone(model, "layers:2").embed(x)
    with torch.no_grad():
        tokens = _direct(model, x, 2)
    want = torch.cat([t for patches, cls in tokens for t in (cls, patches.mean(1))], 1)
    assert row.shape == (4, 2 * 2 * 16)
    torch.testing.assert_close(row, want, rtol=1e-5, atol=1e-5)
    # every (n, avgpool) head's columns are DINOv2's linear input
    for n in (1, 2):
        for avgpool in (False, True):
            torch.testing.assert_close(
                row[:, head_columns(2, 16, n, avgpool)],
                _create_linear_input(tokens, n, avgpool),
                rtol=1e-5,
                atol=1e-5,
            )


def test_layers_beyond_the_depth_and_models_without_blocks_are_one_line_errors():
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(UserError, match="has 3; ask for at most 3") as e:
        _backbone(_vit(depth=3), "layers:4").embed(x)
    assert "\n" not in str(e.value)
    resnet = timm.create_model("resnet10t", num_classes=0).eval()
    with pytest.raises(UserError, match="no such blocks.*kind model or avgpool$") as e:
        _backbone(resnet, "layers:1").embed(x)
    assert "\n" not in str(e.value)  # a CNN has no class token: cls is not offered
    with pytest.raises(UserError, match="positive block count"):
        _backbone(_vit(), "layers:0")


def test_cache_key_holds_the_layers_and_poolings():
    from types import SimpleNamespace

    from ssl_eval.features.extraction import cache_key

    bundle = SimpleNamespace(name="data", fingerprint="f")  # what the key reads of a bundle
    model = _vit()
    keys = {
        k: cache_key(_backbone(model, k), bundle, "train", "float16")
        for k in ("layers:1", "layers:2", "cls")
    }
    assert keys["layers:2"]["layout"] == {
        "blocks": [-2, -1],
        "poolings": ["cls", "patch_mean"],
        "final_norm": True,
    }
    assert keys["layers:1"]["layout"]["blocks"] == [-1]
    assert "layout" not in keys["cls"]  # the single-layer keys are what they were
    assert layout("last:4") is None
    assert len({str(sorted(k.items())) for k in keys.values()}) == 3


def test_a_head_in_the_grid_is_the_head_trained_alone():
    """Grid head (n=1, avgpool=True) against torch.optim.SGD (momentum 0.9, weight decay 0) +
    CosineAnnealingLR(T_max = iterations) + CrossEntropyLoss on its own columns, batches in the
    same order, the learning rate scaled as dinov2's scale_lr (lr * batch / 256)."""
    rng = np.random.default_rng(0)
    n, dim, C = 90, 3, 4
    x = torch.from_numpy(rng.normal(size=(n, 2 * 2 * dim)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, C, n))
    p = LinearParams(
        lrs=(0.5, 2.0),
        weight_decays=(0.0,),
        batch_size=32,
        lr_batch_ref=256,
        iterations=7,  # two epochs of 3 batches, then one step of a third
        n_last_blocks=(1, 2),
        avgpool=(False, True),
        batchnorm=False,
        min_steps=0,
    )
    grid = train_heads(x, y, C, p, seed=3)
    assert grid.steps == 7 and grid.weight.shape[1] == 8
    h = settings_of(p).index((1, True, 2.0 * 32 / 256, 0.0))
    cols = head_columns(2, dim, 1, True)

    lin = nn.Linear(len(cols), C)
    nn.init.zeros_(lin.weight), nn.init.zeros_(lin.bias)
    opt = torch.optim.SGD(lin.parameters(), lr=2.0 * 32 * 1 / 256.0, momentum=0.9, weight_decay=0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 7, eta_min=0)
    gen, step = torch.Generator().manual_seed(3), 0
    while step < 7:
        order = torch.randperm(n, generator=gen)
        for s in range(0, n, 32):
            if step == 7:
                break
            idx = order[s : s + 32]
            loss = nn.functional.cross_entropy(lin(x[idx][:, cols]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
    # the grid reads the union of the heads' columns; this head's weights on the others are 0
    union = grid.columns.numpy()
    mine = np.isin(union, cols)
    w = grid.weight[:, h]  # (D', C)
    torch.testing.assert_close(
        w[torch.from_numpy(mine)], lin.weight.detach().T, atol=1e-5, rtol=1e-4
    )
    assert torch.count_nonzero(w[torch.from_numpy(~mine)]) == 0
    torch.testing.assert_close(grid.bias[h], lin.bias.detach(), atol=1e-5, rtol=1e-4)


def test_shares_of_the_grid_are_the_whole_grid():
    """What torchrun ranks train (``heads=`` a contiguous share, protocols/linear._train):
    put together in grid order, the heads, their N(0, 0.01) starts and their column masks are
    those one process trains."""
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.normal(size=(70, 2 * 2 * 3)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 3, 70))
    p = LinearParams(
        lrs=(0.1, 1.0, 4.0),
        weight_decays=(0.0,),
        batch_size=16,
        iterations=9,
        n_last_blocks=(1, 2),
        avgpool=(False, True),
        init_std=0.01,
        batchnorm=False,
        min_steps=0,
    )
    whole = train_heads(x, y, 3, p, seed=5)
    parts = [train_heads(x, y, 3, p, seed=5, heads=s) for s in (slice(0, 5), slice(5, 12))]
    torch.testing.assert_close(torch.cat([g.weight for g in parts], 1), whole.weight)
    torch.testing.assert_close(torch.cat([g.bias for g in parts], 0), whole.bias)
    assert [s for g in parts for s in g.settings] == whole.settings
