"""Fine-tuning: the whole backbone trained with a new linear head.

AdamW; for ViTs, MAE's layer-wise learning-rate decay (its ``param_groups_lrd``: decay 0.65 /
0.75, layer l of L + 1 at decay ** (L + 1 - l), no weight decay on 1-D parameters, tokens and
the position embedding), otherwise a lower learning rate for the encoder; warmup then cosine,
counted in training samples, so the schedule does not depend on the number of devices or the
batch size; label smoothing; as MAE, training crops are random resized crops of the full image
(evaluation: the backbone's resize and centre crop; _images.py); optional mixup / cutmix, drop path,
timm's RandAugment and random erasing; the head reads the backbone's feature kind, or
(``pool=mean_patch_fc_norm``, the finetune@mae cards) MAE's global pool: the mean patch token
before the final norm, which is dropped, through a new LayerNorm ``fc_norm``;
selection and early stopping on the validation split; bf16 autocast on GPU. The test split is
scored after every epoch too, for the official scripts' own number alone (MAE's max_accuracy:
the best epoch's test top-1, ``details.script_choice``); no choice reads it.
The training state is checkpointed atomically after every epoch, and a rerun of the same unit
resumes from it and ends where an uninterrupted run ends: all randomness is drawn from
generators seeded by (seed, epoch, index), never from global state.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..backbones.base import FEATURE_KINDS
from ..backbones.tokens import forward_tokens, num_prefix_tokens
from ..core import distributed
from ..core.errors import UserError
from ..core.files import (
    DamagedFile,
    file_lock,
    lock_path,
    read_torch_checked,
    sha256_json,
    write_torch_checked,
)
from ..core.runtime import warn
from ..features.loading import loader as quiet_loader
from . import _finetune_dist
from ._images import TrainImages, rand_augment, random_erase
from ._images import crop_box as _crop_box  # noqa: F401  (its tests call it here)
from .base import PROTOCOL_TYPES, ImageInputs, ProtocolOutput, ProtocolType, topk_hits

LR_CLOCKS = ("samples", "iterations")

# what the new head reads (the ``pool`` param)
POOLS = {
    "feature_kind": "the backbone's feature kind",
    "mean_patch_fc_norm": "MAE's global pool (models_vit.py, global_pool=True): the mean of the "
    "last block's patch tokens (class and register tokens left out), the final norm dropped, "
    "through a new LayerNorm fc_norm (weight 1, bias 0, the final norm's eps)",
}


@dataclass(frozen=True)
class FinetuneParams:
    # params added with finetune@mae; at these values fine-tuning runs exactly as before them
    # (the quick suite's records are unchanged), so they stay out of its setting (cards.py)
    NEUTRAL: ClassVar[dict] = {
        "min_lr": 0.0,
        "rand_augment": "none",
        "random_erase": 0.0,
        "vit_depth": 0,
        "pool": "feature_kind",
        "lr_clock": "samples",
    }
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3  # peak learning rate of the head (and of the last layer with layer decay)
    encoder_lr_scale: float = 0.1  # encoder lr = lr * this, when layer_decay is off
    layer_decay: float = 0.0  # e.g. 0.65 (ViT-B) / 0.75 (ViT-L) as MAE; 0 = off
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    mixup_alpha: float = 0.0  # 0 = off (MAE fine-tune uses 0.8)
    cutmix_alpha: float = 0.0  # 0 = off (MAE fine-tune uses 1.0)
    drop_path: float = 0.0  # stochastic depth rate on timm blocks that support it
    crop_scale: tuple[float, ...] = (0.8, 1.0)  # random-resized-crop area range, of the full image
    hflip: bool = True
    patience: int = 0  # early stop after this many epochs without a better val top-1; 0 = off
    eval_batch_size: int = 256
    rand_augment: str = "none"  # a timm RandAugment policy (MAE: rand-m9-mstd0.5-inc1) or none
    random_erase: float = 0.0  # probability of timm's pixel-mode random erasing (MAE: 0.25)
    min_lr: float = 0.0  # the cosine schedule's floor, an absolute lr (MAE: 1e-6)
    vit_depth: int = 0  # a recipe for one ViT size: refuse a backbone of another depth; 0 = any
    # what the head reads: the backbone's feature kind, or MAE's global_pool (models_vit.py):
    # the mean patch token before the final norm, through a new LayerNorm fc_norm (POOLS)
    pool: str = "feature_kind"
    # where the schedule stands at a step: samples (training samples seen / rows: the same
    # schedule on any number of devices or batch size) or iterations (MAE's
    # engine_finetune.py: epoch + data_iter_step / len(data_loader), the last partial batch
    # dropped); they differ within an epoch when the batch does not divide the rows
    lr_clock: str = "samples"

    def __post_init__(self):
        if min(self.epochs, self.batch_size, self.eval_batch_size) < 1:
            raise UserError("fine-tune: epochs, batch_size and eval_batch_size must be at least 1")
        if (
            self.lr <= 0
            or self.encoder_lr_scale < 0
            or self.weight_decay < 0
            or self.warmup_epochs < 0
        ):
            raise UserError(
                "fine-tune: lr must be > 0; encoder_lr_scale, weight_decay, warmup_epochs >= 0"
            )
        if not 0 <= self.layer_decay <= 1:
            raise UserError(
                f"fine-tune: layer_decay is in (0, 1] (0 = off), not {self.layer_decay}"
            )
        if not 0 <= self.label_smoothing < 1 or not 0 <= self.drop_path < 1:
            raise UserError("fine-tune: label_smoothing and drop_path are in [0, 1)")
        if self.rand_augment != "none":
            from ..data.transforms import Preprocessing

            rand_augment(self.rand_augment, Preprocessing())  # an unknown policy: UserError
        if self.lr_clock not in LR_CLOCKS:
            raise UserError(
                f"fine-tune: lr_clock is one of {', '.join(LR_CLOCKS)}, not {self.lr_clock!r}"
            )
        if self.pool not in POOLS:
            raise UserError(f"fine-tune: pool is one of {', '.join(POOLS)}, not {self.pool!r}")
        if self.vit_depth < 0:
            raise UserError(f"fine-tune: vit_depth is a block count or 0, not {self.vit_depth}")
        if not 0 <= self.random_erase <= 1 or not 0 <= self.min_lr <= self.lr:
            raise UserError("fine-tune: random_erase is in [0, 1] and min_lr in [0, lr]")
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0 or self.patience < 0:
            raise UserError("fine-tune: mixup_alpha, cutmix_alpha and patience must be >= 0")
        lo_hi = self.crop_scale
        if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1] <= 1:
            raise UserError(
                f"fine-tune: crop_scale is [min, max] with 0 < min <= max <= 1, not {list(lo_hi)}"
            )


# ---------------------------------------------------------------- data


class _TrainImages(TrainImages):
    """``TrainImages`` with the crop, flip and RandAugment of fine-tune params ``p``."""

    def __init__(self, split, indices, pre, p: FinetuneParams, seed: int, augment: bool):
        super().__init__(
            split, indices, pre, seed, augment, p.crop_scale, p.hflip, "torchvision", p.rand_augment
        )
        self.p = p


def _mix(x, y_soft, p: FinetuneParams, rng: np.random.Generator):
    """Mixup or cutmix (one of them per batch when both are on), as timm's ``Mixup`` in batch
    mode, which MAE's main_finetune.py runs (timm 0.3.2; prob 1, switch prob 0.5): its draws in
    its order (the mix probability, the switch, lambda, then the box's centre row and column),
    each image mixed with the batch's reversed order (``x.flip(0)``), the box's sides
    ``int(side * sqrt(1 - lam))`` centred with ``// 2`` either side and clipped, lambda then
    corrected to the box's share."""
    use_mix, use_cut = p.mixup_alpha > 0, p.cutmix_alpha > 0
    if not (use_mix or use_cut):
        return x, y_soft
    rng.random()  # timm's draw against mix_prob (1.0: every batch is mixed)
    cut = use_cut and (not use_mix or rng.random() < 0.5)
    lam = float(rng.beta(*(2 * [p.cutmix_alpha if cut else p.mixup_alpha])))
    if cut:
        H, W = x.shape[-2:]
        rh, rw = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))
        cy, cx = int(rng.integers(0, H)), int(rng.integers(0, W))
        y0, y1 = max(cy - rh // 2, 0), min(cy + rh // 2, H)
        x0, x1 = max(cx - rw // 2, 0), min(cx + rw // 2, W)
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = x.flip(0)[:, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (H * W)
    else:
        x = lam * x + (1 - lam) * x.flip(0)
    return x, lam * y_soft + (1 - lam) * y_soft.flip(0)


# ---------------------------------------------------------------- model and optimiser


class _Classifier(nn.Module):
    """The encoder's features (``read``), through ``fc_norm`` when there is one, into a new
    linear head (trunc_normal std 2e-5, bias 0: main_finetune.py's)."""

    def __init__(
        self,
        backbone_model: nn.Module,
        read,
        dim: int,
        num_classes: int,
        fc_norm: nn.LayerNorm | None = None,
    ):
        super().__init__()
        self.encoder, self.read = backbone_model, read
        self.fc_norm = fc_norm  # None: not a module, so the state dict is the plain one
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def forward(self, x):
        z = self.read(self.encoder, x)
        if self.fc_norm is not None:
            z = self.fc_norm(z)
        return self.head(z.float())


def _mean_patch_token(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The mean of the last block's patch tokens, prefix (class, register) tokens left out:
    models_vit.py's ``x[:, 1:, :].mean(dim=1)`` (its ViTs have one prefix token). The model's
    final norm is an Identity here (``_global_pool``), as MAE deletes it."""
    return forward_tokens(model, x)[:, num_prefix_tokens(model) :].mean(dim=1)


def _has_params(model: nn.Module, name: str) -> bool:
    sub = getattr(model, name, None)
    return isinstance(sub, nn.Module) and any(p.numel() for p in sub.parameters())


def _global_pool(encoder: nn.Module, tag: str) -> nn.LayerNorm:
    """MAE's ``global_pool=True`` on ``encoder`` (a copy): its final norm replaced by an
    Identity (MAE's ``del self.norm``: the checkpoint's norm is neither used nor trained), and
    the new ``fc_norm``, a LayerNorm of the final norm's width and eps (``norm_layer(embed_dim)``
    in models_vit.py), at PyTorch's initialisation (weight 1, bias 0), returned. Refused in one
    line for a model without patch tokens and a final LayerNorm before any pooling."""
    from timm.models.vision_transformer import VisionTransformer

    norm = getattr(encoder, "norm", None)
    why = None
    if not isinstance(encoder, VisionTransformer):
        why = f"is a {type(encoder).__name__}"
    elif not isinstance(norm, nn.LayerNorm):
        why = "has no final LayerNorm (a fine-tuned file?)"
    else:  # a pooling head of its own (timm's avg / map pooling): not a pre-trained encoder
        own = [m for m in ("fc_norm", "attn_pool", "head") if _has_params(encoder, m)]
        why = f"has its own {own[0]}" if own else None
    if why:
        raise UserError(
            f"fine-tune: pool=mean_patch_fc_norm averages the patch tokens of a timm ViT with a "
            f"final LayerNorm; {tag} {why}: use pool=feature_kind"
        )
    encoder.norm = nn.Identity()
    return nn.LayerNorm(norm.normalized_shape, eps=norm.eps)


def _set_drop_path(model: nn.Module, rate: float) -> int:
    """Stochastic depth rising linearly to ``rate`` over the residual blocks. timm blocks keep
    a ``drop_path*`` attribute (Identity or None when built without it); each is replaced by a
    DropPath of its block's rate. Returns the number of blocks changed."""
    from timm.layers import DropPath

    slots = []
    for module in model.modules():
        names = [n for n in ("drop_path", "drop_path1", "drop_path2") if hasattr(module, n)]
        if names and all(
            getattr(module, n) is None or isinstance(getattr(module, n), nn.Identity | DropPath)
            for n in names
        ):
            slots.append((module, names))
    for i, (module, names) in enumerate(slots):
        r = rate * i / max(len(slots) - 1, 1)
        for n in names:
            setattr(module, n, DropPath(r) if r > 0 else nn.Identity())
    return len(slots)


# Layer-wise lr decay as MAE's param_groups_lrd (after BEiT): with L blocks, the stem (patch
# embedding, class / register / distillation tokens, position embedding, pre-norm) is layer 0,
# block i is layer i + 1, and what follows the blocks (final norm, fc_norm, pooling, the new
# head) is layer L + 1; layer l trains at lr * decay ** (L + 1 - l), so the head keeps lr.
_STEM = ("patch_embed.", "norm_pre.")
_TOKENS = ("cls_token", "reg_token", "dist_token", "pos_embed")  # also MAE's no-weight-decay list
_AFTER_BLOCKS = ("norm.", "fc_norm.", "attn_pool.", "head.")


def _vit_layer(name: str, depth: int) -> int | None:
    """MAE's layer id of a timm VisionTransformer parameter; None for a name it cannot place."""
    if name in _TOKENS or name.startswith(_STEM):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    if name.startswith(_AFTER_BLOCKS):
        return depth + 1
    return None


def _no_weight_decay(name: str, t: torch.Tensor) -> bool:
    """Biases, norm scales (every 1-D parameter) and the tokens / position embedding."""
    return t.ndim <= 1 or name.rpartition(".")[2] in _TOKENS


def _param_groups(clf: _Classifier, p: FinetuneParams) -> list[dict]:
    """AdamW groups: (lr_scale, weight_decay) per parameter; the new head is at scale 1."""
    enc = clf.encoder
    named = [(n, t) for n, t in enc.named_parameters() if t.requires_grad]
    if p.layer_decay > 0:
        blocks = getattr(enc, "blocks", None)
        if not isinstance(blocks, nn.Sequential | nn.ModuleList) or not hasattr(enc, "patch_embed"):
            raise UserError(
                "fine-tune: layer_decay needs a ViT with .blocks and .patch_embed; set layer_decay=0"
            )
        depth = len(blocks)
        layers = {n: _vit_layer(n, depth) for n, _ in named}
        unplaced = [n for n, lay in layers.items() if lay is None]
        if unplaced:
            raise UserError(
                f"fine-tune: layer_decay cannot place parameter {unplaced[0]!r}; set layer_decay=0"
            )
        scale = {n: p.layer_decay ** (depth + 1 - lay) for n, lay in layers.items()}
    else:
        scale = {n: p.encoder_lr_scale for n, _ in named}
    named += [("<new head>." + n, t) for n, t in clf.head.named_parameters()]  # layer L + 1
    if clf.fc_norm is not None:  # MAE's fc_norm: layer L + 1 too (not one of the blocks)
        named += [("<new head>.fc_norm." + n, t) for n, t in clf.fc_norm.named_parameters()]
    scale.update({n: 1.0 for n, _ in named if n.startswith("<new head>.")})
    groups: dict[tuple[float, float], list[torch.Tensor]] = {}
    for n, t in named:
        wd = 0.0 if _no_weight_decay(n, t) else p.weight_decay
        groups.setdefault((scale[n], wd), []).append(t)
    return [{"params": ts, "lr_scale": s, "weight_decay": wd} for (s, wd), ts in groups.items()]


def _lr_at_epoch(epoch: float, p: FinetuneParams) -> float:
    """MAE's util/lr_sched.adjust_learning_rate at the fractional ``epoch``: lr x epoch /
    warmup_epochs during the warmup, then min_lr + (lr - min_lr) x a half cosine over the
    remaining epochs."""
    if epoch < p.warmup_epochs:
        return p.lr * epoch / p.warmup_epochs
    cos = 0.5 * (1 + math.cos(math.pi * (epoch - p.warmup_epochs) / (p.epochs - p.warmup_epochs)))
    return p.min_lr + (p.lr - p.min_lr) * cos


def _lr_at(samples: int, total: int, warmup: int, base: float, floor: float = 0.0) -> float:
    """Linear warmup, then a half cosine from ``base`` down to ``floor`` (MAE's lr_sched),
    as a function of training samples seen."""
    if samples < warmup:
        return base * samples / max(warmup, 1)
    cos = 0.5 * (1 + math.cos(math.pi * (samples - warmup) / max(total - warmup, 1)))
    return floor + (base - floor) * cos


# ---------------------------------------------------------------- training


def _evaluate(clf, split, idx, pre, p, device, amp, workers) -> tuple[torch.Tensor, dict]:
    """Per image of ``split`` listed in ``idx``, in that order: whether its label has the
    highest logit (argmax, the first class on a tie: the validation top-1) and its top-1 /
    top-5 hits (``topk_hits``: the test's).

    torchrun: one process's batches of ``eval_batch_size`` are shared out, a contiguous run of
    them per rank (``distributed.shard``); each rank passes only its own through the model and
    the per-image results are gathered in rank order, which is the order of ``idx``. In eval
    mode an image's logits depend on its batch's inputs alone (BatchNorm, SyncBatchNorm too,
    uses its running statistics), and the batches are the very ones one process forms (same
    images, same size), so every kernel sees the same input: the logits are one process's to
    the bit on the same device and kernels (a different thread count could in principle pick
    another kernel), and so are the predictions. Cutting the images themselves into W shares
    would balance better, but would form batches of other sizes and boundaries, which GEMM and
    convolution kernels may block differently: logits equal to float precision only, and a
    near tie could flip a prediction. A set of fewer batches than ranks leaves ranks idle.
    """
    b = p.eval_batch_size
    part = distributed.shard(math.ceil(len(idx) / b))  # this rank's batches
    mine = _TrainImages(split, np.asarray(idx)[part.start * b : part.stop * b], pre, p, 0, False)
    clf.eval()
    scores, labels = [torch.empty(0, clf.head.out_features)], [torch.empty(0, dtype=torch.long)]
    error = None
    try:  # a UserError (an image that does not decode) in one rank's share stops every rank
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            for x, y in quiet_loader(mine, batch_size=b, num_workers=workers):
                scores.append(clf(pre.normalise(x.to(device))).float().cpu())
                labels.append(y)
    except UserError as e:
        error = str(e)
    scores, labels = torch.cat(scores), torch.cat(labels)
    parts = distributed.all_gather((error, scores.argmax(1) == labels, topk_hits(scores, labels)))
    distributed.agree(next((e for e, _, _ in parts if e), None))
    hits = {k: np.concatenate([h[k] for _, _, h in parts]) for k in parts[0][2]}
    return torch.cat([c for _, c, _ in parts]), hits


def _save_state(path: Path | None, state: dict) -> None:
    """The unit's state after an epoch, atomically, behind a length and crc32 header; no
    ``path``: another rank's, which rank 0 writes."""
    if path is None:
        return
    write_torch_checked(path, state)


_STATE_FIELDS = {
    "fingerprint": str,
    "epoch": int,
    "model": dict,
    "optimizer": dict,
    "best": dict,
    "history": list,
}


def _read_state(path: Path, device) -> dict:
    """A saved fine-tune state, verified (checksum, then its shape); ``DamagedFile`` otherwise."""
    st = read_torch_checked(path, device, legacy=True)  # legacy: written before checksums
    if not isinstance(st, dict) or any(
        not isinstance(st.get(k), t) for k, t in _STATE_FIELDS.items()
    ):
        raise DamagedFile("not a fine-tune state of the form ssl-eval writes")
    if not {"val", "epoch", "model"} <= set(st["best"]):
        raise DamagedFile("its best-epoch entry is incomplete")
    return st


def _resume(path: Path, device, fingerprint: str, p: FinetuneParams, clf, opt) -> dict | None:
    """Load this unit's saved state into ``clf`` and ``opt``: the state, or None when there is
    none, it belongs to other settings, or it is damaged (reported in one line and removed; the
    caller then starts from scratch, with a fresh model if this one was partly loaded)."""
    if not path.is_file():
        return None
    try:
        st = _read_state(path, device)
        if st["fingerprint"] != fingerprint:
            return None  # another setting's: overwritten after the first epoch
        if not 0 <= st["epoch"] < p.epochs:
            raise DamagedFile(f"its epoch {st['epoch']} is outside 0..{p.epochs - 1}")
        try:
            clf.load_state_dict(st["model"])
            opt.load_state_dict(st["optimizer"])
        except Exception as e:  # a state dict of another shape
            raise DamagedFile(f"does not fit the model ({type(e).__name__})") from e
    except DamagedFile as e:
        warn(f"fine-tune state {path} is damaged ({e}); discarding it, the unit starts over")
        path.unlink(missing_ok=True)
        raise
    return st


def _after_epoch(epoch: int) -> None:
    """Hook called after each epoch's checkpoint is on disk (tests interrupt here)."""


def run_finetune(inp: ImageInputs, p: FinetuneParams) -> ProtocolOutput:
    """Fine-tune with the unit's state folder locked (a later run removes a folder nobody
    holds once it is empty); the folder is removed when the unit is finished."""
    state_dir = Path(inp.state_dir)
    main = distributed.is_main()  # torchrun: rank 0 alone holds the lock and writes the state
    lock = file_lock(lock_path(state_dir), f"the fine-tune state {state_dir}")
    with lock if main else contextlib.nullcontext():
        out = _run_finetune(inp, p, state_dir / "state.pt")
        with contextlib.suppress(OSError):
            if main:
                state_dir.rmdir()
    return out


def _model(inp: ImageInputs, p: FinetuneParams):
    """The classifier (a copy of the backbone plus a new head) and its optimiser, initialised
    from the unit's seed."""
    bb, device = inp.backbone, inp.device
    blocks = getattr(bb.model, "blocks", None)
    depth = len(blocks) if isinstance(blocks, nn.Sequential | nn.ModuleList) else 0
    if p.vit_depth and depth != p.vit_depth:
        raise UserError(
            f"fine-tune: these settings are a recipe for a ViT of {p.vit_depth} blocks, but "
            f"{bb.tag} has {depth or 'no'} blocks; use its size's card or --set vit_depth=0"
        )
    torch.manual_seed(inp.seed)
    encoder = copy.deepcopy(bb.model).to(device)  # the shared backbone stays untouched
    if p.pool == "mean_patch_fc_norm":
        fc_norm = _global_pool(encoder, bb.tag)
        read, dim = _mean_patch_token, fc_norm.normalized_shape[0]
    else:
        fc_norm, read, dim = None, FEATURE_KINDS.get(bb.feature_kind), bb.embed_dim()
    if p.drop_path > 0 and _set_drop_path(encoder, p.drop_path) == 0:
        raise UserError(f"fine-tune: {bb.tag} has no drop-path layers; set drop_path=0")
    clf = _Classifier(encoder, read, dim, inp.bundle.num_classes, fc_norm).to(device)
    return clf, torch.optim.AdamW(_param_groups(clf, p), lr=p.lr)


def _run_finetune(inp: ImageInputs, p: FinetuneParams, state_path: Path) -> ProtocolOutput:
    bb, bundle, device = inp.backbone, inp.bundle, inp.device
    amp = device.type == "cuda"
    clf, opt = _model(inp, p)

    pre = bb.preprocessing
    train_ds = _TrainImages(bundle.train, inp.train_idx, pre, p, inp.seed, augment=True)
    workers = 0 if inp.num_workers is None else inp.num_workers
    n = len(train_ds)
    total, warmup = p.epochs * n, int(p.warmup_epochs * n)

    fingerprint = sha256_json(
        {
            "params": asdict(p),
            "seed": inp.seed,
            "n": n,
            "backbone": bb.weights.sha256,
            "state": "test top-1 per epoch",  # a state written before it kept them is not read
        }
    )
    start, best = 0, {"val": -1.0, "epoch": -1, "model": None}
    history: list[dict] = []
    tests: list[float] = []  # every epoch's test top-1: the scripts' rule, recorded apart

    def resume():
        try:
            return _resume(state_path, device, fingerprint, p, clf, opt), clf, opt
        except DamagedFile:  # the failed load may have written into the first model
            return None, *_model(inp, p)

    _finetune_dist.check(p, clf, device)
    st, clf, opt = _finetune_dist.share_resume(resume, clf, opt)  # torchrun: rank 0 reads it
    model = _finetune_dist.wrap(clf, device)  # DDP across a torchrun world, else clf
    global_rows = min(p.batch_size, n)  # every batch's size across the ranks
    if st is not None:
        start, best, history, tests = st["epoch"] + 1, st["best"], st["history"], st["tests"]
        print(f"[resume] fine-tune from epoch {start} of {p.epochs} ({state_path})", flush=True)

    stale = 0 if not history else history[-1].get("stale", 0)
    for epoch in range(start, p.epochs):
        if p.patience and stale >= p.patience:
            break
        clf.train()
        torch.manual_seed(inp.seed * 1000 + epoch)  # drop path / dropout: reproducible on resume
        train_ds.epoch = epoch
        g = torch.Generator().manual_seed(inp.seed * 1000 + epoch)
        loader = DataLoader(
            train_ds,
            num_workers=workers,
            **_finetune_dist.loader_args(train_ds, p.batch_size, n > p.batch_size, g),
        )
        rng = np.random.default_rng([inp.seed, epoch, 1])
        seen, loss_sum, steps = epoch * n, 0.0, 0
        for x, y in loader:
            if p.lr_clock == "iterations":
                lr = _lr_at_epoch(epoch + steps / len(loader), p)
            else:
                lr = _lr_at(seen, total, warmup, p.lr, p.min_lr)
            for g in opt.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)
            x = pre.normalise(x.to(device))
            target = F.one_hot(y.to(device), bundle.num_classes).float()
            target = target * (1 - p.label_smoothing) + p.label_smoothing / bundle.num_classes
            random_erase(x, p.random_erase, rng)  # per image, before mixing, as in timm's loader
            x, target = _mix(x, target, p, rng)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(x)
            per_sample = torch.sum(-target * F.log_softmax(logits.float(), dim=1), dim=1)
            loss, loss_value = _finetune_dist.batch_loss(per_sample, global_rows)
            if not math.isfinite(loss_value):
                raise UserError(
                    f"fine-tune diverged (loss {loss_value}) at epoch {epoch}; lower lr"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += global_rows if distributed.world() > 1 else len(x)
            loss_sum += loss_value
            steps += 1
        correct, _ = _evaluate(clf, bundle.train, inp.val_idx, pre, p, device, amp, workers)
        val = float(correct.float().mean())
        if val > best["val"]:
            best = {
                "val": val,
                "epoch": epoch,
                "model": {k: v.detach().cpu().clone() for k, v in clf.state_dict().items()},
            }
            stale = 0
        else:
            stale += 1
        history.append(
            {"epoch": epoch, "loss": loss_sum / max(steps, 1), "val_top1": val, "stale": stale}
        )
        # MAE's main_finetune.py evaluates on its test set (ImageNet val) after every epoch and
        # reports the best (max_accuracy): kept for details.script_choice, never chosen from
        _, test_hits = _evaluate(
            clf, bundle.test, np.arange(len(bundle.test)), pre, p, device, amp, workers
        )
        tests.append(float(test_hits[1].mean()))
        _save_state(
            state_path if distributed.is_main() else None,
            {
                "fingerprint": fingerprint,
                "epoch": epoch,
                "model": clf.state_dict(),
                "optimizer": opt.state_dict(),
                "best": best,
                "history": history,
                "tests": tests,
            },
        )
        _after_epoch(epoch)

    clf.load_state_dict(best["model"])
    _, hits = _evaluate(clf, bundle.test, np.arange(len(bundle.test)), pre, p, device, amp, workers)
    distributed.barrier()  # every rank is done with the state
    if distributed.is_main():
        state_path.unlink(missing_ok=True)  # the unit is finished; its result is deterministic
    return ProtocolOutput(
        {"top1": float(hits[1].mean()), "top5": float(hits[5].mean())},
        {
            "best_epoch": best["epoch"],
            "best_val_top1": best["val"],
            "history": history,
            "epochs_run": len(history),
            "train_size": n,
            "val_size": len(inp.val_idx),
            **({} if p.pool == "feature_kind" else {"head_reads": POOLS[p.pool]}),
            "script_choice": {
                "rule": "the best epoch's test top-1 (MAE's main_finetune.py: max_accuracy over "
                "the epochs on its test set); chosen on test, so optimistic: not the reported "
                "number (its epoch is chosen on validation)",
                "selected": {"epoch": int(np.argmax(tests))},
                "top1": max(tests),
            },
        },
        per_sample={"top1": hits[1], "top5": hits[5]},
    )


PROTOCOL_TYPES.register(
    "finetune",
    ProtocolType("finetune", FinetuneParams, run_finetune, inputs="images", trains=True),
)
