"""Training configuration: one ``TrainConfig`` dataclass holding the augmentation pipeline,
the method's own settings and the optimisation schedule. Every field has a default per
method, and the whole thing round-trips through YAML, so an ablation is a change of config,
not of code. It is read by the one YAML-to-dataclass loader, ``ssl_eval.core.config.from_mapping``
(train/resolve.py assembles it)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..core.config import DEFAULT_SPLIT_SEED, DEFAULT_VAL_FRACTION
from ..core.errors import UserError


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(f"training config: {message}")


@dataclass
class ViewAug:
    """One view's augmentation. Each operation has its probability and its strength; a
    probability of 0 switches the operation off."""

    size: int = 32  # output side in pixels
    crop_p: float = 1.0  # random resized crop (else the whole image resized)
    crop_scale: tuple[float, float] = (0.2, 1.0)  # area fraction
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    gray_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # pixels of the output view (BYOL at 224: 0.1-2.0)
    solarize_p: float = 0.0

    def __post_init__(self) -> None:
        for name in ("crop_p", "flip_p", "jitter_p", "gray_p", "blur_p", "solarize_p"):
            _check(
                0 <= getattr(self, name) <= 1,
                f"aug {name} is a probability in [0, 1], not {getattr(self, name)}",
            )
        _check(self.size >= 1, f"aug size must be at least 1 pixel, not {self.size}")
        lo, hi = self.crop_scale
        _check(
            0 < lo <= hi <= 1,
            f"aug crop_scale is [min, max] with 0 < min <= max <= 1, not {list(self.crop_scale)}",
        )


@dataclass
class AugConfig:
    """The views of one training step: global views (each its own ``ViewAug``) and optional
    multi-crop local views (DINO, SwAV)."""

    global_views: list[ViewAug] = field(default_factory=lambda: [ViewAug(), ViewAug()])
    local_views: int = 0
    local: ViewAug = field(default_factory=lambda: ViewAug(size=16, crop_scale=(0.05, 0.4)))


@dataclass
class OptimConfig:
    """Optimiser and schedule. The learning rate is ``base_lr * global_batch / 256``; warmup
    and cosine decay count epochs (fractions of the dataset seen), never steps."""

    name: str = "adamw"  # adamw | sgd
    base_lr: float = 1e-3
    weight_decay: float = 1e-6
    momentum: float = 0.9  # sgd only
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        _check(self.name in ("adamw", "sgd"), f"optim name is 'adamw' or 'sgd', not {self.name!r}")
        _check(self.base_lr > 0, f"the learning rate must be > 0, not {self.base_lr}")
        _check(self.weight_decay >= 0, f"weight decay must be >= 0, not {self.weight_decay}")
        _check(0 <= self.momentum < 1, f"momentum is in [0, 1), not {self.momentum}")
        _check(self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, not {self.warmup_epochs}")
        _check(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio is in [0, 1], not {self.min_lr_ratio}")


@dataclass
class MonitorConfig:
    """Per-epoch diagnostics on held-out images (eval mode)."""

    knn_bank: int = 2000  # training images in the k-NN bank
    # held-out train images queried: neither trained on nor in the evaluation's validation
    # split (never test images); none when the whole train part is trained on
    knn_queries: int = 1000
    knn_k: int = 20
    knn_temperature: float = 0.07
    collapse_std_ratio: float = (
        0.1  # collapsed when mean std of L2-normalised features < ratio / sqrt(d)
    )
    every: int = 1  # epochs between k-NN evaluations (diagnostics run every epoch)

    def __post_init__(self) -> None:
        _check(
            min(self.knn_bank, self.knn_queries, self.knn_k, self.every) >= 1,
            "monitor knn_bank, knn_queries, knn_k and every must be at least 1",
        )
        _check(
            self.knn_temperature > 0,
            f"monitor knn_temperature must be > 0, not {self.knn_temperature}",
        )


@dataclass
class TrainConfig:
    method: str = "simclr"
    arch: str | None = None  # None: the method's default for the image size
    arch_kwargs: dict = field(default_factory=dict)
    dataset: str = "shapes"
    data_root: str | None = None
    # first N of a seeded permutation of the train split minus the evaluation's validation
    # split (``val_fraction``, ``split_seed``: the evaluation's defaults, ``ssl-eval run
    # --val-fraction --split-seed``), so no image the evaluation selects on is trained on
    train_subset: int | None = None
    val_fraction: float = DEFAULT_VAL_FRACTION
    split_seed: int = DEFAULT_SPLIT_SEED
    image_size: int = 32
    epochs: int = 10
    batch_size: int = 256  # global, across all processes
    seed: int = 0
    method_cfg: dict = field(default_factory=dict)  # overrides of the method's own dataclass
    aug: AugConfig = field(default_factory=AugConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    device: str = "auto"
    # CPU kernels pinned so the weights do not depend on the CPU (train/determinism.py); it
    # changes the rounding, not the recipe: runs with and without it are runs of one recipe
    deterministic: bool = False

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, f"--epochs must be at least 1, not {self.epochs}")
        _check(self.batch_size >= 1, f"--batch-size must be at least 1, not {self.batch_size}")
        _check(
            self.image_size >= 1, f"--image-size must be at least 1 pixel, not {self.image_size}"
        )
        _check(
            self.train_subset is None or self.train_subset >= 1,
            f"--train-subset must be at least 1 image, not {self.train_subset}",
        )
        _check(
            0 < self.val_fraction < 1,
            f"val_fraction (the evaluation's validation split, left out of training) is in "
            f"(0, 1), not {self.val_fraction}",
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
