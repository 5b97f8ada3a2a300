import subprocess
import sys

import pytest
from conftest import ROOT, cli_env, image_folder

from ssl_eval.cli import main
from ssl_eval.records.store import load_records


def _run(args, tmp_path):
    return subprocess.run(
        [sys.executable, "-m", "ssl_eval.cli", *args],
        capture_output=True,
        text=True,
        env=cli_env(tmp_path),
        cwd=tmp_path,
        timeout=600,
    )


@pytest.mark.slow
def test_embedded_default_end_to_end(tmp_path):
    """`ssl-eval run` with no --dataset evaluates on shapes, writes records and a leaderboard;
    the second run skips what exists; --force recomputes from the feature cache."""
    r = _run(["run", "--backbone", "pixels", "--no-progress"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "pixels\tshapes\tknn" in r.stdout and "pixels\tshapes\tlinear" in r.stdout
    md = (tmp_path / "results" / "leaderboard.md").read_text()
    assert "shapes / knn" in md and "shapes / linear" in md
    recs = load_records(tmp_path / "results")
    top1 = {r.protocol["name"]: r.value for r in recs if r.metric == "top1"}
    assert set(top1) == {"knn", "linear"} and all(v > 1 / 6 for v in top1.values())  # above chance
    rec = next(r for r in recs if r.metric == "top1" and r.protocol["name"] == "knn")
    for field in (
        "schema_version",
        "run_id",
        "time",
        "weights",
        "load_report",
        "protocol",
        "dataset",
        "seed",
        "wall_time_s",
        "peak_memory_mb",
        "device",
        "packages",
        "code_version",
    ):
        assert field in rec.to_dict()
    assert rec.dataset["sizes"] == {"train": 9000, "val": 1000, "test": 2000}
    assert rec.protocol["version"] == 1 and "params" in rec.protocol

    again = _run(["run", "--backbone", "pixels", "--no-progress"], tmp_path)
    assert again.returncode == 0 and "skipped" in again.stdout
    assert len(load_records(tmp_path / "results")) == len(recs)

    forced = _run(
        ["run", "--backbone", "pixels", "--protocol", "knn", "--force", "--no-progress"], tmp_path
    )
    assert (
        forced.returncode == 0
        and "[cache] reusing pixels features for shapes/train" in forced.stderr
    )
    new = [
        r
        for r in load_records(tmp_path / "results")
        if r.metric == "top1" and r.protocol["name"] == "knn"
    ]
    assert len(new) == 2 and new[0].value == new[1].value  # same seed, same number


@pytest.mark.slow
def test_digits_pixels_linear_at_least_093(tmp_path, capsys):
    rc = main(
        [
            "run",
            "--backbone",
            "pixels",
            "--dataset",
            "digits",
            "--protocol",
            "linear",
            "--results-dir",
            str(tmp_path / "r"),
            "--no-progress",
        ]
    )
    assert rc == 0
    recs = load_records(tmp_path / "r")
    top1 = next(r.value for r in recs if r.metric == "top1")
    assert top1 >= 0.93


def test_results_dir_and_leaderboard_command(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a default results/ would land here
    before = sorted((ROOT / "results").rglob("*"))
    r = tmp_path / "elsewhere"
    assert (
        main(
            [
                "run",
                "--backbone",
                "pixels",
                "--dataset",
                "digits",
                "--protocol",
                "knn",
                "--results-dir",
                str(r),
                "--no-progress",
                "--no-leaderboard",
            ]
        )
        == 0
    )
    assert not (r / "leaderboard.md").exists()
    assert main(["leaderboard", "--results-dir", str(r)]) == 0
    assert (r / "leaderboard.csv").exists() and "digits / knn" in (r / "leaderboard.md").read_text()
    assert sorted((ROOT / "results").rglob("*")) == before  # nothing written outside --results-dir
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "--backbone", "pixles"], "Did you mean 'pixels'"),
        (["run", "--backbone", "pixels", "--dataset", "shapez"], "Did you mean 'shapes'"),
        (["run", "--backbone", "pixels", "--protocol", "knm"], "Did you mean 'knn'"),
        (["run", "--backbone", "dinov2", "--offline"], "dinov2_vits14_pretrain.pth"),
        (["run", "--backbone", "pixels", "--dataset", "cifar10"], "--data-root"),
        (["run", "--backbone", "pixels", "--device", "cuda:0"], "no CUDA GPU"),
        (
            ["run", "--backbone", "pixels", "--set", "linear_lr=3"],
            "no selected protocol has a param",
        ),
        (["run", "--backbone", "timm:resnet10t", "--weights", "nope.pth"], "no such file"),
        (["leaderboard", "--results-dir", "empty"], "no result records"),
    ],
)
def test_user_errors_exit_nonzero_with_one_clear_line(tmp_path, capsys, args, message):
    rc = main(args + (["--results-dir", str(tmp_path / "r")] if args[0] == "run" else []))
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("ssl-eval: error:")


