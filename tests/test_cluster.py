"""Sweeps through submitit's local executor (ssl_eval/orchestrate/sweep/): records identical to one process,
skip-existing reruns, a failed job shown by ``ssl-eval status`` and completed by resubmitting."""

import json
import os
from pathlib import Path

import pytest

from ssl_eval.cli import main
from ssl_eval.core.errors import UserError
from ssl_eval.core.files import file_lock, lock_path
from ssl_eval.orchestrate.sweep.executors import (
    ClusterOptions,
    _local_identity,
    _slurm_device,
    _slurm_parameters,
)
from ssl_eval.orchestrate.sweep.status import sweep_status
from ssl_eval.orchestrate.sweep.sweepfile import load_sweeps, record_jobs
from ssl_eval.records.store import load_records, records_dir

# 2 backbones x 1 dataset x 2 protocols; the linear grid cut to one head so the test is quick
# (an override, recorded in every record like any --set)
RUN = [
    "run",
    "--backbone",
    "pixels,random:resnet10t",
    "--dataset",
    "digits",
    "--image-size",
    "16",
    "--protocol",
    "knn,linear",
    "--set",
    "lrs=[0.1]",
    "--set",
    "weight_decays=[0.0]",
    "--set",
    "min_steps=20",
    "--no-progress",
    "--no-leaderboard",
]
SWEEP = ["--executor", "local", "--poll-seconds", "0.3"]
# what differs between two runs of the same unit: when and how fast, not what was computed
TIMING = {"run_id", "time", "wall_time_s", "peak_memory_mb"}


def _comparable(results: Path) -> dict:
    out = {}
    for r in load_records(results):
        d = r.to_dict()
        d["details"] = {k: v for k, v in d["details"].items() if k != "feature_seconds"}
        out[(r.unit, r.metric)] = {k: v for k, v in d.items() if k not in TIMING}
    return out


def _record_files(results: Path) -> set[str]:
    return {p.name for p in records_dir(results).glob("*.json")}


def _status(results: Path, capsys) -> str:
    capsys.readouterr()
    assert main(["status", "--results-dir", str(results)]) == 0
    return capsys.readouterr().out


