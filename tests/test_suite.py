"""The job suite: YAML validation, train-then-evaluate end to end, resume without redoing work,
a changed recipe trains anew, and the shipped suites load."""

import json

import pytest

from ssl_eval.cli import main
from ssl_eval.core.errors import UserError
from ssl_eval.orchestrate.suite import load_job_suite, shipped_job_suites

SMALL = """
name: small
version: 1
description: test-sized suite
datasets: [digits]
image_size: 16
baselines: [pixels, random:cifar_resnet_tiny]
protocols: [knn, linear]
train_defaults:
  arch: cifar_resnet_tiny
  dataset: digits
  train_subset: 256
  epochs: 1
  batch_size: 64
  monitor: {every: 100, knn_bank: 64, knn_queries: 64}
models:
  - {name: simclr, method: simclr}
  - {name: supervised, method: supervised}
"""


def _suite(tmp_path, text=SMALL):
    p = tmp_path / "small.yaml"
    p.write_text(text)
    return p


def _run(tmp_path, suite, capsys, *extra):
    code = main(
        [
            "suite",
            str(suite),
            "--results-dir",
            str(tmp_path / "r"),
            "--no-progress",
            "--no-report",
            "--reference",
            "none",
            *extra,
        ]
    )
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.mark.slow
def test_suite_trains_evaluates_and_resumes(tmp_path, capsys):
    suite = _suite(tmp_path)
    code, out = _run(tmp_path, suite, capsys)
    assert code == 0, out
    assert "2 model(s) trained, 8 unit(s) evaluated, 0 reused" in out
    board = (tmp_path / "r" / "leaderboard.md").read_text()
    for label in ("pixels", "random:cifar_resnet_tiny", "simclr", "supervised"):
        assert f"| {label} |" in board
    manifest = json.loads((tmp_path / "r" / "suite.json").read_text())
    assert set(manifest["checkpoints"]) == {"simclr", "supervised"}
    assert manifest["suite"]["version"] == 1 and "training" in manifest["timings_s"]
    # the supervised reference really used the labels: it is the trainer's supervised method
    side = json.loads(
        (tmp_path / "r" / "checkpoints")
        .glob("supervised-*")
        .__next__()
        .joinpath("backbone.json")
        .read_text()
    )
    assert side["method"] == "supervised" and side["complete"]
    # rerun: nothing is trained or evaluated again
    code, out = _run(tmp_path, suite, capsys)
    assert code == 0, out
    assert "0 model(s) trained, 0 unit(s) evaluated, 8 reused" in out


@pytest.mark.slow
def test_the_report_of_a_fresh_suite_run_compares_its_ablation_group(tmp_path, capsys):
    """The findings read the suite's groups from suite.json: the suite writes it before its
    report, so the first run's report already sets the ablation's models against each other
    (it was written after, and a fresh folder's report had no ablation section)."""
    text = SMALL.replace(
        "  - {name: simclr, method: simclr}\n  - {name: supervised, method: supervised}\n",
        "  - {name: simclr, method: simclr, groups: [ablation]}\n"
        "  - {name: simclr-b, method: simclr, groups: [ablation],"
        " config: {optim: {base_lr: 0.01}}}\n",
    )
    assert "simclr-b" in text
    code = main(
        ["suite", str(_suite(tmp_path, text)), "--results-dir", str(tmp_path / "r")]
        + ["--no-progress", "--reference", "none"]
    )
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    findings = (tmp_path / "r" / "report" / "findings.md").read_text()
    assert "Within the suite group ablation (simclr and simclr-b)" in findings
    manifest = json.loads((tmp_path / "r" / "suite.json").read_text())
    assert "tables and report" in manifest["timings_s"] and "total" in manifest["timings_s"]


@pytest.mark.slow
def test_changed_recipe_trains_into_a_new_folder(tmp_path, capsys):
    suite = _suite(tmp_path)
    assert _run(tmp_path, suite, capsys)[0] == 0
    before = sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir())
    changed = _suite(
        tmp_path,
        SMALL.replace(
            "{name: simclr, method: simclr}", "{name: simclr, method: simclr, config: {seed: 1}}"
        ),
    )
    code, out = _run(tmp_path, changed, capsys)
    assert code == 0, out
    assert "1 model(s) trained" in out  # only simclr; supervised is reused
    after = sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir())
    assert len(after) == 3 and set(before) < set(after)


