"""Patch tokens of a frozen backbone for probes that read them (attentive, dense): a token source.

``token_source`` gives, for a backbone, a dataset split and rows of it, the last block's
patch-token grids (N, h, w, D) and prefix (class/register) tokens (N, P, D). When the float16
bank of those rows fits ``budget_bytes`` it is written once into the content-addressed cache
(an entry of ``tokens.npy``, ``prefix.npy``, ``rows.npy`` and a checksummed ``meta.json``,
appearing in one rename, like a feature entry) and read back memory-mapped; otherwise every
batch is computed online from the images, so memory stays bounded by a batch. The online path
rounds to float16 as the cache stores, so both give the same values (up to the last bits a
different batch composition can change on some kernels: rows embedded in the same batches as
the cache's are bit-equal, tests/test_token_source.py). ``TokenSource.record()`` says which
path ran and how many bytes the bank takes, for the result record.

One process: a torchrun world is not shared out here (each rank would compute its own).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..backbones.base import Backbone
from ..core.errors import UserError
from ..core.files import atomic_directory, atomic_write_json, file_lock, lock_path, sha256_json
from ..core.provenance import autocast_dtype, source_hash
from ..core.runtime import log
from ..data.datasets import DatasetBundle
from .entries import CHECKSUM, Damaged, cached_entry, file_checksum, reserved_memmap
from .extraction import cache_key
from .loading import Images, worker_errors

TOKEN_FORMAT_VERSION = 1
_FILES = ("tokens.npy", "prefix.npy", "rows.npy")


@dataclass
class TokenSource:
    """The patch tokens of ``rows`` (indices into the split), cached or computed per batch."""

    backbone: Backbone
    bundle: DatasetBundle
    split: str
    rows: np.ndarray
    grid: tuple[int, int]
    dim: int
    num_prefix: int
    nbytes: int  # the float16 bank of these rows (tokens + prefix)
    budget_bytes: int
    device: torch.device
    batch_size: int
    num_workers: int | None = None
    cached: bool = False
    path: Path | None = None
    cache_hit: bool = False
    _bank: tuple | None = field(default=None, repr=False)  # (tokens, prefix|None) memmaps
    _pos: dict = field(default_factory=dict, repr=False)  # split row -> bank position

    def record(self) -> dict:
        """Which path gave the tokens, for the result record."""
        return {
            "tokens": "cached" if self.cached else "streamed",
            "token_bytes": self.nbytes,
            "token_budget_bytes": self.budget_bytes,
            "grid": list(self.grid),
            "token_dim": self.dim,
            "prefix_tokens": self.num_prefix,
        }

    def batches(
        self, order: np.ndarray | None = None, batch_size: int | None = None
    ) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor | None]]:
        """(split rows, tokens float32 (B, h, w, D), prefix float32 (B, P, D) or None) for
        ``order`` (split rows, each one of ``rows``; default: ``rows``) cut into batches."""
        order = self.rows if order is None else np.asarray(order, dtype=np.int64)
        bs = batch_size or self.batch_size
        if self.cached:
            tokens, prefix = self._bank
            for s in range(0, len(order), bs):
                take = order[s : s + bs]
                pos = np.array([self._pos[int(r)] for r in take], dtype=np.int64)
                srt = np.argsort(pos, kind="stable")  # memmaps read fastest in file order
                back = np.empty_like(srt)
                back[srt] = np.arange(len(srt))
                t = torch.from_numpy(np.asarray(tokens[pos[srt]], dtype=np.float32)[back])
                p = None
                if prefix is not None:
                    p = torch.from_numpy(np.asarray(prefix[pos[srt]], dtype=np.float32)[back])
                yield take, t, p
            return
        with _grids(self.backbone, self.device) as embed:
            for take, batch in _image_batches(self, order, bs):
                t, p = embed(batch)
                yield take, _half(t), None if p is None else _half(p)


def _half(x: torch.Tensor) -> torch.Tensor:
    """float32 (CPU) rounded through float16: the values the cache stores."""
    return x.cpu().half().float()


@contextlib.contextmanager
def _grids(backbone: Backbone, device: torch.device):
    """uint8 NCHW batch -> (tokens, prefix) float32 on the CPU: normalised on ``device``, under
    bf16 autocast where the device runs it (as feature extraction embeds)."""
    backbone.model.to(device).eval()
    amp = autocast_dtype(device) == "bfloat16"

    def embed(batch: torch.Tensor):
        x = backbone.preprocessing.normalise(batch.to(device))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            g = backbone.patch_grid(x)
        return g.tokens.float().cpu(), None if g.prefix is None else g.prefix.float().cpu()

    yield embed


def _image_batches(src: TokenSource, order: np.ndarray, bs: int):
    images = Images(src.bundle.split(src.split), src.backbone.preprocessing)
    nw = src.num_workers
    if nw is None:
        nw = 0 if images.split.images is not None else min(4, os.cpu_count() or 1)
    cuts = [order[s : s + bs] for s in range(0, len(order), bs)]
    loader = DataLoader(images, batch_sampler=[c.tolist() for c in cuts], num_workers=nw)
    yield from zip(cuts, worker_errors(loader), strict=True)


def token_key(
    backbone: Backbone, bundle: DatasetBundle, split: str, rows: np.ndarray, device, batch_size
) -> dict:
    """Everything that changes the cached tokens: the feature key's weights, architecture,
    preprocessing, data, code, libraries, device kind and batch size, with the feature kind
    replaced by the output read (the patch grid) and the rows named by a hash."""
    key = cache_key(backbone, bundle, split, "float16", device, None, batch_size)
    key.pop("feature_kind")
    key["code_tokens"] = source_hash("features/tokens.py", "backbones/tokens.py")
    key["format"] = f"tokens-{TOKEN_FORMAT_VERSION}"
    return key | {"output": "patch-grid", "rows": sha256_json(np.asarray(rows).tolist())}


def token_source(
    backbone: Backbone,
    bundle: DatasetBundle,
    split: str,
    indices: np.ndarray | None = None,
    *,
    budget_bytes: int,
    device: torch.device,
    batch_size: int = 64,
    cache_dir: Path,
    num_workers: int | None = None,
) -> TokenSource:
    """The token source of ``indices`` (rows of ``split``; default: all): cached when its
    float16 bank fits ``budget_bytes``, streamed otherwise. Never refuses for size."""
    n_split = len(bundle.split(split))
    rows = np.arange(n_split) if indices is None else np.asarray(indices, dtype=np.int64)
    if rows.ndim != 1 or len(rows) == 0:
        raise UserError(f"no rows of {bundle.name}/{split} to read tokens of")
    if rows.min() < 0 or rows.max() >= n_split:
        raise UserError(f"row indices beyond {bundle.name}/{split} ({n_split} images)")
    if budget_bytes < 0:
        raise UserError(f"the token budget must be >= 0 bytes, not {budget_bytes}")
    src = TokenSource(
        backbone, bundle, split, rows, (0, 0), 0, 0, 0, int(budget_bytes), device, batch_size
    )
    src.num_workers = num_workers
    # one image tells the grid, width and prefix count (and refuses a model without tokens)
    _, t, p = next(src.batches(rows[:1], 1))
    src.grid, src.dim = (int(t.shape[1]), int(t.shape[2])), int(t.shape[3])
    src.num_prefix = 0 if p is None else int(p.shape[1])
    per_row = (src.grid[0] * src.grid[1] + src.num_prefix) * src.dim * 2
    src.nbytes = per_row * len(rows)
    if src.nbytes <= src.budget_bytes:
        _attach_cache(src, Path(cache_dir))
    what = "cached" if src.cached else "streamed (over the budget)"
    log(
        f"{backbone.tag} patch tokens of {bundle.name}/{split} ({len(rows)} rows, "
        f"{src.nbytes / 2**20:.1f} MiB float16, budget {src.budget_bytes / 2**20:.1f} MiB): {what}",
        "tokens",
    )
    return src


def _attach_cache(src: TokenSource, cache_dir: Path) -> None:
    key_obj = token_key(src.backbone, src.bundle, src.split, src.rows, src.device, src.batch_size)
    entry = cache_dir / "tokens" / sha256_json(key_obj)[:32]
    what = f"{src.backbone.tag} patch tokens of {src.bundle.name}/{src.split}"
    bank = cached_entry(entry, lambda: _open(entry), what, discard=False)
    hit = bank is not None
    if bank is None:
        with file_lock(lock_path(entry), f"the token cache entry {entry} ({what})"):
            bank = cached_entry(entry, lambda: _open(entry), what, discard=True)
            hit = bank is not None
            if bank is None:
                _write(src, entry, key_obj)
                bank = _open(entry, verify=False)
    rows, tokens, prefix = bank
    if not np.array_equal(rows, src.rows):
        raise UserError(f"the token cache entry {entry} holds other rows; remove it")
    src.cached, src.path, src.cache_hit, src._bank = True, entry, hit, (tokens, prefix)
    src._pos = {int(r): i for i, r in enumerate(rows)}


def _write(src: TokenSource, entry: Path, key_obj: dict) -> None:
    t0 = time.perf_counter()
    n, (h, w), d, p = len(src.rows), src.grid, src.dim, src.num_prefix
    hint = "free space, pass --cache-dir on another disk, or lower the token budget"
    with atomic_directory(entry) as tmp:
        toks = reserved_memmap(tmp / "tokens.npy", np.float16, (n, h, w, d), str(entry), hint)
        pre = None
        if p:
            pre = reserved_memmap(tmp / "prefix.npy", np.float16, (n, p, d), str(entry), hint)
        else:  # a CNN map: an empty prefix (a memory map cannot be empty)
            np.save(tmp / "prefix.npy", np.zeros((n, 0, d), dtype=np.float16))
        done = 0
        for take, t, pf in src.batches(src.rows, src.batch_size):
            toks[done : done + len(take)] = t.numpy()
            if pf is not None:
                pre[done : done + len(take)] = pf.numpy()
            if not np.isfinite(toks[done : done + len(take)]).all():
                raise UserError(
                    f"{src.backbone.tag} patch tokens overflow float16 (or are NaN) on "
                    f"{src.bundle.name}/{src.split}; lower the token budget to 0 to stream them"
                )
            done += len(take)
        toks.flush()
        if pre is not None:
            pre.flush()
        del toks, pre  # closed before the checksums read the files
        np.save(tmp / "rows.npy", src.rows)
        sums = {f: file_checksum(tmp / f) for f in _FILES}
        meta = {"key": key_obj, "n": n, "seconds": time.perf_counter() - t0}
        atomic_write_json(tmp / "meta.json", meta | {"checksum": CHECKSUM, "checksums": sums})
    log(f"wrote patch tokens to {entry} in {time.perf_counter() - t0:.1f}s", "cache")


def _open(entry: Path, verify: bool = True):
    """(rows, tokens memmap, prefix memmap or None) of an entry, its checksums verified."""
    try:
        if verify:
            meta = json.loads((entry / "meta.json").read_text())
            sums = meta.get("checksums") if isinstance(meta, dict) else None
            if not isinstance(sums, dict) or set(sums) != set(_FILES):
                raise Damaged("no checksums in meta.json")
            for f, want in sums.items():
                if file_checksum(entry / f) != want:
                    raise Damaged(f"{f} does not match its checksum")
        rows = np.load(entry / "rows.npy")
        tokens = np.load(entry / "tokens.npy", mmap_mode="r")
        prefix = np.load(entry / "prefix.npy", mmap_mode="r")
        if tokens.ndim != 4 or len(tokens) != len(rows) or len(prefix) != len(rows):
            raise Damaged("tokens, prefix and rows disagree in length")
    except (OSError, ValueError, EOFError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Damaged(str(e).splitlines()[0] if str(e) else type(e).__name__) from e
    return rows, tokens, prefix if prefix.shape[1] else None
