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

Under torchrun (docs/distributed.md) the entry is built once and shared: the rows are cut into
the batches one process cuts, rank r embeds batches r, r + W, ... (each image in the batch one
process puts it in: the same bits), each round's batches are gathered to rank 0, which writes
the entry as one process does; the others wait for it and open it. A step that can fail on one
rank ends with ``distributed.agree`` (every rank raises the same one line, none waits for ever).
Streamed batches are computed by every rank unless the caller asks for ``shared`` batches
(the attentive probe, whose ranks read the same batches): rank r then computes batch kW + r of
round k and the round's tokens are gathered to every rank; ``numbers`` picks some of the
batches (a rank's share of the scoring).
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

from ..backbones.base import Backbone
from ..core import distributed
from ..core.errors import UserError
from ..core.files import atomic_directory, atomic_write_json, file_lock, lock_path, sha256_json
from ..core.provenance import autocast_dtype, source_hash
from ..core.runtime import log
from ..data.datasets import DatasetBundle
from .entries import (
    CHECKSUM,
    Damaged,
    cached_entry,
    file_checksum,
    reserved_memmap,
    verify_checksums,
)
from .extraction import cache_key
from .loading import Images, loader, worker_errors

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
        self,
        order: np.ndarray | None = None,
        batch_size: int | None = None,
        *,
        numbers=None,
        shared: bool = False,
    ) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor | None]]:
        """(split rows, tokens float32 (B, h, w, D), prefix float32 (B, P, D) or None) for
        ``order`` (split rows, each one of ``rows``; default: ``rows``) cut into batches;
        ``numbers``: only these batches of the cut. ``shared`` (every rank of a torchrun world
        asks for the same batches): streamed batches are computed one per rank and round and
        gathered to every rank, each the bits one process computes."""
        order = self.rows if order is None else np.asarray(order, dtype=np.int64)
        bs = batch_size or self.batch_size
        cuts = [order[s : s + bs] for s in range(0, len(order), bs)]
        if numbers is not None:
            cuts = [cuts[k] for k in numbers]
        if self.cached:
            tokens, prefix = self._bank
            for take in cuts:
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
        if shared and distributed.world() > 1:
            for parts in _rounds(self, cuts, to_all=True):
                for take, t, p in parts:
                    yield take, t.float(), None if p is None else p.float()
            return
        with _grids(self.backbone, self.device) as embed:
            for take, batch in _image_batches(self, cuts):
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


def _image_batches(src: TokenSource, cuts: list[np.ndarray]):
    images = Images(src.bundle.split(src.split), src.backbone.preprocessing)
    nw = src.num_workers
    if nw is None:
        nw = 0 if images.split.images is not None else min(4, os.cpu_count() or 1)
    # loading tokens never moves the global RNG (loading.loader), so a dense head's dropout
    # draws the same whichever batches a rank loads
    cut = [c.tolist() for c in cuts]
    batches = loader(images, batch_sampler=cut, num_workers=nw)
    yield from zip(cuts, worker_errors(batches), strict=True)


def _rounds(src: TokenSource, cuts: list[np.ndarray], to_all: bool):
    """The streamed batches ``cuts`` computed across a torchrun world (``distributed.rounds``):
    in round k rank r computes batch kW + r (float16, the cache's values), and each round
    yields its (rows, tokens, prefix) in batch order, on every rank (``to_all``) or on rank 0
    alone (the others get an empty round). A batch that fails on one rank (a corrupt image)
    stops every rank with its message."""
    W, r = distributed.world(), distributed.rank()
    with _grids(src.backbone, src.device) as embed:

        def mine():
            for _, batch in _image_batches(src, cuts[r::W]):
                t, p = embed(batch)
                yield t.half(), None if p is None else p.half()

        for part in distributed.rounds(len(cuts), mine(), to_all):
            yield [(cuts[k], t, p) for k, (t, p) in part]


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
    if getattr(backbone, "pad_multiple", 0):  # inputs centre-padded before the grid is read
        key["input_padding"] = {"center": backbone.pad_multiple}
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
    if distributed.is_main():
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
    if distributed.world() > 1:
        hit, bank = _attach_ranks(src, entry, key_obj, what)
    else:
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


def _attach_ranks(src: TokenSource, entry: Path, key_obj: dict, what: str):
    """(hit, bank) in a torchrun world: rank 0 holds the entry's lock and decides; a missing
    entry is computed by every rank (``_rounds``) and written by rank 0; then every rank opens
    the entry rank 0 left (refused in one line where a rank cannot see it)."""
    main = distributed.is_main()
    with contextlib.ExitStack() as held:
        error = None
        if main:
            try:
                held.enter_context(
                    file_lock(lock_path(entry), f"the token cache entry {entry} ({what})")
                )
            except UserError as e:
                error = str(e)
        distributed.agree(error)
        hit = distributed.on_main(
            lambda: cached_entry(entry, lambda: _open(entry), what, discard=True) is not None
        )
        if not hit:
            _write(src, entry, key_obj)
    distributed.barrier()  # rank 0 has released the entry
    bank, error = None, None
    try:
        bank = _open(entry, verify=False)
    except Damaged as e:
        error = (
            f"rank {distributed.rank()} cannot read the token cache entry {entry} rank 0 wrote "
            f"({e}); put --cache-dir on a filesystem every node shares"
        )
    distributed.agree(error)
    return hit, bank