@pytest.mark.slow
def test_killed_training_resumes(tmp_path, capsys, monkeypatch):
    """A suite stopped after one model's first epoch resumes that model, not from scratch."""
    import ssl_eval.train.loop as loop

    suite = _suite(tmp_path, SMALL.replace("epochs: 1", "epochs: 2"))
    real = loop.train
    calls = []

    def stop_once(cfg, out, *, resume=False, **kw):
        calls.append((cfg.method, resume))
        if len(calls) == 1:
            real(cfg, out, resume=resume, stop_after_epoch=1, **kw)
            raise KeyboardInterrupt
        return real(cfg, out, resume=resume, **kw)

    monkeypatch.setattr(loop, "train", stop_once)
    code, _ = _run(tmp_path, suite, capsys)
    assert code == 130  # interrupted, reported in one line
    code, out = _run(tmp_path, suite, capsys)
    assert code == 0, out
    assert calls[1] == ("simclr", True)  # the interrupted model resumed
    assert "2 model(s) trained" in out


@pytest.mark.parametrize(
    "text, message",
    [
        ("name: x\nversion: 1\nprotocols: [knn]\n", "name at least one baseline or trained model"),
        ("name: x\nversion: 1\nbaselines: [pixels]\nmodelz: []\n", "unknown key 'modelz'"),
        (
            "name: x\nversion: 1\nbaselines: [pixels]\nmodels: [{name: a, method: simclr}, {name: a, method: byol}]\n",
            "model names must be unique",
        ),
        (
            "name: x\nversion: 1\nbaselines: [pixels]\nmodels: [{name: 'a b', method: simclr}]\n",
            "may hold only",
        ),
        ("[1, 2", "suite"),
    ],
)
def test_bad_suite_is_one_line(tmp_path, capsys, text, message):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    code = main(["suite", str(p), "--results-dir", str(tmp_path / "r"), "--reference", "none"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_unknown_method_fails_before_training(tmp_path, capsys):
    p = _suite(tmp_path, SMALL.replace("method: supervised", "method: supervized"))
    code, out = _run(tmp_path, p, capsys)
    assert code == 2 and "supervized" in out
    assert not (tmp_path / "r" / "checkpoints").exists() or not any(
        (tmp_path / "r" / "checkpoints").iterdir()
    )


def test_shipped_suites_load():
    names = shipped_job_suites()
    assert {"default", "quick"} <= set(names)
    default = load_job_suite("default")
    methods = {m.method for m in default.models}
    assert methods >= {
        "simclr",
        "mocov3",
        "byol",
        "simsiam",
        "barlowtwins",
        "swav",
        "mae",
        "dino",
        "supervised",
    }
    assert {"pixels"} <= set(default.baselines)
    assert any(b.startswith("random:") for b in default.baselines)
    assert {"knn", "linear", "fewshot", "finetune"} <= set(default.protocols)
    with pytest.raises(UserError, match="unknown suite"):
        load_job_suite("defualt")


def test_default_suite_asks_its_vit_probes_of_the_vits_alone():
    """The arch protocols of the default suite (the attentive and multi-layer linear probes)
    go to the trained models whose arch is a ViT, read from the YAML itself, and to no CNN
    model or baseline: a multi-layer probe on a CNN would end the suite."""
    import yaml

    from ssl_eval.orchestrate.suite.runner import _arch_extra, _evaluation_runs
    from ssl_eval.protocols.cards import cards_dir, load_cards

    suite = load_job_suite("default")
    raw = yaml.safe_load((cards_dir() / "jobs" / "default.yaml").read_text())
    arch = {
        m["name"]: (m.get("config") or {}).get("arch", raw["train_defaults"]["arch"])
        for m in raw["models"]
    }
    vits = {n for n, a in arch.items() if a.startswith("vit")}
    assert vits == {"mae"}
    extra = _arch_extra(suite, "cpu")
    assert {n for n, c in extra.items() if c} == vits
    names = suite.all_protocols()
    cards = dict(zip(names, load_cards(list(names), suite.set), strict=True))
    types = {cards[p].protocol.name for p in extra["mae"]}
    assert types == {"attentive", "linear"}
    assert any(cards[p].params.n_last_blocks for p in extra["mae"] if p.startswith("linear"))
    ckpts = {n: [f"{n}=ckpt:/x/{n}"] for n in arch}
    runs = _evaluation_runs(suite, ckpts, extra)
    assert runs[0][1] == (*suite.baselines, *(b for v in ckpts.values() for b in v))
    assert runs[0][2] == suite.protocols and not set(runs[0][2]) & set(extra["mae"])
    assert [(r[1], r[2], r[3]) for r in runs[1:-1]] == [
        (("mae=ckpt:/x/mae",), extra["mae"], suite.datasets)
    ]
    # the dense column: every backbone, shapes-seg alone, its own protocols alone
    assert runs[-1][1:] == (runs[0][1], ("knnseg@capi",), ("shapes-seg",))
    assert "shapes-seg" not in suite.datasets


def test_arch_protocols_match_by_pattern_and_may_not_repeat_a_suite_protocol(tmp_path, capsys):
    text = SMALL + "arch_protocols: {'vit_*': [attentive@capi], 'cifar_*': [linear@dinov2]}\n"
    suite = load_job_suite(str(_suite(tmp_path, text)))
    assert suite.arch_extra("vit_tiny_p4") == ("attentive@capi",)
    assert suite.arch_extra("cifar_resnet_tiny") == ("linear@dinov2",)
    assert suite.arch_extra("resnet18") == ()
    p = _suite(tmp_path, SMALL + "arch_protocols: {'vit_*': [knn]}\n")
    code = main(["suite", str(p), "--results-dir", str(tmp_path / "r"), "--reference", "none"])
    err = capsys.readouterr().err
    assert code == 2 and "name it once" in err and err.count("\n") == 1, err


BASELINES_ONLY = """
name: dense-small
version: 1
datasets: [digits]
image_size: 16
baselines: [pixels, random:cifar_resnet_tiny]
protocols: [knn]
dataset_protocols: {shapes-seg: [knnseg@capi]}
set: ['knnseg@capi.ks=[1,3]']
"""


@pytest.mark.slow
def test_dataset_protocols_score_their_dataset_alone_and_tokenless_backbones_are_na(
    tmp_path, capsys
):
    """shapes-seg under knnseg@capi beside digits under knn: each dataset gets its own
    protocols only, the pixel baseline (no patch tokens) is n/a under knnseg with the reason,
    not an error that ends the suite, and the leaderboard gains the mIoU column."""
    code, out = _run(tmp_path, _suite(tmp_path, BASELINES_ONLY), capsys)
    assert code == 0, out
    from ssl_eval.records.frame import load_frame

    df = load_frame(tmp_path / "r")
    got = sorted({(r.backbone, r.dataset, r.protocol) for r in df.itertuples()})
    assert got == [
        ("pixels", "digits", "knn"),
        ("random:cifar_resnet_tiny", "digits", "knn"),
        ("random:cifar_resnet_tiny", "shapes-seg", "knnseg@capi"),
    ]
    na = json.loads((tmp_path / "r" / "suite.json").read_text())["units"]["not_applicable"]
    assert any(x.startswith("pixels x knnseg@capi") for x in na), na
    assert "reads patch tokens; pixels gives none" in out
    board = (tmp_path / "r" / "leaderboard.md").read_text()
    assert "shapes-seg / knnseg@capi (mIoU %)" in board, board


def test_a_dataset_in_datasets_and_dataset_protocols_is_refused(tmp_path, capsys):
    text = BASELINES_ONLY.replace("[shapes-seg: ", "[").replace(
        "{shapes-seg: [knnseg@capi]}", "{digits: [linear]}"
    )
    code = main(["suite", str(_suite(tmp_path, text)), "--results-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "name it once" in err and err.count("\n") == 1, err


@pytest.mark.slow
def test_a_protocol_of_patch_tokens_refuses_a_tokenless_backbone_before_any_work(tmp_path, capsys):
    code = main(
        ["run", "--backbone", "pixels", "--dataset", "shapes-seg", "--image-size", "16",
         "--protocol", "knnseg@capi", "--results-dir", str(tmp_path / "r")]
    )  # fmt: skip
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("ssl-eval: error")]
    assert code == 2 and "reads patch tokens" in line and "Traceback" not in err, err
    assert not (tmp_path / "r" / "records").exists() or not any(
        (tmp_path / "r" / "records").iterdir()
    )


@pytest.mark.slow
def test_arch_protocols_run_on_the_vit_alone_end_to_end(tmp_path, capsys):
    """A multi-layer probe in arch_protocols: the ViT gets it, the CNN model and the baselines
    are listed n/a in suite.json, and the suite ends normally (a multi-layer probe on a CNN
    would end it with an error)."""
    text = SMALL.replace(
        "  - {name: supervised, method: supervised}\n",
        "  - name: mae\n    method: mae\n    config:\n      arch: vit_tiny_p4\n"
        "      arch_kwargs: {embed_dim: 32, depth: 2, num_heads: 2, img_size: 16}\n",
    )
    text += "arch_protocols: {'vit_*': [linear@dinov2]}\n"
    text += "set: [linear@dinov2.iterations=5, 'linear@dinov2.n_last_blocks=[1,2]']\n"
    code, out = _run(tmp_path, _suite(tmp_path, text), capsys)
    assert code == 0, out
    manifest = json.loads((tmp_path / "r" / "suite.json").read_text())
    assert manifest["arch_protocols"] == {"mae": ["linear@dinov2"]}
    na = manifest["units"]["not_applicable"]
    assert any(x.startswith("simclr x linear@dinov2") for x in na)
    assert any(x.startswith("pixels x linear@dinov2") for x in na)
    from ssl_eval.records.frame import load_frame

    df = load_frame(tmp_path / "r")
    assert sorted(df[df["protocol"] == "linear@dinov2"]["backbone"].unique()) == ["mae"]
