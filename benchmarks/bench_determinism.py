"""Bitwise-reproducible CPU training: does a deterministic mode make the trained weights
identical across CPU kernel paths, and at what cost in speed?

Training is deterministic on one machine but another CPU gives other weights. On one machine
the kernel paths of another can be partly emulated; each *machine* below is such an emulation,
set in the environment of a fresh process (before torch is imported):

  native        nothing pinned (this CPU: ATen AVX512, oneDNN at its best ISA, all cores)
  aten-avx2     ATEN_CPU_CAPABILITY=avx2     ATen's vectorised kernels of an AVX2-only CPU
  aten-default  ATEN_CPU_CAPABILITY=default  ATen's scalar kernels (any x86-64)
  onednn-avx2   ONEDNN_MAX_CPU_ISA=AVX2      oneDNN's (convolution) kernels of an AVX2 CPU
  threads-4     torch.set_num_threads(4)     a CPU with more cores (oversubscribed here;
                                             OMP_NUM_THREADS=4 left torch at 2 threads)

Each *mode* is a set of pins a deterministic option could apply on every machine:

  none              nothing
  mkl-cbwr          MKL_CBWR=COMPATIBLE (MKL's conditional numerical reproducibility)
  no-onednn-nnpack  torch.backends.mkldnn.enabled = False and NNPACK off (convolutions by
                    im2col + MKL GEMM, ATen's slow path)
  threads-1         OMP_NUM_THREADS=MKL_NUM_THREADS=1 and torch.set_num_threads(1)
  det-algos         torch.use_deterministic_algorithms(True)
  all               the four above together
  pinned-avx2       mkl-cbwr, no-onednn-nnpack and threads-1 (not det-algos: it changed no
                    weights and costs a NaN fill of every new tensor), and
                    ATEN_CPU_CAPABILITY=avx2 pinned (it wins over the machine's)
  pinned-default    the same with ATEN_CPU_CAPABILITY=default (scalar ATen kernels)

A short training of the quick suite's SimCLR recipe (protocols/jobs/quick.yaml: its
train_defaults and the simclr model's config, cifar_resnet_tiny at 16x16 on shapes) with
train_subset and epochs cut down, runs once per (mode, machine) in a fresh process; the sha256
of its backbone.safetensors is compared across the machines of a mode. Then the modes in TIMING
run twice more on the native machine, interleaved (which also checks that a configuration
repeats bit for bit). Times: "steps" is the training steps alone (the sum of
the history's per-epoch wall_s; data generation, monitor and checkpoints left out), "train" the
train() call, "process" the whole process; a mode's ratio ("x") is its fastest native run over
the fastest unpinned native run (the CPU is shared: the fastest run is the least disturbed).

A kernel probe first runs a GEMM, a convolution and a reduction on fixed inputs (numpy-drawn)
under each single environment variable, to show which variables change kernels on this CPU
(MKL_ENABLE_INSTRUCTIONS and MKL_CBWR=AVX2/AVX512 cannot emulate an Intel CPU's MKL path on AMD).

Writes results/benchmarks/bench_determinism.json and bench_determinism.md.

Usage: python benchmarks/bench_determinism.py [--train-subset 1000] [--epochs 2]
       [--compare OTHER_MACHINE/bench_determinism.json] [--out-dir DIR]

On another CPU (an Intel Xeon, say), run it with --out-dir elsewhere and --compare
results/benchmarks/bench_determinism.json: the pinned modes' weights should match this
machine's if the deterministic mode holds across CPUs (same torch build required).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = "BENCH_DETERMINISM_RESULT "

# every variable a machine or a mode sets; removed from the inherited environment first
PIN_VARS = (
    "ATEN_CPU_CAPABILITY",
    "MKL_CBWR",
    "MKL_ENABLE_INSTRUCTIONS",
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "MKL_VERBOSE",
    "ONEDNN_VERBOSE",
    "DNNL_VERBOSE",
)

# machine -> (env, torch settings)
MACHINES = {
    "native": ({}, {}),
    "aten-avx2": ({"ATEN_CPU_CAPABILITY": "avx2"}, {}),
    "aten-default": ({"ATEN_CPU_CAPABILITY": "default"}, {}),
    "onednn-avx2": ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, {}),
    "threads-4": ({}, {"threads": 4}),
}

# mode -> (env, torch settings); a mode's env wins over the machine's
THREADS_1 = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
ALL_ENV = {"MKL_CBWR": "COMPATIBLE", **THREADS_1}
ALL_TORCH = {"no_onednn_nnpack": True, "threads": 1, "det_algos": True}
PINNED_TORCH = {"no_onednn_nnpack": True, "threads": 1}
MODES = {
    "none": ({}, {}),
    "mkl-cbwr": ({"MKL_CBWR": "COMPATIBLE"}, {}),
    "no-onednn-nnpack": ({}, {"no_onednn_nnpack": True}),
    "threads-1": (THREADS_1, {"threads": 1}),
    "det-algos": ({}, {"det_algos": True}),
    "all": (ALL_ENV, ALL_TORCH),
    "pinned-avx2": ({**ALL_ENV, "ATEN_CPU_CAPABILITY": "avx2"}, PINNED_TORCH),
    "pinned-default": ({**ALL_ENV, "ATEN_CPU_CAPABILITY": "default"}, PINNED_TORCH),
}
ATEN = ["native", "aten-avx2", "aten-default"]
# (mode, machines): the unpinned mode and "all" on every machine that mode does not override;
# the pinned modes on machines whose setting they override, as a check that they do
PLAN = [
    ("none", list(MACHINES)),
    ("mkl-cbwr", ATEN),
    ("no-onednn-nnpack", ATEN),
    ("threads-1", ATEN),
    ("det-algos", ATEN),
    ("all", ["native", "aten-avx2", "aten-default", "onednn-avx2"]),
    ("pinned-avx2", ["native", "aten-default", "onednn-avx2", "threads-4"]),
    ("pinned-default", ["native", "aten-avx2", "onednn-avx2"]),
]
# two more runs of these on the native machine, after the matrix, interleaved: the timing
# figures are the fastest of each mode's runs (the CPU is shared), and each repeats bit for bit
TIMING = ["none", "threads-1", "pinned-avx2", "pinned-default"] * 2

PROBE_ENVS = [
    {},
    {"ATEN_CPU_CAPABILITY": "avx2"},
    {"ATEN_CPU_CAPABILITY": "default"},
    {"MKL_CBWR": "COMPATIBLE"},
    {"MKL_CBWR": "AVX2"},
    {"MKL_CBWR": "AVX512"},
    {"MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
    {"ONEDNN_MAX_CPU_ISA": "AVX2"},
    {"OMP_NUM_THREADS": "1"},
]


def recipe_settings(train_subset: int, epochs: int) -> dict:
    """The quick suite's SimCLR training settings, as the suite resolves them
    (suite/runner.py: train_defaults updated by the model's config), cut down."""
    import yaml

    from ssl_eval.core.config import deep_update

    q = yaml.safe_load((ROOT / "protocols/jobs/quick.yaml").read_text())
    model = next(m for m in q["models"] if m["name"] == "simclr")
    s = deep_update(dict(q["train_defaults"]), dict(model.get("config") or {}))
    s.update(train_subset=train_subset, epochs=epochs, device="cpu")
    s.setdefault("image_size", q["image_size"])
    return s


def _apply_torch(settings: dict) -> None:
    import torch

    if settings.get("threads"):
        torch.set_num_threads(int(settings["threads"]))
    if settings.get("no_onednn_nnpack"):
        torch.backends.mkldnn.enabled = False
        torch.backends.nnpack.set_flags(False)
    if settings.get("det_algos"):
        torch.use_deterministic_algorithms(True)


def _kernel_info() -> dict:
    """What the process actually runs: ATen's capability, threads, and MKL's CNR mode as
    MKL_VERBOSE reports it for one GEMM (printed on stdout by MKL)."""
    import torch

    sys.stdout.flush()
    with torch.backends.mkl.verbose(torch.backends.mkl.VERBOSE_ON):
        torch.ones(64, 64) @ torch.ones(64, 64)
    return {
        "aten_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "mkldnn_enabled": torch.backends.mkldnn.enabled,
        "nnpack_enabled": torch._C._get_nnpack_enabled(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
    }


def child_train(spec: dict) -> dict:
    t0 = time.perf_counter()
    import torch  # noqa: F401  (the import is part of the process's start-up time)

    _apply_torch(spec["torch"])
    from ssl_eval.train.loop import train
    from ssl_eval.train.resolve import resolve_config

    s = dict(spec["settings"])
    image_size = int(s.pop("image_size"))
    cfg = resolve_config("simclr", image_size, None, s, [])
    t1, c1 = time.perf_counter(), time.process_time()
    side = train(cfg, Path(spec["out"]), log=lambda _line: None)
    train_s = time.perf_counter() - t1
    train_cpu_s = time.process_time() - c1  # every thread of the process
    steps_s = sum(h["wall_s"] for h in side.get("history", []))
    weights = Path(spec["out"]) / "backbone.safetensors"
    return {
        "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "train_s": train_s,
        "steps_s": steps_s,
        "train_cpu_s": train_cpu_s,
        "startup_s": t1 - t0,
        "loss": side.get("final_diagnostics", {}).get("loss"),
        **_kernel_info(),
    }


def child_probe() -> dict:
    import numpy as np
    import torch

    rng = np.random.default_rng(0)  # inputs not drawn by ATen (its normal_ is vectorised)
    a = torch.from_numpy(rng.standard_normal((257, 1000), dtype=np.float32))
    b = torch.from_numpy(rng.standard_normal((1000, 129), dtype=np.float32))
    x = torch.from_numpy(rng.standard_normal((64, 32, 16, 16), dtype=np.float32))
    w = torch.from_numpy(rng.standard_normal((32, 32, 3, 3), dtype=np.float32))
    s = torch.from_numpy(rng.standard_normal((4000, 1000), dtype=np.float32))

    def h(t: torch.Tensor) -> str:
        return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:12]

    return {
        "gemm": h(a @ b),
        "conv": h(torch.nn.functional.conv2d(x, w, padding=1)),
        "sum": h(s.sum(0)),
        "softmax": h(torch.softmax(a, 1)),
        "normal_": h(torch.empty(1000).normal_(generator=torch.Generator().manual_seed(0))),
    }


def _env(extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in PIN_VARS}
    env.update(extra)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _spawn(kind: str, payload: dict, env: dict) -> tuple[dict, float, str]:
    t0 = time.perf_counter()
    p = subprocess.run(
        [sys.executable, __file__, "--child", kind, json.dumps(payload)],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    wall = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"child {kind} {payload} failed:\n{p.stderr[-3000:]}")
    lines = p.stdout.splitlines()
    res = json.loads(next(x for x in reversed(lines) if x.startswith(RESULT))[len(RESULT) :])
    return res, wall, p.stdout


def _cnr(stdout: str) -> str | None:
    for line in stdout.splitlines():
        if line.startswith("MKL_VERBOSE") and "CNR:" in line:
            return line.split("CNR:")[1].split()[0]
    return None


def _compare(path: Path, runs: list[dict], info: dict, a: argparse.Namespace) -> dict:
    """This run's weights against another machine's bench_determinism.json, per (mode, machine)
    both ran (the first run of each): the cross-CPU check an emulation cannot make."""
    other = json.loads(path.read_text())
    theirs: dict = {}
    for r in other["runs"]:
        theirs.setdefault((r["mode"], r["machine"]), r["sha256"])
    rows, seen = [], set()
    for r in runs:
        key = (r["mode"], r["machine"])
        if key in theirs and key not in seen:
            seen.add(key)
            rows.append(
                {
                    "mode": key[0],
                    "machine": key[1],
                    "this": r["sha256"],
                    "other": theirs[key],
                    "same": r["sha256"] == theirs[key],
                }
            )
    rec = other.get("recipe", {})
    return {
        "file": str(path),
        "other": other.get("machine", {}),
        "same_recipe": (rec.get("train_subset"), rec.get("epochs")) == (a.train_subset, a.epochs),
        "same_torch": other.get("machine", {}).get("torch") == info["torch"],
        "rows": rows,
    }


def machine_info() -> dict:
    import torch

    cpu, flags = "?", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "?":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    cfg = torch.__config__.show()

    def lib(tag: str) -> str:
        return next((x.strip(" -") for x in cfg.splitlines() if tag in x), "?")

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip()
    except OSError:
        commit = "?"
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "isa": sorted(f for f in flags if f in {"avx2", "fma", "avx512f", "avx512_bf16"}),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "mkl": lib("Math Kernel Library"),
        "onednn": lib("MKL-DNN"),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "date": datetime.date.today().isoformat(),
        "commit": commit,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-subset", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--out-dir", type=Path, default=ROOT / "results" / "benchmarks")
    ap.add_argument(
        "--compare",
        type=Path,
        help="a bench_determinism.json of another machine (another CPU): say which weights match",
    )
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        kind, payload = a.child
        res = child_train(json.loads(payload)) if kind == "train" else child_probe()
        print(RESULT + json.dumps(res), flush=True)
        return

    from ssl_eval.core.files import atomic_write_json, atomic_write_text

    info = machine_info()
    settings = recipe_settings(a.train_subset, a.epochs)
    t_start = time.perf_counter()
    print(f"{info['cpu']}, {info['cpus']} cpus, torch {info['torch']}", flush=True)

    probe = []
    for extra in PROBE_ENVS:
        res, _, _ = _spawn("probe", {}, _env(extra))
        probe.append({"env": extra, **res})
        print(f"probe {extra or 'none'}: {res}", flush=True)

    runs = []
    order = [(mode, m, False) for mode, machines in PLAN for m in machines]
    order += [(mode, "native", True) for mode in TIMING]
    with tempfile.TemporaryDirectory(prefix="bench_det_") as tmp:
        for i, (mode, machine, timing) in enumerate(order):
            xenv, xtorch = MACHINES[machine]
            menv, mtorch = MODES[mode]
            env, torch_settings = {**xenv, **menv}, {**xtorch, **mtorch}
            spec = {"settings": settings, "torch": torch_settings, "out": f"{tmp}/run{i}"}
            load = os.getloadavg()[0]
            res, wall, stdout = _spawn("train", spec, _env(env))
            res.update(
                mode=mode,
                machine=machine,
                timing_round=timing,
                env=env,
                torch_settings=torch_settings,
                process_s=wall,
                mkl_cnr=_cnr(stdout),
                loadavg_1min=load,
            )
            runs.append(res)
            print(
                f"{mode:17s} {machine:13s} {res['sha256'][:12]} steps {res['steps_s']:5.1f}s "
                f"train {res['train_s']:5.1f}s process {wall:5.1f}s "
                f"aten={res['aten_capability']} threads={res['threads']} "
                f"cnr={res['mkl_cnr']} mkldnn={res['mkldnn_enabled']} load={load:.2f}",
                flush=True,
            )

    def fastest(mode: str, key: str) -> float:
        return min(r[key] for r in runs if r["mode"] == mode and r["machine"] == "native")

    base = {k: fastest("none", k) for k in ("steps_s", "train_s", "process_s")}
    for r in runs:
        r["x_steps"] = r["steps_s"] / base["steps_s"]
    modes = {}
    for mode, machines in PLAN:
        rs = [r for r in runs if r["mode"] == mode]
        ref = next(r for r in rs if r["machine"] == "native")["sha256"]
        for r in rs:
            r["same_as_native"] = r["sha256"] == ref
        main_rs = [r for r in rs if not r["timing_round"]]
        aten = {r["sha256"] for r in main_rs if r["machine"] in ATEN}
        native = [r for r in rs if r["machine"] == "native"]
        modes[mode] = {
            "machines": machines,
            "distinct_weights": len({r["sha256"] for r in main_rs}),
            "identical_across_machines": len({r["sha256"] for r in main_rs}) == 1,
            "identical_across_aten_capabilities": (
                len(aten) == 1 if sum(r["machine"] in ATEN for r in main_rs) > 1 else None
            ),
            "native_runs_identical": len({r["sha256"] for r in native}) == 1,
            "native_steps_s": [r["steps_s"] for r in native],
            "x_steps": fastest(mode, "steps_s") / base["steps_s"],
            "x_train": fastest(mode, "train_s") / base["train_s"],
            "x_process": fastest(mode, "process_s") / base["process_s"],
        }
    total_s = time.perf_counter() - t_start
    compare = _compare(a.compare, runs, info, a) if a.compare else None
    cmd = "python benchmarks/bench_determinism.py" + (
        f" --train-subset {a.train_subset} --epochs {a.epochs}"
    )
    out = {
        "benchmark": "bench_determinism",
        "command": cmd,
        "machine": info,
        "recipe": {
            "source": "protocols/jobs/quick.yaml, model simclr",
            "method": "simclr",
            **settings,
        },
        "timing": (
            "steps_s: the training steps (the history's per-epoch wall_s: no data generation, "
            "monitor or checkpoint); train_s: the whole train() call; process_s: the process. "
            "x_*: a mode's fastest native run over the fastest unpinned native run."
        ),
        "baseline_fastest": base,
        "modes": modes,
        "runs": runs,
        "kernel_probe": probe,
        "total_s": total_s,
        "compare": compare,
    }
    a.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(a.out_dir / "bench_determinism.json", out)

    repeats = [m for m in modes.values() if len(m["native_steps_s"]) > 1]
    repeat_ok = all(m["native_runs_identical"] for m in repeats)
    lines = [
        "# bench_determinism",
        "",
        f"command: {cmd}  ({info['cpu']}, {info['cpus']} cpus, ISA {' '.join(info['isa'])}; "
        f"torch {info['torch']}, {info['mkl']}, {info['onednn']}; {info['date']}, "
        f"commit {info['commit']})",
        "",
        f"recipe: quick suite SimCLR (cifar_resnet_tiny, 16x16, shapes), train_subset "
        f"{a.train_subset}, {a.epochs} epochs, batch {settings.get('batch_size')}. Times: "
        "steps = the training steps only (history wall_s), train = the train() call (data "
        "generation, monitor, checkpoints included), train CPU = its CPU time over all "
        "threads, process = the whole process; x = over the "
        "fastest unpinned native run "
        f"({base['steps_s']:.1f} s of steps). Repeated runs of one configuration (the "
        f"timing rows): {'the same weights, every time' if repeat_ok else 'OTHER weights'}. "
        "load = the 1-minute load average when the run started (2 CPUs, shared).",
        "",
        "| mode | machine | weights sha256 | = native (same mode) | steps s | x | train s | "
        "train CPU s | process s | ATen | threads | MKL CNR | oneDNN | load |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---|---:|---|---|---:|",
    ]
    for r in runs:
        name = r["mode"] + (" (timing)" if r["timing_round"] else "")
        lines.append(
            f"| {name} | {r['machine']} | `{r['sha256'][:12]}` | "
            f"{'yes' if r.get('same_as_native') else 'NO'} | {r['steps_s']:.1f} | "
            f"{r['x_steps']:.2f} | {r['train_s']:.1f} | {r['train_cpu_s']:.1f} | "
            f"{r['process_s']:.1f} | "
            f"{r['aten_capability']} | {r['threads']} | {r['mkl_cnr']} | "
            f"{'on' if r['mkldnn_enabled'] else 'off'} | {r['loadavg_1min']:.1f} |"
        )
    lines += [
        "",
        "| mode | machines | distinct weights | identical across ATen capabilities | "
        "native runs | fastest native steps s | x steps | x train | x process |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for mode, m in modes.items():
        ia = m["identical_across_aten_capabilities"]
        lines.append(
            f"| {mode} | {', '.join(m['machines'])} | {m['distinct_weights']} | "
            f"{'-' if ia is None else ('yes' if ia else 'no')} | "
            f"{len(m['native_steps_s'])}{'' if m['native_runs_identical'] else ' (DIFFER)'} | "
            f"{min(m['native_steps_s']):.2f} | {m['x_steps']:.2f} | "
            f"{m['x_train']:.2f} | {m['x_process']:.2f} |"
        )
    keys = ["gemm", "conv", "sum", "softmax", "normal_"]
    lines += [
        "",
        "kernel probe (sha256 prefix of each op's output on fixed inputs; * = differs from none):",
        "",
        "| env | " + " | ".join(keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    p0 = probe[0]
    for p in probe:
        name = " ".join(f"{k}={v}" for k, v in p["env"].items()) or "none"
        cells = [f"`{p[k]}`{'' if p[k] == p0[k] else ' *'}" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if compare:
        other = compare["other"]
        lines += [
            "",
            f"compared with {compare['file']} ({other.get('cpu')}, torch {other.get('torch')}, "
            f"{other.get('date')}){'' if compare['same_recipe'] else ': ANOTHER RECIPE'}:",
            "",
            "| mode | machine | this | other | same weights |",
            "|---|---|---|---|---|",
        ]
        for c in compare["rows"]:
            lines.append(
                f"| {c['mode']} | {c['machine']} | `{c['this'][:12]}` | `{c['other'][:12]}` | "
                f"{'yes' if c['same'] else 'no'} |"
            )
    lines += ["", f"total wall time {total_s:.0f} s"]
    atomic_write_text(a.out_dir / "bench_determinism.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
