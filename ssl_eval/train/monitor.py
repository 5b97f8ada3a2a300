"""Per-epoch health of a run: collapse diagnostics on held-out embeddings and an online k-NN
accuracy. A collapsed run (every image mapped to nearly the same direction) is flagged.

  * std: mean per-dimension std of L2-normalised embeddings; about 1/sqrt(d) for embeddings
    spread over the sphere, about 0 at collapse (SimSiam, section 4.1).
  * rank: RankMe (Garrido et al. 2023), exp of the entropy of the normalised singular values
    of the embedding matrix; 1 at complete collapse, up to d.
  * alignment, uniformity (Wang & Isola 2020): E||f(x) - f(x+)||^2 over two views (lower is
    better) and log E exp(-2 ||f(x) - f(y)||^2) over pairs (more negative is more uniform).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..protocols.knn import knn_classify  # the one protocol function the trainer may use


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
    bank_x: torch.Tensor, bank_y: torch.Tensor, q_x: torch.Tensor, q_y: torch.Tensor,
    k: int, temperature: float, num_classes: int,
) -> float:
    scores = knn_classify(bank_x.float(), bank_y, q_x.float(), (k,), temperature, num_classes, backend="torch")[k]
    return float((scores.argmax(1) == q_y).float().mean())
