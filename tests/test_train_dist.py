"""Two CPU processes (gloo) against one process on the same global batch: every loss with
terms across processes has the single-process value, and after DDP's averaging every input
gradient and every parameter gradient is the single-process gradient of the global batch;
DINO's centre follows the global batch mean; and a data-parallel run (DDP) trains and writes a
checkpoint.

The processes are spawned once per module (start-up dominates the cost); each test reads what
they wrote. Gradients are compared in float64, relative error (norm of the difference over the
norm of the reference) below 1e-5."""

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from ssl_eval.train import losses
from ssl_eval.train.dist import all_reduce_mean, gather, gather_with_grad

SLOW_FIXTURES = ("two_processes",)  # module fixtures that train or start processes (conftest)

WORLD = 2
N, D = 8, 6  # global batch, embedding width
TOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---- loss-level cases: the same code runs on one process (gathers are identities) and on two


def _simclr(x):
    a1, off = gather_with_grad(x["z1"])
    a2, _ = gather_with_grad(x["z2"])
    return losses.nt_xent(x["z1"], x["z2"], 0.2, a1, a2, off)


def _moco(x):
    k1, off = gather(x["k1"])
    k2, _ = gather(x["k2"])
    return losses.moco_infonce(x["q1"], k2, 0.2, off) + losses.moco_infonce(x["q2"], k1, 0.2, off)


def _barlow(x):
    return losses.barlow_twins(gather_with_grad(x["z1"])[0], gather_with_grad(x["z2"])[0], 0.5)


def _swav(x):
    n = len(x["s1"])
    codes = []
    for s in (x["s1"], x["s2"]):
        all_s, off = gather(s)
        codes.append(losses.sinkhorn(all_s, 0.5, 3)[off : off + n])
    return losses.swapped_prediction([x["s1"], x["s2"], x["s3"]], codes, 0.1)


def _dino(x):
    center = all_reduce_mean(torch.cat([x["t1"], x["t2"]]).mean(0, keepdim=True))
    return losses.dino_loss([x["s1"], x["s2"], x["s3"]], [x["t1"], x["t2"]], center, 0.1, 0.05)


# name -> (loss, inputs that receive a gradient, inputs that do not)
LOSS_CASES = {
    "simclr": (_simclr, ["z1", "z2"], []),
    "mocov3": (_moco, ["q1", "q2"], ["k1", "k2"]),
    "barlowtwins": (_barlow, ["z1", "z2"], []),
    "swav": (_swav, ["s1", "s2", "s3"], []),
    "dino": (_dino, ["s1", "s2", "s3"], ["t1", "t2"]),
}


