"""The fine-tune's ``pool=mean_patch_fc_norm`` (the finetune@mae cards) against MAE's own
fine-tuning model and optimiser, written here from facebookresearch/mae at commit
efb2a8062c206524e35e47d04501ed4f544c0ae8:

- ``main_finetune.py``: ``--global_pool`` is on by default; the model is
  ``models_vit.VisionTransformer(global_pool=True)``, the pre-trained file loaded with
  ``strict=False`` (missing exactly ``head.*`` and ``fc_norm.*``: the file's ``norm.*`` is not
  loaded, since the model has no ``norm``), then ``trunc_normal_(head.weight, std=2e-5)``;
- ``models_vit.py``: with ``global_pool`` the model deletes ``self.norm`` and adds
  ``self.fc_norm = norm_layer(embed_dim)`` (LayerNorm, eps 1e-6, fresh); ``forward_features``
  runs the blocks, averages ``x[:, 1:, :]`` (the class token left out) and applies fc_norm;
  timm's ``forward`` then applies the head;
- ``util/lr_decay.py``: ``param_groups_lrd`` with ``no_weight_decay_list`` from timm's
  ``no_weight_decay()`` (``pos_embed``, ``cls_token``): no weight decay for 1-D parameters and
  those names; layer id 0 for ``cls_token``, ``pos_embed`` and ``patch_embed*``, i + 1 for
  ``blocks.i.*``, num_layers = depth + 1 for everything else (fc_norm and head included);
  lr scale ``layer_decay ** (num_layers - layer_id)``.
"""

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_checkpoint_formats import _one_thread  # noqa: F401
from test_variants_dino import patch_tokens, rel_diff, vit_blocks
from test_variants_dino import vit_state_dict as plain_vit_state_dict
from test_variants_mae import VITS, mae_sincos, official_pos_embed

from ssl_eval.backbones import BuildOptions, build_backbone
from ssl_eval.backbones.families import mae as mae_family
from ssl_eval.core.errors import UserError
from ssl_eval.protocols import finetune
from ssl_eval.protocols.base import ImageInputs
from ssl_eval.protocols.cards import load_card

DEPTH = 2  # blocks in the test's file (the tag's real width, heads and patch)
SIZE = 64  # input pixels: a 4 x 4 grid of 16-px patches, the 14 x 14 table resized as MAE does


def mae_blocks(sd: dict, t: torch.Tensor, heads: int) -> torch.Tensor:
    """timm's pre-norm Block (models_vit.py's blocks) over (B, N, D) tokens; no final norm."""
    return vit_blocks(sd, t, heads, final_norm=False)


