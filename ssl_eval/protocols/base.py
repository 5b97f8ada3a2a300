"""What every protocol receives and returns, and the registry of protocol types."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..core.registry import Registry


@dataclass
class ProtocolInputs:
    """Features of one (backbone, dataset). ``train_idx``/``val_idx`` split the train features;
    every choice a protocol makes is made on ``val_idx``; the test split only reports."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    train_idx: np.ndarray
    val_idx: np.ndarray
    num_classes: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    # a multi-label dataset's targets (N, C) in the VOC devkit's encoding (1 present, 0 only
    # difficult, -1 absent), for protocols with labels="multi"; None for single-label data
    train_targets: np.ndarray | None = None
    test_targets: np.ndarray | None = None
    # test sets scored with the same head or bank (robustness sets of imagenet-robust), for
    # protocols with extra_tests=True: name -> (features, labels, the classes a prediction is
    # chosen among, or None for all)
    extra_tests: dict = field(default_factory=dict)


@dataclass
class ProtocolOutput:
    """``metrics`` are fractions in [0, 1] (dense depth errors excepted: RMSE in metres,
    AbsRel). For each metric, a protocol gives either ``per_sample`` (0/1 or a score per test
    image, for bootstrap intervals and paired tests), ``spread`` (the values over seeds or
    episodes, for a t interval), ``resampled``: for a metric that is no mean over images (mean
    per-class accuracy, mAP), the function that computes it on the test images of an index
    array (a bootstrap resample of the test set), or ``intervals`` (a bootstrap over test
    images it computed itself, for a statistic of summed per-image parts: mIoU)."""

    metrics: dict[str, float]
    details: dict = field(default_factory=dict)  # selected hyperparameters, per-setting scores
    per_sample: dict[str, np.ndarray] = field(default_factory=dict)
    spread: dict[str, list[float]] = field(default_factory=dict)
    resampled: dict[str, Callable[[np.ndarray], float]] = field(default_factory=dict)
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)


@dataclass
class ImageInputs:
    """What protocols that train the backbone itself (fine-tuning) receive."""

    backbone: object  # ssl_eval.backbones.Backbone
    bundle: object  # ssl_eval.data.datasets.DatasetBundle
    train_idx: np.ndarray
    val_idx: np.ndarray
    device: torch.device
    seed: int
    state_dir: object  # pathlib.Path: where training state is checkpointed for resume
    num_workers: int | None = None
    cache_dir: object = None  # pathlib.Path: the run's cache folder (token caches); None: default
    accel: object = None  # ssl_eval.features.accel.Accel: channels-last / compile of the forward
    batch_size: int = 64  # the run's extraction batch size
    bootstrap_resamples: int = 1000  # for intervals a protocol computes itself


@dataclass(frozen=True)
class DataShape:
    """What a protocol may check before any feature is extracted: the split sizes and the
    smallest class count of the training rows (train minus val) and of the whole train split."""

    train: int  # train minus val
    val: int
    test: int
    num_classes: int
    min_class_train: int  # smallest class in train minus val
    min_class_all: int  # smallest class in the whole train split


@dataclass(frozen=True)
class ProtocolType:
    """A protocol implementation: its parameter dataclass and ``run(inputs, params)``.
    ``inputs`` says what it runs on: cached "features" (ProtocolInputs) or "images"
    (ImageInputs, for protocols that train the backbone). ``seeded`` says whether the seed
    changes its numbers: an unseeded protocol runs once for all seeds of a run, and its
    interval is the bootstrap over test images, never a t interval over identical runs."""

    name: str
    params: type
    run: Callable[[object, object], ProtocolOutput]
    inputs: str = "features"
    seeded: bool = True  # False: the numbers do not depend on the seed (k-NN on fixed features)
    preflight: Callable[[object, DataShape], None] | None = None  # data-dependent checks of params
    trains: bool = False  # True: it trains the backbone (refused for one without parameters)
    labels: str = "single"  # "single" (one class per image) or "multi" (multi-label datasets)
    extra_tests: bool = False  # True: it scores the dataset's extra test sets too
    # the feature kind a card's params read instead of the backbone's own (a multi-layer
    # card reads ``layers:N``), or None: the backbone's
    feature_kind: Callable[[object], str | None] | None = None

    def features_of(self, params: object) -> str | None:
        return self.feature_kind(params) if self.feature_kind is not None else None

    dense: str | None = None  # the per-pixel target it scores ("segmentation", "depth")
    tokens: bool = False  # True: it reads the backbone's patch tokens (dense protocols do too)

    @property
    def reads_tokens(self) -> bool:
        return self.tokens or self.dense is not None


PROTOCOL_TYPES: Registry[ProtocolType] = Registry("protocol type")


def topk_hits(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[int, np.ndarray]:
    """Per row, whether its label is among the ``k`` highest scores (bool array), for each k."""
    kmax = min(max(ks), scores.shape[1])
    top = scores.topk(kmax, dim=1).indices
    hit = top == labels.view(-1, 1)
    return {k: hit[:, : min(k, kmax)].any(dim=1).cpu().numpy() for k in ks}


def topk_correct(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[int, int]:
    """Number of rows whose label is among the ``k`` highest scores, for each k."""
    return {k: int(v.sum()) for k, v in topk_hits(scores, labels, ks).items()}


def as_tensor(x: np.ndarray, device: torch.device) -> torch.Tensor:
    """Features (often memory-mapped float16) -> float32 tensor on ``device``."""
    return torch.from_numpy(np.asarray(x, dtype=np.float32)).to(device)


def embed_images(
    backbone, images: np.ndarray, device: torch.device, batch: int = 256
) -> np.ndarray:
    """uint8 NHWC images -> (N, D) float32 features of ``backbone`` (its own preprocessing,
    eval mode), for protocols that probe the backbone on images of their own making."""
    model_device = next(iter(backbone.model.parameters()), torch.empty(0)).device
    if model_device != device:
        backbone.model.to(device)
    out = []
    pre = backbone.preprocessing
    for s in range(0, len(images), batch):
        chunk = torch.from_numpy(np.ascontiguousarray(images[s : s + batch])).permute(0, 3, 1, 2)
        x = torch.stack([pre.geometric(im) for im in chunk])
        out.append(backbone.embed(pre.normalise(x).to(device)).cpu().numpy())
    return np.concatenate(out).astype(np.float32)
