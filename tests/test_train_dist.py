"""Two CPU processes (gloo): negatives gathered across processes give the single-process loss
of the same global batch, and a data-parallel run (DDP + SyncBatchNorm) trains and writes a
checkpoint."""

import json
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ssl_eval.train import losses
from ssl_eval.train.dist import all_reduce_mean, gather_with_grad


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    z1, z2 = _global_batch()
    n = len(z1) // world
    l1 = z1[rank * n : (rank + 1) * n].clone().requires_grad_()
    l2 = z2[rank * n : (rank + 1) * n].clone().requires_grad_()
    a1, off = gather_with_grad(l1)
    a2, _ = gather_with_grad(l2)
    simclr = losses.nt_xent(l1, l2, 0.2, a1, a2, off)
    simclr.backward()  # gradients reach the local rows
    moco = losses.moco_infonce(l1, a2.detach(), 0.2, off)
    result = {"simclr": float(all_reduce_mean(simclr.detach())), "moco": float(all_reduce_mean(moco.detach())),
              "grad": bool(l1.grad is not None and l1.grad.abs().sum() > 0)}

    from ssl_eval.train.loop import train
    from ssl_eval.train.resolve import resolve_config

    cfg = resolve_config("simclr", settings={
        "arch": "cifar_resnet_tiny", "dataset": "digits", "epochs": 1, "batch_size": 32, "train_subset": 64,
        "device": "cpu", "monitor": {"knn_bank": 64, "knn_queries": 32}},
        overrides=["method_cfg.proj_hidden=32", "method_cfg.proj_dim=16"])
    side = train(cfg, os.path.join(out, "run"), log=lambda m: None)
    if rank == 0:
        result["epochs_done"] = side["epochs_done"]
        result["loss"] = side["final_diagnostics"]["loss"]
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


def test_two_processes_gathered_loss_and_ddp_run(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    res = json.loads((tmp_path / "result.json").read_text())
    z1, z2 = _global_batch()
    assert abs(res["simclr"] - float(losses.nt_xent(z1, z2, 0.2))) < 1e-5
    assert abs(res["moco"] - float(losses.moco_infonce(z1, z2, 0.2))) < 1e-5
    assert res["grad"] and res["epochs_done"] == 1 and res["loss"] == res["loss"]
    assert (tmp_path / "run" / "backbone.safetensors").is_file()