@pytest.mark.slow
def test_user_error_in_subprocess_has_no_traceback(tmp_path):
    r = _run(["run", "--backbone", "nonexistent_backbone"], tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "unknown backbone" in r.stderr


def test_list(tmp_path, capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in (
        "pixels",
        "dinov2_vits14",
        "random:<...>",
        "digits",
        "shapes",
        "folder:<...>",
        "knn",
        "linear",
    ):
        assert name in out
    # every shipped card is listed with its protocol type and version
    from ssl_eval.protocols.cards import load_card, shipped_cards

    for card in shipped_cards():
        c = load_card(card)
        assert f"type={c.type} version={c.version}" in next(
            line for line in out.splitlines() if line.strip().startswith(card + " ")
        )


@pytest.mark.slow
def test_validate_and_suite(capsys, tmp_path):
    assert main(["validate"]) == 0
    out = capsys.readouterr().out
    for name in ("knn", "linear", "fewshot", "fewshot_episodic", "finetune", "standard"):
        assert f" {name}: ok" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nversion: 1\ntype: knn\nparams:\n  kk: [1]\n")
    assert main(["validate", str(bad)]) == 2
    assert "unknown key 'kk'" in capsys.readouterr().err
    assert main(["suites", "standard"]) == 0
    assert "knn, linear, fewshot, finetune" in capsys.readouterr().out


@pytest.mark.slow
def test_compare_two_backbones_paired(tmp_path, capsys):
    r = str(tmp_path / "r")
    for bb in ("pixels", "random:resnet10t"):
        assert (
            main(
                [
                    "run",
                    "--backbone",
                    bb,
                    "--image-size",
                    "16",
                    "--dataset",
                    "digits",
                    "--protocol",
                    "knn",
                    "--results-dir",
                    r,
                    "--no-progress",
                    "--no-leaderboard",
                ]
            )
            == 0
        )
    capsys.readouterr()
    assert main(["compare", "pixels", "random:resnet10t", "--results-dir", r]) == 0
    out = capsys.readouterr().out
    assert "digits / knn" in out and "McNemar p=" in out and "95% CI" in out
    assert main(["compare", "pixels", "nobody", "--results-dir", r]) == 2


@pytest.mark.slow
def test_multiple_seeds_give_a_spread_in_the_leaderboard(tmp_path, capsys):
    r = tmp_path / "r"
    assert (
        main(
            [
                "run",
                "--backbone",
                "pixels",
                "--dataset",
                "digits",
                "--protocol",
                "linear",
                "--seed",
                "0,1",
                "--set",
                "epochs=3",
                "--results-dir",
                str(r),
                "--no-progress",
            ]
        )
        == 0
    )
    recs = [x for x in load_records(r) if x.metric == "top1"]
    assert sorted(x.seed for x in recs) == [0, 1] and all(x.ci95 for x in recs)
    assert "(n=2)" in (r / "leaderboard.md").read_text()


def test_knn_does_not_depend_on_the_seed_so_it_runs_once_with_a_bootstrap_interval(
    tmp_path, capsys
):
    r = tmp_path / "r"
    assert (
        main(
            [
                "run",
                "--backbone",
                "pixels",
                "--dataset",
                "digits",
                "--protocol",
                "knn",
                "--seed",
                "0,1,2",
                "--results-dir",
                str(r),
                "--no-progress",
            ]
        )
        == 0
    )
    recs = [x for x in load_records(r) if x.metric == "top1"]
    assert (
        len(recs) == 1 and recs[0].seed_dependent is False and recs[0].ci_method == "bootstrap-test"
    )
    assert "does not depend on the seed" in capsys.readouterr().err
    md = (r / "leaderboard.md").read_text()
    assert "ᵇ" in md and "(n=3)" not in md and "± 0.00" not in md


@pytest.mark.slow
def test_seed_reaches_the_random_initialisation(tmp_path):
    r = tmp_path / "r"
    assert (
        main(
            [
                "run",
                "--backbone",
                "random:resnet10t",
                "--image-size",
                "16",
                "--dataset",
                "digits",
                "--protocol",
                "knn",
                "--seed",
                "0,1",
                "--results-dir",
                str(r),
                "--no-progress",
            ]
        )
        == 0
    )
    recs = [x for x in load_records(r) if x.metric == "top1"]
    assert sorted(x.seed for x in recs) == [0, 1]
    assert len({x.weights["sha256"] for x in recs}) == 2  # another network per seed
    assert {x.weights["source"] for x in recs} == {"random-init(seed=0)", "random-init(seed=1)"}
    assert len({x.setting["hash"] for x in recs}) == 1  # one setting, two replicates
    assert "(n=2)ˢ" in (r / "leaderboard.md").read_text()


def test_k_beyond_the_bank_is_refused_before_any_feature_is_extracted(tmp_path, capsys):
    image_folder(
        tmp_path / "data",
        {"train": 20, "val": 4},
        pixel=lambda c, i: 100 * c + i,
        shape=lambda c, i: (4, 4),
    )
    cache = tmp_path / "cache"
    code = main(
        [
            "run",
            "--backbone",
            "pixels",
            "--dataset",
            f"folder:{tmp_path / 'data'}",
            "--protocol",
            "knn",
            "--results-dir",
            str(tmp_path / "r"),
            "--cache-dir",
            str(cache),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert (
        code == 2
        and "k=100, 200 exceeds the 36 images of the bank" in err
        and "--set ks=[10,20]" in err
    )
    assert not (cache / "features").exists()  # refused before extraction


def test_one_class_dataset_is_refused(tmp_path, capsys):
    image_folder(
        tmp_path / "data",
        {"train": 5, "val": 5},
        classes=1,
        pixel=lambda c, i: i,
        shape=lambda c, i: (4, 4),
    )
    assert (
        main(
            [
                "run",
                "--backbone",
                "pixels",
                "--dataset",
                f"folder:{tmp_path / 'data'}",
                "--protocol",
                "knn",
                "--results-dir",
                str(tmp_path / "r"),
                "--no-progress",
            ]
        )
        == 2
    )
    assert "single class" in capsys.readouterr().err


@pytest.mark.slow
def test_top5_is_not_reported_with_five_or_fewer_classes(tmp_path, capsys):
    r = tmp_path / "r"
    assert (
        main(
            [
                "run",
                "--backbone",
                "pixels",
                "--dataset",
                "shapes:size",
                "--protocol",
                "knn",
                "--set",
                "ks=[10]",
                "--results-dir",
                str(r),
                "--no-progress",
            ]
        )
        == 0
    )
    recs = load_records(r)
    assert recs and not any(x.metric.startswith("top5") for x in recs)
    assert "top5_omitted" in recs[0].details and "top5=" not in capsys.readouterr().out


def test_arch_flag_reaches_the_backbone_builder(tmp_path, capsys):
    assert (
        main(
            [
                "run",
                "--backbone",
                "pixels",
                "--arch",
                "vit_small",
                "--dataset",
                "digits",
                "--protocol",
                "knn",
                "--results-dir",
                str(tmp_path / "r"),
                "--no-progress",
            ]
        )
        == 2
    )
    assert "--arch" in capsys.readouterr().err


def test_suite_list_names_the_protocols_of_some_models_and_datasets(capsys):
    """`suite --list` gives every protocol a suite runs: the default suite's ViT probes
    (arch_protocols) and its mIoU column (dataset_protocols) besides those of every backbone."""
    assert main(["suite", "--list"]) == 0
    (line,) = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("default:")]
    assert "; on vit_* models: attentive@capi, linear@dinov2" in line, line
    assert "; on shapes-seg alone: knnseg@capi" in line, line