def _global_inputs(name: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    _, grad, const = LOSS_CASES[name]
    return {k: torch.randn(N, D, generator=g, dtype=torch.float64) for k in grad + const}


def _loss_and_grads(name: str, rows: slice) -> tuple[float, dict[str, torch.Tensor]]:
    fn, grad, _ = LOSS_CASES[name]
    x = {k: v[rows].clone().requires_grad_(k in grad) for k, v in _global_inputs(name).items()}
    loss = fn(x)
    loss.backward()
    return float(loss.detach()), {k: x[k].grad for k in grad}


# ---- method-level cases: the methods' own forward under DDP; eval mode, so BatchNorm uses its
# running statistics and each sample's embedding does not depend on which process holds it
# (PyTorch's SyncBatchNorm, GPU only, is what makes train-mode statistics global).

METHOD_CASES = ["simclr", "mocov3", "barlowtwins", "swav", "dino", "byol", "simsiam"]
SMALL = {
    "simclr": {"proj_hidden": 16, "proj_dim": 8},
    "mocov3": {"proj_hidden": 16, "proj_dim": 8, "pred_hidden": 16},
    "barlowtwins": {"proj_hidden": 16, "proj_dim": 8},
    "swav": {"proj_hidden": 16, "proj_dim": 8, "prototypes": 5},
    "dino": {"out_dim": 16, "hidden": 16, "bottleneck": 8},
    "byol": {"proj_hidden": 16, "proj_dim": 8, "pred_hidden": 16},
    "simsiam": {"proj_hidden": 16, "proj_dim": 8, "pred_hidden": 4},
}


def _method(name: str):
    from ssl_eval.backbones.archs import build_arch
    from ssl_eval.train.methods import METHODS

    spec = METHODS.get(name)
    torch.manual_seed(0)
    m = spec.cls(build_arch("cifar_resnet_tiny"), spec.make_config(SMALL[name])).double().eval()
    g = torch.Generator().manual_seed(1)

    def view(size: int) -> torch.Tensor:  # coarse per-image patterns: embeddings that differ
        low = F.interpolate(
            3 * torch.randn(N, 3, 2, 2, generator=g, dtype=torch.float64),
            size=size,
            mode="bilinear",
        )
        return low + 0.3 * torch.randn(N, 3, size, size, generator=g, dtype=torch.float64)

    views = [view(16), view(16)]
    if name in ("swav", "dino"):  # multi-crop
        views += [view(8), view(8)]
    return m, views


def _method_step(name: str, rows: slice, wrap=lambda m: m) -> dict:
    m, views = _method(name)
    model = wrap(m)
    loss = model([v[rows] for v in views], 0.5)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in m.parameters() if p.requires_grad])
    m.after_step(0.5)
    out = {"loss": float(loss.detach()), "grad": grads}
    if name == "dino":
        out["center"] = m.center.clone()
    return out


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    n = N // world
    rows = slice(rank * n, (rank + 1) * n)
    result: dict = {"loss": {}, "method": {}}
    for name in LOSS_CASES:
        loss, grads = _loss_and_grads(name, rows)
        # DDP averages parameter gradients over the processes: scale the inputs' gradients alike
        result["loss"][name] = {
            "loss": float(all_reduce_mean(torch.tensor(loss, dtype=torch.float64))),
            "grads": {k: g / world for k, g in grads.items()},
        }
    ddp = torch.nn.parallel.DistributedDataParallel
    for name in METHOD_CASES:
        r = _method_step(name, rows, ddp)  # DDP averages the parameter gradients
        r["loss"] = float(all_reduce_mean(torch.tensor(r["loss"], dtype=torch.float64)))
        result["method"][name] = r
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))

    from ssl_eval.train.loop import train
    from ssl_eval.train.resolve import resolve_config

    cfg = resolve_config(
        "simclr",
        settings={
            "arch": "cifar_resnet_tiny",
            "dataset": "digits",
            "epochs": 1,
            "batch_size": 32,
            "train_subset": 64,
            "device": "cpu",
            "monitor": {"knn_bank": 64, "knn_queries": 32},
        },
        overrides=["method_cfg.proj_hidden=32", "method_cfg.proj_dim=16"],
    )
    side = train(cfg, os.path.join(out, "run"), log=lambda m: None)
    if rank == 0:
        with open(os.path.join(out, "run.json"), "w") as f:
            json.dump(
                {"epochs_done": side["epochs_done"], "loss": side["final_diagnostics"]["loss"]}, f
            )
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(WORLD, _free_port(), str(out)), nprocs=WORLD, join=True)
    return out, [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LOSS_CASES))
def test_gathered_loss_and_every_input_gradient_equal_one_process(two_processes, name):
    _, ranks = two_processes
    loss, grads = _loss_and_grads(name, slice(None))  # one process, the whole global batch
    n = N // WORLD
    for r, res in enumerate(ranks):
        got = res["loss"][name]
        assert abs(got["loss"] - loss) < TOL * abs(loss)
        for k, g in grads.items():
            err = _rel(got["grads"][k], g[r * n : (r + 1) * n])
            assert err < TOL, f"{name}: rank {r} d loss / d {k} off by {err:.2e} (relative)"


@pytest.mark.parametrize("name", METHOD_CASES)
def test_ddp_parameter_gradients_are_the_global_batch_gradient(two_processes, name):
    _, ranks = two_processes
    ref = _method_step(name, slice(None))
    for r, res in enumerate(ranks):
        got = res["method"][name]
        assert abs(got["loss"] - ref["loss"]) < TOL * abs(ref["loss"])
        err = _rel(got["grad"], ref["grad"])
        assert err < TOL, f"{name}: rank {r} parameter gradient off by {err:.2e} (relative)"
        if name == "dino":
            err = _rel(got["center"], ref["center"])
            assert err < TOL, (
                f"dino: rank {r} centre off by {err:.2e}: not moved by the global batch mean"
            )


def test_ddp_run_trains_and_writes_checkpoint(two_processes):
    out, _ = two_processes
    res = json.loads((out / "run.json").read_text())
    assert res["epochs_done"] == 1 and res["loss"] == res["loss"]
    assert (out / "run" / "backbone.safetensors").is_file()