def _write(src: TokenSource, entry: Path, key_obj: dict) -> None:
    """The entry, written by one process, or by rank 0 from every rank's batches (every rank
    runs this): batches of ``batch_size`` in row order, the float16 values one process
    writes; an error on any rank, or rank 0's (a full disk, tokens that overflow float16),
    stops every rank with the same line."""
    t0 = time.perf_counter()
    if distributed.world() == 1:
        with atomic_directory(entry) as tmp:
            out = _Bank(src, entry, tmp)
            for take, t, pf in src.batches():
                out.add(take, t, pf)
            out.finish(key_obj, t0)
    else:
        _write_ranks(src, entry, key_obj, t0)
    if distributed.is_main():
        log(f"wrote patch tokens to {entry} in {time.perf_counter() - t0:.1f}s", "cache")


def _write_ranks(src: TokenSource, entry: Path, key_obj: dict, t0: float) -> None:
    main, bs = distributed.is_main(), src.batch_size
    cuts = [src.rows[s : s + bs] for s in range(0, len(src.rows), bs)]
    error, rounds_done = None, False

    def line(e: Exception) -> str:
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        return text if isinstance(e, UserError) else f"could not write {entry}: {text}"

    try:
        with atomic_directory(entry) if main else contextlib.nullcontext() as tmp:
            out = None
            try:
                out = _Bank(src, entry, tmp) if main else None
            except (UserError, OSError) as e:
                error = line(e)
            for parts in _rounds(src, cuts, to_all=False):
                try:
                    for part in parts if error is None else ():
                        out.add(*part)  # rank 0 alone receives the round's batches
                except (UserError, OSError) as e:
                    error = line(e)
                distributed.agree(error)  # raises on every rank together
            rounds_done = True
            if main:
                out.finish(key_obj, t0)
    except (UserError, OSError) as e:
        if not rounds_done:
            raise
        error = line(e)
    distributed.agree(error)


class _Bank:
    """The float16 memory maps of an entry being written, filled batch by batch in row order."""

    def __init__(self, src: TokenSource, entry: Path, tmp: Path):
        n, (h, w), d, p = len(src.rows), src.grid, src.dim, src.num_prefix
        hint = "free space, pass --cache-dir on another disk, or lower the token budget"
        self.src, self.tmp, self.done = src, tmp, 0
        self.toks = reserved_memmap(tmp / "tokens.npy", np.float16, (n, h, w, d), str(entry), hint)
        self.pre = None
        if p:
            self.pre = reserved_memmap(tmp / "prefix.npy", np.float16, (n, p, d), str(entry), hint)
        else:  # a CNN map: an empty prefix (a memory map cannot be empty)
            np.save(tmp / "prefix.npy", np.zeros((n, 0, d), dtype=np.float16))

    def add(self, take: np.ndarray, t: torch.Tensor, pf: torch.Tensor | None) -> None:
        a, b, src = self.done, self.done + len(take), self.src
        self.toks[a:b] = t.numpy()
        if pf is not None:
            self.pre[a:b] = pf.numpy()
        if not np.isfinite(self.toks[a:b]).all():
            raise UserError(
                f"{src.backbone.tag} patch tokens overflow float16 (or are NaN) on "
                f"{src.bundle.name}/{src.split}; lower the token budget to 0 to stream them"
            )
        self.done = b

    def finish(self, key_obj: dict, t0: float) -> None:
        self.toks.flush()
        if self.pre is not None:
            self.pre.flush()
        self.toks = self.pre = None  # closed before the checksums read the files
        np.save(self.tmp / "rows.npy", self.src.rows)
        sums = {f: file_checksum(self.tmp / f) for f in _FILES}
        meta = {"key": key_obj, "n": len(self.src.rows), "seconds": time.perf_counter() - t0}
        atomic_write_json(self.tmp / "meta.json", meta | {"checksum": CHECKSUM, "checksums": sums})


def _open(entry: Path, verify: bool = True):
    """(rows, tokens memmap, prefix memmap or None) of an entry, its checksums verified."""
    try:
        if verify:
            meta = json.loads((entry / "meta.json").read_text())
            verify_checksums(entry, meta, _FILES)
        rows = np.load(entry / "rows.npy")
        tokens = np.load(entry / "tokens.npy", mmap_mode="r")
        prefix = np.load(entry / "prefix.npy", mmap_mode="r")
        if tokens.ndim != 4 or len(tokens) != len(rows) or len(prefix) != len(rows):
            raise Damaged("tokens, prefix and rows disagree in length")
    except (OSError, ValueError, EOFError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Damaged(str(e).splitlines()[0] if str(e) else type(e).__name__) from e
    return rows, tokens, prefix if prefix.shape[1] else None
