"""Patch tokens as a grid (backbones/tokens.py), against timm's own spatial intermediates."""

import pytest
import timm
import torch

from ssl_eval.backbones.base import Backbone
from ssl_eval.backbones.tokens import grid_shape, patch_grid
from ssl_eval.core.errors import UserError
from ssl_eval.data.transforms import Preprocessing


def _vit(reg: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_small_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=24,
        depth=2,
        num_heads=2,
        reg_tokens=reg,
        dynamic_img_size=True,
        num_classes=0,
    ).eval()


@pytest.mark.parametrize("reg", [0, 4])
@pytest.mark.parametrize("hw", [(32, 32), (24, 40)])
def test_vit_grid_is_timms_spatial_output(reg, hw):
    model = _vit(reg)
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        g = patch_grid(model, x)
        ref = model.forward_intermediates(
            x, indices=1, norm=True, intermediates_only=True, output_fmt="NCHW"
        )[-1]
    assert g.grid == (hw[0] // 8, hw[1] // 8)
    assert torch.allclose(g.tokens, ref.permute(0, 2, 3, 1), atol=1e-6)
    assert g.prefix.shape == (2, 1 + reg, 24)
    assert g.sequence().shape == (2, (hw[0] // 8) * (hw[1] // 8), 24)


def test_cnn_grid_is_the_last_stage_map():
    model = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        g = patch_grid(model, x)
        ref = model.layer4(
            model.layer3(
                model.layer2(model.layer1(model.maxpool(model.act1(model.bn1(model.conv1(x))))))
            )
        )
    assert g.prefix is None
    assert torch.equal(g.tokens, ref.permute(0, 2, 3, 1))


def test_grid_shape_refuses_tokens_that_are_no_grid():
    assert grid_shape(12, 24, 32) == (3, 4)
    with pytest.raises(UserError, match="do not form a grid"):
        grid_shape(7, 32, 32)


def test_backbone_patch_grid_is_eval_mode_float32():
    model = _vit(0)
    model.blocks[0].drop_path = torch.nn.Dropout(0.9)  # active only in training mode
    bb = Backbone("t", model, Preprocessing(resize=32, crop=32), "cls")
    model.train()
    x = torch.randn(2, 3, 32, 32)
    a, b = bb.patch_grid(x), bb.patch_grid(x)
    assert not model.training and a.tokens.dtype == torch.float32
    assert torch.equal(a.tokens, b.tokens)
