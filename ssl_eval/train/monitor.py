"""Per-epoch health of a run: collapse diagnostics on held-out embeddings and an online k-NN
accuracy (``monitor_epoch``, called by the loop). A collapsed run (every image mapped to
nearly the same direction) is flagged.

  * std: mean per-dimension std of L2-normalised embeddings; about 1/sqrt(d) for embeddings
    spread over the sphere, about 0 at collapse (SimSiam, section 4.1).
  * rank: RankMe (Garrido et al. 2023), exp of the entropy of the normalised singular values
    of the embedding matrix; 1 at complete collapse, up to d.
  * alignment, uniformity (Wang & Isola 2020): E||f(x) - f(x+)||^2 over two views (lower is
    better) and log E exp(-2 ||f(x) - f(y)||^2) over pairs (more negative is more uniform).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.base import FEATURE_KINDS
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..protocols.search.knn import knn_classify  # the same k-NN the evaluator's protocol uses
from .augment import make_views, step_generator
from .config import TrainConfig
from .data import TrainData


def feature_std(z: torch.Tensor) -> float:
    return float(F.normalize(z.float(), dim=1).std(0).mean())


def rankme(z: torch.Tensor, eps: float = 1e-7) -> float:
    s = torch.linalg.svdvals(z.float())
    p = s / (s.sum() + eps) + eps
    return float(math.exp(-(p * p.log()).sum()))


def alignment(z1: torch.Tensor, z2: torch.Tensor) -> float:
    a, b = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
    return float((a - b).pow(2).sum(1).mean())


def uniformity(z: torch.Tensor, t: float = 2.0) -> float:
    z = F.normalize(z.float(), dim=1)
    return float(torch.pdist(z).pow(2).mul(-t).exp().mean().log())


def is_collapsed(std: float, dim: int, ratio: float) -> bool:
    """Collapse when the per-dimension std is far below the 1/sqrt(d) of a spread embedding."""
    return std < ratio / math.sqrt(dim)


def diagnostics(bank: torch.Tensor, view1: torch.Tensor, view2: torch.Tensor, ratio: float) -> dict:
    """All diagnostics from eval-mode embeddings: ``bank`` of held-out images and two
    augmented views of a subset of them."""
    std = feature_std(bank)
    d = bank.shape[1]
    return {
        "std": std,
        "std_ref": 1 / math.sqrt(d),
        "rank": rankme(bank),
        "alignment": alignment(view1, view2),
        "uniformity": uniformity(bank[:1024]),
        "collapsed": is_collapsed(std, d, ratio),
    }


def knn_accuracy(
    bank_x: torch.Tensor,
    bank_y: torch.Tensor,
    q_x: torch.Tensor,
    q_y: torch.Tensor,
    k: int,
    temperature: float,
    num_classes: int,
) -> float:
    scores = knn_classify(
        bank_x.float(), bank_y, q_x.float(), (k,), temperature, num_classes, backend="torch"
    )[k]
    return float((scores.argmax(1) == q_y).float().mean())


@torch.no_grad()
def embed(
    backbone: nn.Module,
    images: torch.Tensor,
    device: torch.device,
    bs: int = 512,
    kind: str = "model",
) -> torch.Tensor:
    """Eval-mode embeddings of uint8 images, normalised as in training, read as the evaluator
    will read them (``kind``: the method's feature kind)."""
    read = FEATURE_KINDS.get(kind)
    was = backbone.training
    backbone.eval()
    m = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    s = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    out = [
        read(backbone, ((images[i : i + bs].float() / 255 - m) / s).to(device)).float().cpu()
        for i in range(0, len(images), bs)
    ]
    backbone.train(was)
    return torch.cat(out)


def monitor_epoch(
    backbone: nn.Module, data: TrainData, cfg: TrainConfig, epoch: int, device, kind: str
) -> dict:
    """The diagnostics of one epoch (every epoch) and the k-NN top-1 (every ``monitor.every``
    epochs and at the last), all in eval mode: a bank of training images, queried with
    held-out train images (``data.query_images``: neither trained on nor in the evaluation's
    validation split; never test images)."""
    mc = cfg.monitor
    read = FEATURE_KINDS.get(kind)
    bank = embed(backbone, data.bank_images, device, kind=kind)
    sub = data.bank_images[:512]
    g = step_generator(cfg.seed, epoch, 0, stream=7)
    one = dataclasses.replace(cfg.aug, global_views=cfg.aug.global_views[:1], local_views=0)
    v1 = make_views(sub, one, g, IMAGENET_MEAN, IMAGENET_STD)[0]  # two independent draws of view 1,
    v2 = make_views(sub, one, g, IMAGENET_MEAN, IMAGENET_STD)[
        0
    ]  # so one-view methods (MAE) work too
    was = backbone.training
    backbone.eval()
    with torch.no_grad():
        z1, z2 = (
            read(backbone, v1.to(device)).float().cpu(),
            read(backbone, v2.to(device)).float().cpu(),
        )
    backbone.train(was)
    out = diagnostics(bank, z1, z2, mc.collapse_std_ratio)
    scheduled = mc.every > 0 and ((epoch + 1) % mc.every == 0 or epoch + 1 == cfg.epochs)
    if scheduled and len(data.query_images):  # held-out train images (none: no k-NN)
        q = embed(backbone, data.query_images, device, kind=kind)
        out["knn_top1"] = knn_accuracy(
            bank,
            data.bank_labels,
            q,
            data.query_labels,
            mc.knn_k,
            mc.knn_temperature,
            data.num_classes,
        )
    return out