@pytest.mark.slow
def test_local_sweep_records_are_those_of_one_process_and_a_rerun_submits_nothing(tmp_path, capsys):
    one, swept = tmp_path / "one", tmp_path / "swept"
    # separate feature caches: the jobs extract their own features
    assert main([*RUN, "--results-dir", str(one), "--cache-dir", str(tmp_path / "c1")]) == 0
    args = [*RUN, *SWEEP, "--results-dir", str(swept), "--cache-dir", str(tmp_path / "c2")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "4 unit(s) planned on cpu, 2 job(s) submitted" in out

    a, b = _comparable(one), _comparable(swept)
    assert len(a) > 4 and a.keys() == b.keys()
    for k in a:
        assert a[k] == b[k], k  # values, intervals, settings, cards, seeds, devices

    (sweep,) = load_sweeps(swept)
    assert {u["key"] for u in sweep["units"]} == {unit for unit, _ in a}  # plan() == run()
    assert sorted(len(j["units"]) for j in sweep["jobs"]) == [2, 2]  # one job per backbone
    assert "4 unit(s): 4 done, 0 running, 0 pending, 0 failed" in _status(swept, capsys)

    files = _record_files(swept)
    assert main(args) == 0  # a rerun: every unit is recorded, nothing is submitted
    assert "0 job(s) submitted" in capsys.readouterr().out
    assert len(load_sweeps(swept)[0]["jobs"]) == 2 and _record_files(swept) == files


@pytest.mark.slow
def test_a_failed_job_shows_in_status_and_a_resubmission_completes_only_the_missing_units(
    tmp_path, capsys, monkeypatch
):
    results = tmp_path / "r"
    # one backbone (one job) keeps it quick: the two-backbone sweep is tested above
    args = [*RUN, *SWEEP, "--results-dir", str(results)]
    args[args.index("pixels,random:resnet10t")] = "pixels"
    # the job is killed once its first record is in place: its second unit is never written
    monkeypatch.setenv("SSL_EVAL_TEST_KILL_AT", "after-write:????????????????????-*.json")
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "2 unit(s): 1 done, 0 running, 0 pending, 1 failed" in out
    status = _status(results, capsys)
    assert "2 unit(s): 1 done, 0 running, 0 pending, 1 failed" in status
    (failed,) = [ln for ln in status.splitlines() if ln.startswith("failed\t")]
    assert failed.split("\t")[3] == "linear" and "without it; stderr: " in failed
    first = _record_files(results)
    assert len(first) == 1

    monkeypatch.delenv("SSL_EVAL_TEST_KILL_AT")
    assert main(args) == 0
    assert "1 job(s) submitted" in capsys.readouterr().out
    assert "2 unit(s): 2 done, 0 running, 0 pending, 0 failed" in _status(results, capsys)
    now = _record_files(results)
    assert first < now and len(now) == 2  # the finished unit kept, not redone
    (sweep,) = load_sweeps(results)
    assert [len(j["units"]) for j in sweep["jobs"]] == [2, 1]  # resubmitted: the missing one


def _fake_sweep(results: Path, job_id: str, folder: Path, identity: str | None = None) -> None:
    units = [
        {"key": k, "backbone": "pixels", "dataset": "digits", "protocol": p, "seed": None}
        for k, p in (("a" * 20, "knn"), ("b" * 20, "linear"))
    ]
    job = {
        "job_id": job_id,
        "identity": identity,
        "executor": "local",
        "submitted": "2026-01-01T00:00:00+00:00",
        "folder": str(folder),
        "units": [u["key"] for u in units],
    }
    record_jobs(results, "s1", units, {}, [job])


def test_status_reads_unit_locks_and_job_liveness(tmp_path):
    results, folder = tmp_path / "r", tmp_path / "jobs" / "123"
    folder.mkdir(parents=True)
    _fake_sweep(results, str(os.getpid()), folder)  # a live job: this process
    states = {s.protocol: s for s in sweep_status(results)}
    assert {s.state for s in states.values()} == {"running"}
    with file_lock(lock_path(records_dir(results) / ("a" * 20))):
        states = {s.protocol: s for s in sweep_status(results)}
        assert states["knn"].detail == "evaluating"  # its unit lock is held

    # the pid lives, but it is another process than the job's (the pid was reused)
    reused = tmp_path / "r3"
    _fake_sweep(reused, str(os.getpid()), folder, identity="1")
    assert {s.state for s in sweep_status(reused)} == {"failed"}
    mine = _local_identity(str(os.getpid()))
    _fake_sweep(tmp_path / "r4", str(os.getpid()), folder, identity=mine)
    assert {s.state for s in sweep_status(tmp_path / "r4")} == {"running"}

    dead = tmp_path / "r2"
    (folder / "999999999_0_log.err").write_text("Traceback ...\nRuntimeError: out of memory\n\n")
    _fake_sweep(dead, "999999999", folder)  # no such process: the job ended
    states = sweep_status(dead)
    assert {s.state for s in states} == {"failed"}
    assert states[0].detail == "job FINISHED without it; stderr: RuntimeError: out of memory"


def test_status_without_a_sweep_or_a_record_is_one_line(tmp_path, capsys):
    assert main(["status", "--results-dir", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--executor local|slurm" in err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--executor", "locl"], "Did you mean 'local'"),
        (["--no-wait"], "--no-wait applies to a sweep"),
        (["--executor", "slurm", "--device", "cuda"], "--gpus-per-node 0"),
    ],
)
def test_sweep_option_errors_are_one_line(tmp_path, capsys, extra, message):
    assert main(["run", "--backbone", "pixels", "--results-dir", str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_slurm_jobs_get_the_device_decided_at_submission():
    gpu = ClusterOptions(
        executor="slurm", gpus_per_node=1, slurm_partition="p", array_parallelism=4
    )
    assert _slurm_device("auto", gpu) == "cuda"
    assert _slurm_device("auto", ClusterOptions(executor="slurm")) == "cpu"
    p = _slurm_parameters(gpu)
    assert p["slurm_partition"] == "p" and p["slurm_array_parallelism"] == 4
    assert p["gpus_per_node"] == 1


def test_a_damaged_sweep_file_is_one_line(tmp_path, capsys):
    (tmp_path / "sweeps").mkdir()
    (tmp_path / "sweeps" / "x.json").write_text(
        json.dumps({"version": 1, "units": [{"key": "k"}], "jobs": []})
    )
    assert main(["status", "--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "damaged" in err


TINY_SUITE = """
name: tiny
version: 1
description: test-sized suite, one baseline
datasets: [digits]
image_size: 16
baselines: [pixels]
protocols: [knn, finetune]
"""


@pytest.mark.slow
def test_a_suite_evaluates_as_a_local_sweep(tmp_path, capsys):
    (tmp_path / "tiny.yaml").write_text(TINY_SUITE)
    results = tmp_path / "r"
    args = ["suite", str(tmp_path / "tiny.yaml"), "--results-dir", str(results), "--no-progress"]
    assert main([*args, "--no-report", "--reference", "none", *SWEEP]) == 0
    assert "0 model(s) trained, 1 unit(s) evaluated, 0 reused" in capsys.readouterr().out
    (sweep,) = load_sweeps(results)
    assert [j["units"] for j in sweep["jobs"]] == [[sweep["units"][0]["key"]]]
    manifest = json.loads((results / "suite.json").read_text())
    assert manifest["units"]["not_applicable"] == ["pixels x finetune"]  # said, not dropped
    assert "| pixels |" in (results / "leaderboard.md").read_text()
    assert main([*args, "--executor", "local", "--no-wait"]) == 2  # its tables need the records
    assert "drop --no-wait" in capsys.readouterr().err


def test_a_job_refuses_to_run_code_other_than_what_planned_it(tmp_path):
    from ssl_eval.core.config import RunConfig
    from ssl_eval.orchestrate.sweep.job import environment, run_job
    from ssl_eval.protocols.cards import load_cards

    cfg = RunConfig(("pixels",), ("digits",), load_cards(["knn"], []), results_dir=tmp_path)
    with pytest.raises(UserError, match="changed since this sweep was planned"):
        run_job(cfg, planned_in="0" * 16)
    assert not records_dir(tmp_path).exists()  # refused before any work
    assert len(environment()) == 16 and environment() == environment()


def test_plan_lists_every_unit_in_run_order_with_seeds_and_what_does_not_apply():
    """Two seeds: a pretrained-like backbone's k-NN runs once (seed None), a seeded random
    initialisation is another network per seed, and a training protocol on a backbone without
    trainable parameters is listed as not applying, per seed, under skip_inapplicable."""
    import torch

    from ssl_eval.core.config import RunConfig
    from ssl_eval.orchestrate.evaluate import plan
    from ssl_eval.protocols.cards import load_cards

    cards = load_cards(["knn", "finetune"], [])
    cfg = RunConfig(
        ("pixels", "random:resnet10t"), ("digits",), cards, seeds=(0, 1), skip_inapplicable=True
    )
    units = plan(cfg, torch.device("cpu"))
    got = [(u.backbone, u.protocol, u.seed, u.applies) for u in units]
    assert got == [
        ("pixels", "knn", None, True),
        ("pixels", "finetune", 0, False),
        ("pixels", "finetune", 1, False),
        ("random:resnet10t", "knn", 0, True),
        ("random:resnet10t", "finetune", 0, True),
        ("random:resnet10t", "knn", 1, True),
        ("random:resnet10t", "finetune", 1, True),
    ]
    keys = [u.key for u in units if u.applies]
    assert all(keys) and len(set(keys)) == len(keys)
    assert all(u.key == "" for u in units if not u.applies)
    # seed 1's unit is keyed on the network initialised with seed 1 (its weights' sha256)
    from ssl_eval.backbones import BuildOptions, build_backbone
    from ssl_eval.data.datasets import DatasetOptions, get_dataset
    from ssl_eval.orchestrate.evaluate import unit_key

    bb1 = build_backbone("random:resnet10t", BuildOptions(seed=1))
    bundle = get_dataset("digits", DatasetOptions(None, False, None))
    want = unit_key(bb1, bundle, cards[0], cfg, 1, torch.device("cpu"))
    assert units[5].key == want
