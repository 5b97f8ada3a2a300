"""``--deterministic``: pinned CPU kernels give one set of trained weights whatever kernel
paths the CPU would pick (emulated here as in benchmarks/bench_determinism.py: ATen's scalar
kernels, oneDNN's AVX2 ISA, four threads), the pins are read back and recorded, and a run whose
pins did not take effect is refused rather than labelled deterministic."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ssl_eval.core.errors import UserError
from ssl_eval.train import determinism

ARGS = [
    "train",
    "--method",
    "simclr",
    "--arch",
    "cifar_resnet_tiny",
    "--dataset",
    "digits",  # scikit-learn's digits: no images to generate (shapes took 4 s of each run)
    "--image-size",
    "16",
    "--train-subset",
    "384",
    "--epochs",
    "1",
    "--batch-size",
    "128",
    "--device",
    "cpu",
]
# another CPU, as far as this one can play it: ATen's scalar kernels instead of AVX-512/AVX2,
# oneDNN limited to AVX2, four threads instead of the machine's own
OTHER_MACHINE = {
    "ATEN_CPU_CAPABILITY": "default",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "OMP_NUM_THREADS": "4",
}


def _env(extra: dict) -> dict:
    env = {
        k: v for k, v in os.environ.items() if k not in (*determinism.ENVIRONMENT, *OTHER_MACHINE)
    }
    env.update(extra)
    return env


def _train(out: Path, extra_env: dict, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ssl_eval", *ARGS, "--out", str(out), *flags],
        env=_env(extra_env),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _weights(folder: Path) -> str:
    return hashlib.sha256((folder / "backbone.safetensors").read_bytes()).hexdigest()


def _avx2_cpu() -> bool:
    try:
        determinism.check_supported()
    except UserError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _avx2_cpu(), reason="needs an x86-64 CPU with AVX2 and FMA")
def test_pinned_weights_do_not_depend_on_the_kernel_paths(tmp_path):
    runs = {
        "pinned": _train(tmp_path / "pinned", {}, "--deterministic"),
        "pinned-other": _train(tmp_path / "pinned-other", OTHER_MACHINE, "--deterministic"),
        "free": _train(tmp_path / "free", {}),
        "free-other": _train(tmp_path / "free-other", OTHER_MACHINE),
    }
    for name, r in runs.items():
        assert r.returncode == 0, (name, r.stderr[-2000:])
    w = {name: _weights(tmp_path / name) for name in runs}
    # the emulation bites: unpinned, the other kernel paths train other weights
    assert w["free"] != w["free-other"]
    # pinned, they do not
    assert w["pinned"] == w["pinned-other"]
    assert "overrode ATEN_CPU_CAPABILITY=avx2 (was default)" in runs["pinned-other"].stderr

    side = json.loads((tmp_path / "pinned" / "backbone.json").read_text())
    assert side["train_config"]["deterministic"] is True
    assert side["determinism"] == {
        **determinism.EXPECTED,
        "torch": side["determinism"]["torch"],
    }
    assert json.loads((tmp_path / "free" / "backbone.json").read_text())["determinism"] is None

    # the evaluation's record of the training says so; the recipe is the unpinned one's
    from ssl_eval.backbones.families.trained import build_from_training_dir

    pinned = build_from_training_dir(tmp_path / "pinned").load_report["training"]
    free = build_from_training_dir(tmp_path / "free").load_report["training"]
    assert pinned["determinism"]["aten_cpu_capability"] == "AVX2"
    assert free["determinism"] is None
    assert pinned["recipe"] == free["recipe"]


@pytest.mark.slow
def test_refused_when_torch_ran_before_the_pins(tmp_path):
    """The ATen capability is fixed at torch's first operation: a process that ran one before
    asking for --deterministic cannot honour it and must not train under that name."""
    code = (
        "import sys, torch; torch.ones(2) + 1\n"
        "from ssl_eval.cli import main\n"
        f"sys.exit(main({[*ARGS, '--out', str(tmp_path / 'x'), '--deterministic']!r}))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        env=_env({"ATEN_CPU_CAPABILITY": "default"}),
        capture_output=True,
        text=True,
        timeout=300,
    )
    if not _avx2_cpu():
        assert r.returncode == 2 and "lacks" in r.stderr
        return
    assert r.returncode == 2, r.stderr[-2000:]
    err = r.stderr.strip().splitlines()[-1]
    assert err.startswith("ssl-eval: error: deterministic training could not pin")
    assert "aten_cpu_capability" in err and "Traceback" not in r.stderr
    assert not (tmp_path / "x" / "backbone.safetensors").exists()


def test_unsupported_cpus_are_refused():
    with pytest.raises(UserError, match="this machine is aarch64"):
        determinism.check_supported("aarch64", {"avx2", "fma"})
    with pytest.raises(UserError, match="lacks avx2, fma"):
        determinism.check_supported("x86_64", {"sse2"})
    determinism.check_supported("x86_64", {"sse2", "avx2", "fma"})


def test_gpu_training_is_refused():
    with pytest.raises(UserError, match="CPU training only"), determinism.pinned("cuda"):
        pass


def test_suite_trains_pinned_runs_into_their_own_folders():
    """A pinned run never reuses unpinned weights (the config, hence the folder key, differs)
    and stays a run of the same recipe (the record's recipe hash ignores the pins)."""
    from ssl_eval.backbones.families.trained import _training_report
    from ssl_eval.core.files import sha256_json
    from ssl_eval.orchestrate.suite import load_job_suite
    from ssl_eval.orchestrate.suite.runner import _resolved_train_config

    suite = load_job_suite("quick")
    m = suite.models[0]
    free = _resolved_train_config(suite, m, "cpu", 0).to_dict()
    pinned = _resolved_train_config(suite, m, "cpu", 0, deterministic=True).to_dict()
    assert pinned["deterministic"] is True and free["deterministic"] is False
    assert sha256_json(free) != sha256_json(pinned)
    rec = {
        k: _training_report({"train_config": c}, False)["recipe"]
        for k, c in (("f", free), ("p", pinned))
    }
    assert rec["f"] == rec["p"]