def mae_finetune_logits(sd, x, tag, head_weight, head_bias) -> torch.Tensor:
    """models_vit.VisionTransformer(global_pool=True) loaded from ``sd`` as main_finetune.py
    loads it (interpolate_pos_embed to the input's grid; ``norm`` not in the model), with the
    given head: forward_features (blocks, mean of x[:, 1:], fresh fc_norm) then the head."""
    _, dim, _, heads, patch = VITS[tag]
    t = patch_tokens(sd, x, patch)
    t = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), t], dim=1)
    t = t + official_pos_embed(sd["pos_embed"], x.shape[-1] // patch)
    pooled = mae_blocks(sd, t, heads)[:, 1:, :].mean(dim=1)  # global pool without cls token
    fc_norm = F.layer_norm(pooled, (dim,), torch.ones(dim), torch.zeros(dim), eps=1e-6)
    return F.linear(fc_norm, head_weight, head_bias)


def mae_param_groups(named: dict[str, torch.Tensor], weight_decay: float, layer_decay: float):
    """util/lr_decay.param_groups_lrd's (lr_scale, weight_decay) for each named parameter."""
    num_layers = DEPTH + 1
    no_weight_decay_list = {"pos_embed", "cls_token"}  # timm VisionTransformer.no_weight_decay()

    def layer_id(n):  # get_layer_id_for_vit
        if n in ("cls_token", "pos_embed") or n.startswith("patch_embed"):
            return 0
        if n.startswith("blocks"):
            return int(n.split(".")[1]) + 1
        return num_layers

    return {
        n: (
            layer_decay ** (num_layers - layer_id(n)),
            0.0 if t.ndim == 1 or n in no_weight_decay_list else weight_decay,
        )
        for n, t in named.items()
    }


@pytest.fixture
def mae_file(tmp_path, monkeypatch):
    """A random ViT-B/16 file of DEPTH blocks in MAE's released layout ({"model": encoder}
    with ``norm``, MAE's sin-cos table), and the tag's backbone read from it at SIZE px."""
    tag = "mae_vitb16"
    name, dim, _, _, patch = VITS[tag]
    sd = plain_vit_state_dict(dim, DEPTH, patch, seed=3, pos_embed=mae_sincos(dim, 224 // patch))
    assert not torch.allclose(sd["norm.weight"], torch.ones(dim))  # a norm MAE must not reuse
    torch.save({"model": sd}, tmp_path / name)
    create = mae_family.create_timm
    monkeypatch.setattr(
        mae_family,
        "create_timm",
        lambda arch, img_size=None, **kw: create(arch, img_size, **{**kw, "depth": DEPTH}),
    )
    bb = build_backbone(tag, BuildOptions(weights=tmp_path / name, image_size=SIZE))
    assert len(bb.model.blocks) == DEPTH and bb.feature_kind == "cls"
    return tag, sd, bb


def _classifier(bb, tmp_path, num_classes=5, **changes):
    p = dataclasses.replace(load_card("finetune@mae").params, **{"vit_depth": DEPTH, **changes})
    ds = SimpleNamespace(num_classes=num_classes)  # _model reads only the class count
    inp = ImageInputs(bb, ds, np.arange(8), np.arange(8, 12), torch.device("cpu"), 0, tmp_path)
    clf, opt = finetune._model(inp, p)
    return clf, opt, p


def test_the_mae_cards_pool_as_mae_fine_tunes():
    for card in ("finetune@mae", "finetune@mae-l", "finetune@mae-h"):
        assert load_card(card).params.pool == "mean_patch_fc_norm", card
    suite = load_card("finetune")
    assert suite.params.pool == "feature_kind"
    assert "pool" not in suite.params_dict()  # neutral: the suite's setting is unchanged


def test_global_pool_forward_is_models_vits(mae_file, tmp_path):
    """The fine-tune's model (eval mode: drop path off) against models_vit.py's forward with
    global_pool=True on the same file and head."""
    tag, sd, bb = mae_file
    clf, _, _ = _classifier(bb, tmp_path)
    clf.eval()
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = clf(x)
        want = mae_finetune_logits(sd, x, tag, clf.head.weight, clf.head.bias)
    assert rel_diff(got, want) < 1e-5, rel_diff(got, want)
    # main_finetune.py's new layers: the head trunc_normal(std 2e-5), bias 0; fc_norm fresh
    assert torch.equal(clf.head.bias, torch.zeros(5))
    assert 1e-5 < clf.head.weight.std().item() < 3e-5
    assert torch.equal(clf.fc_norm.weight, torch.ones(768))
    assert torch.equal(clf.fc_norm.bias, torch.zeros(768)) and clf.fc_norm.eps == 1e-6
    # MAE's model holds no norm: the file's is neither used nor trained
    assert not any(k.startswith("encoder.norm.") for k in clf.state_dict())
    assert "norm.weight" in bb.model.state_dict()  # the shared backbone is left as it was


def test_param_groups_are_param_groups_lrd(mae_file, tmp_path):
    """Every parameter's lr scale and weight decay against param_groups_lrd's rule, over
    exactly the parameters of MAE's fine-tuning model (no ``norm``; ``fc_norm`` and ``head``)."""
    _, sd, bb = mae_file
    clf, opt, p = _classifier(bb, tmp_path)
    named = {n: t for n, t in clf.encoder.named_parameters()}
    named |= {"fc_norm." + n: t for n, t in clf.fc_norm.named_parameters()}
    named |= {"head." + n: t for n, t in clf.head.named_parameters()}
    mae_names = {k for k in sd if not k.startswith("norm.")} | {
        "fc_norm.weight",
        "fc_norm.bias",
        "head.weight",
        "head.bias",
    }
    assert set(named) == mae_names  # the model main_finetune.py trains, every one trainable
    assert all(t.requires_grad for t in named.values())
    want = mae_param_groups(named, p.weight_decay, p.layer_decay)
    got = {}
    for g in opt.param_groups:
        for t in g["params"]:
            got[id(t)] = (g["lr_scale"], g["weight_decay"])
    assert len(got) == len(named)
    for n, t in named.items():
        assert got[id(t)] == pytest.approx(want[n], rel=1e-12), n
    # the new layers train at the head's lr; fc_norm without weight decay
    assert want["fc_norm.weight"] == (1.0, 0.0) and want["head.weight"] == (1.0, 0.05)


def test_global_pool_is_refused_in_one_line_without_patch_tokens(tmp_path):
    bb = build_backbone("random:cifar_resnet_tiny", BuildOptions(image_size=16))
    with pytest.raises(UserError, match="pool=mean_patch_fc_norm averages the patch") as e:
        _classifier(bb, tmp_path, vit_depth=0, drop_path=0.0, layer_decay=0.0)
    assert "\n" not in str(e.value) and "use pool=feature_kind" in str(e.value)
    with pytest.raises(UserError, match="pool is one of feature_kind, mean_patch_fc_norm"):
        finetune.FinetuneParams(pool="mean")


def _tiny_inputs(tmp_path, n_train: int, n_val: int) -> ImageInputs:
    """A random micro ViT at 16 px on n_train + n_val random images of 3 classes (the same
    images as the test split), for a tiny run_finetune."""
    from ssl_eval.data.datasets import ImageSplit

    bb = build_backbone("random:vit_micro_p4", BuildOptions(image_size=16))
    n = n_train + n_val
    images = np.random.default_rng(0).integers(0, 255, (n, 16, 16, 3), np.uint8)
    split = ImageSplit(np.arange(n) % 3, images)
    ds = SimpleNamespace(num_classes=3, train=split, test=split)
    tr, va = np.arange(n_train), np.arange(n_train, n)
    return ImageInputs(bb, ds, tr, va, torch.device("cpu"), 0, tmp_path)


def test_global_pool_trains_fc_norm_and_records_what_the_head_reads(tmp_path, monkeypatch):
    """A tiny run through run_finetune: fc_norm (a new parameter) is trained at the head's
    lr, and the record says what the head read."""
    inp = _tiny_inputs(tmp_path, n_train=32, n_val=16)
    p = dataclasses.replace(
        load_card("finetune@mae").params,
        epochs=1,
        batch_size=16,
        warmup_epochs=0.0,
        vit_depth=0,
        rand_augment="none",
        eval_batch_size=48,
    )
    built = []
    make = finetune._model

    def spy(*a):
        built.append(make(*a))
        return built[-1]

    monkeypatch.setattr(finetune, "_model", spy)
    out = finetune.run_finetune(inp, p)
    clf = built[0][0]
    assert out.details["head_reads"] == finetune.POOLS["mean_patch_fc_norm"]
    assert not torch.equal(clf.fc_norm.weight.detach(), torch.ones_like(clf.fc_norm.weight))
    assert len(out.per_sample["top1"]) == 48


def test_lr_clock_iterations_is_maes_schedule_at_data_iter_step_over_len_loader(tmp_path):
    """lr_clock iterations (the MAE cards): the lr of every step is MAE's
    util/lr_sched.adjust_learning_rate at engine_finetune.py's epoch + data_iter_step /
    len(data_loader), written out here; 40 rows in batches of 16, the last partial batch
    dropped (main_finetune.py: drop_last): 2 steps an epoch, so the samples clock (16 / 40 of
    an epoch after one step, not 1 / 2) differs from it."""
    import math

    inp = _tiny_inputs(tmp_path, n_train=40, n_val=16)
    base = load_card("finetune@mae").params
    p = dataclasses.replace(
        base, epochs=3, batch_size=16, warmup_epochs=1.0, vit_depth=0, rand_augment="none",
        mixup_alpha=0.0, cutmix_alpha=0.0, eval_batch_size=56, drop_path=0.0,
    )  # fmt: skip
    assert base.lr_clock == "iterations"
    seen = []
    step = torch.optim.AdamW.step

    def spy(self, *a, **k):
        seen.append(max(g["lr"] for g in self.param_groups))  # the head's group: scale 1
        return step(self, *a, **k)

    def mae_lr(epoch):  # util/lr_sched.py, as written there
        if epoch < p.warmup_epochs:
            return p.lr * epoch / p.warmup_epochs
        return p.min_lr + (p.lr - p.min_lr) * 0.5 * (
            1.0 + math.cos(math.pi * (epoch - p.warmup_epochs) / (p.epochs - p.warmup_epochs))
        )

    torch.optim.AdamW.step = spy
    try:
        finetune.run_finetune(inp, p)
    finally:
        torch.optim.AdamW.step = step
    want = [mae_lr(it / 2 + epoch) for epoch in range(3) for it in range(2)]
    assert seen == pytest.approx(want, rel=1e-12)
