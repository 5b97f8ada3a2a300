"""MAE (He et al. 2022): the ViT encoder sees only a random 25% of the patches; a lightweight
transformer decoder fills in mask tokens and reconstructs the pixels; the loss counts the
masked patches only (per-patch normalised pixels by default)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...backbones.archs import is_vit
from ...core.errors import UserError
from ..config import AugConfig, OptimConfig, ViewAug
from ..losses import mae_loss
from .base import MethodSpec, SSLMethod, register


@dataclass
class MAEConfig:
    mask_ratio: float = 0.75
    decoder_dim: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    norm_pix: bool = True


def random_mask(n: int, length: int, ratio: float, gen: torch.Generator | None):
    """Per-sample random masking. Returns (keep indices (n, k), mask (n, L) with 1 = masked,
    restore indices (n, L)); exactly ``length - round(length * (1 - ratio))`` masked."""
    keep = int(round(length * (1 - ratio)))
    noise = torch.rand(n, length, generator=gen)
    shuffle = noise.argsort(dim=1)
    restore = shuffle.argsort(dim=1)
    mask = torch.ones(n, length)
    mask[:, :keep] = 0
    return shuffle[:, :keep], mask.gather(1, restore), restore


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(n, (h // p) * (w // p), p * p * c)


class MAE(SSLMethod):
    def __init__(self, backbone, cfg: MAEConfig):
        super().__init__(backbone, cfg)
        if not is_vit(backbone):
            raise UserError(
                "mae needs a ViT backbone (e.g. --arch vit_tiny_p4 or timm:vit_small_patch16_224)"
            )
        from timm.models.vision_transformer import Block

        self.patch = backbone.patch_embed.patch_size[0]
        length = backbone.patch_embed.num_patches
        self.decoder_embed = nn.Linear(backbone.embed_dim, cfg.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_dim))
        self.decoder_pos = nn.Parameter(torch.randn(1, length + 1, cfg.decoder_dim) * 0.02)
        self.decoder = nn.Sequential(
            *[Block(cfg.decoder_dim, cfg.decoder_heads) for _ in range(cfg.decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(cfg.decoder_dim)
        self.decoder_pred = nn.Linear(cfg.decoder_dim, self.patch * self.patch * 3)
        nn.init.normal_(self.mask_token, std=0.02)

    def encode(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The encoder on the visible patches only (plus the class token)."""
        bb = self.backbone
        t = bb.patch_embed(x)
        if t.ndim == 4:  # dynamic-size ViTs keep NHWC
            t = t.flatten(1, 2)
        t = t + bb.pos_embed[:, bb.num_prefix_tokens :]
        t = t.gather(1, keep.unsqueeze(-1).expand(-1, -1, t.shape[-1]))
        cls = (bb.cls_token + bb.pos_embed[:, :1]).expand(len(t), -1, -1)
        return bb.norm(bb.blocks(torch.cat([cls, t], dim=1)))

    def decode(self, latent: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        y = self.decoder_embed(latent)
        n, length = restore.shape
        masks = self.mask_token.expand(n, length + 1 - y.shape[1], -1)
        seq = torch.cat([y[:, 1:], masks], dim=1).gather(
            1, restore.unsqueeze(-1).expand(-1, -1, y.shape[-1])
        )
        seq = torch.cat([y[:, :1], seq], dim=1) + self.decoder_pos
        return self.decoder_pred(self.decoder_norm(self.decoder(seq)))[:, 1:]

    def forward(self, views: list[torch.Tensor], progress: float) -> torch.Tensor:
        x = views[0]
        target = patchify(x, self.patch)
        keep, mask, restore = random_mask(len(x), target.shape[1], self.cfg.mask_ratio, self.rng)
        keep, mask, restore = keep.to(x.device), mask.to(x.device), restore.to(x.device)
        pred = self.decode(self.encode(x, keep), restore)
        return mae_loss(pred, target, mask, self.cfg.norm_pix)


def _aug(size: int) -> AugConfig:
    """MAE needs little augmentation: crop (scale 0.2-1) and flip, one view."""
    return AugConfig(global_views=[ViewAug(size=size, jitter_p=0.0, gray_p=0.0)])


register(
    MethodSpec(
        "mae",
        MAE,
        MAEConfig,
        "vit_tiny_p4",
        _aug,
        OptimConfig(name="adamw", base_lr=1.5e-4, weight_decay=0.05),
        "MAE: masked patch reconstruction (75%)",
        feature_kind="avgpool",
    )
)
