"""Feature extraction with a content-addressed on-disk cache.

A cache entry is a folder named by a hash of everything that determines the features: the
weights' sha256, backbone tag, preprocessing, feature kind, dataset fingerprint, split,
storage dtype, the hashed source of the code that computes them, the library versions, the
device kind and the autocast precision (``cache_key``). It holds ``features.npy`` (memory-mapped on read), ``labels.npy`` and
``meta.json``, and appears in one rename: a killed run leaves no half-written entry.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..backbones.base import Backbone
from ..core import distributed
from ..core.errors import UserError
from ..core.files import (
    atomic_directory,
    atomic_write_json,
    file_lock,
    lock_path,
    sha256_json,
)
from ..core.provenance import autocast_dtype, library_versions, source_hash
from ..core.runtime import log
from ..data.datasets import DatasetBundle
from .accel import Accel, prepared
from .decode_cache import decoded_in_world
from .entries import (
    CHECKSUM,
    Damaged,
    cached_entry,
    file_checksum,
    reserved_memmap,
    verify_checksums,
)
from .layers import layout
from .loading import Images, loader, progress_bar, worker_errors

FEATURE_FORMAT_VERSION = 1
DTYPES = {"float16": np.float16, "float32": np.float32}


def default_cache_dir() -> Path:
    env = os.environ.get("SSL_EVAL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ssl-eval"


@dataclass
class FeatureSet:
    features: np.ndarray  # (N, D), memory-mapped
    labels: np.ndarray  # (N,)
    key: str
    path: Path
    cache_hit: bool
    seconds: float = 0.0


def cache_key(
    backbone: Backbone,
    bundle: DatasetBundle,
    split: str,
    dtype: str,
    device: torch.device | None = None,
    accel: Accel | None = None,
    batch_size: int = 256,
) -> dict:
    """Everything that changes the features: the weights, the tag's preprocessing and feature
    kind (for ``layers:N``, also its layout: which blocks, which poolings), the data, the storage dtype, the code that computes them (the source of this file,
    of backbones/ and of data/, hashed), the library versions, the device kind and autocast
    precision (bf16 features on a GPU are not float32 features on a CPU), the speed options
    that run other kernels (``Accel.key``: channels-last, compile), and the extraction batch
    size (a batch of 1, 7 or 64 images gives other float16 bytes on this CPU: the kernels
    block the GEMMs by batch; tests/test_keys_provenance.py). The decode cache is not in it:
    its pixels are those of the per-image path, so the features are the same."""
    device = device or torch.device("cpu")
    fast = (accel or Accel()).key()
    key = ({"accel": fast} if fast else {}) | {
        "format": FEATURE_FORMAT_VERSION,
        "code": source_hash(
            "features/extraction.py",
            "features/loading.py",
            "features/entries.py",
            "features/accel.py",
            "backbones",
            "data",
            "core/registry.py",
        ),
        "libraries": library_versions(),
        "device": device.type,
        "autocast": autocast_dtype(device),
        "weights_sha256": backbone.weights.sha256,
        "backbone": backbone.tag,
        "preprocessing": backbone.preprocessing.to_dict(),
        "feature_kind": backbone.feature_kind,
        "built": backbone.built(),  # two readings of one file are two backbones
        "dataset": bundle.name,
        "dataset_fingerprint": bundle.fingerprint,
        "split": split,
        "dtype": dtype,
        "batch_size": batch_size,
    }
    multi = layout(backbone.feature_kind)  # the blocks and poolings of a layers:N row
    return key | {"layout": multi} if multi else key


def extract(
    backbone: Backbone,
    bundle: DatasetBundle,
    split: str,
    *,
    cache_dir: Path,
    device: torch.device,
    batch_size: int = 256,
    dtype: str = "float16",
    num_workers: int | None = None,
    progress: bool = True,
    decode_cache: bool = False,
    accel: Accel | None = None,
) -> FeatureSet:
    """Features of ``bundle``'s ``split`` under ``backbone``, from the cache when present.
    With ``decode_cache``, images are read from the decode cache (decode_cache.py), built on
    first use, instead of being decoded and resized per image."""
    if dtype not in DTYPES:
        raise UserError(f"feature dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
    accel = accel or Accel()
    key_obj = cache_key(backbone, bundle, split, dtype, device, accel, batch_size)
    key = sha256_json(key_obj)[:32]
    entry = Path(cache_dir) / "features" / key
    what = f"{backbone.tag} features for {bundle.name}/{split}"
    if distributed.world() > 1:  # torchrun: every rank extracts a share, rank 0 writes
        args = (entry, key, key_obj, what, dtype, device, batch_size, num_workers, progress)
        return _extract_ranks(backbone, bundle, split, *args, (cache_dir, decode_cache, accel))
    fs = _cached(entry, key, what, discard=False)
    if fs is not None:
        return fs
    # one process extracts an entry; the others wait for it, then read what it wrote
    with file_lock(lock_path(entry), f"the feature cache entry {entry} ({what})"):
        fs = _cached(entry, key, what, discard=True)
        if fs is None:
            args = (entry, key, key_obj, dtype, device, batch_size, num_workers, progress)
            fs = _extract(backbone, bundle, split, *args, (cache_dir, decode_cache, accel))
        return fs


def _cached(entry: Path, key: str, what: str, discard: bool) -> FeatureSet | None:
    return cached_entry(entry, lambda: _open(entry, key, hit=True, verify=True), what, discard)


def _extract(
    backbone,
    bundle,
    split,
    entry,
    key,
    key_obj,
    dtype,
    device,
    batch_size,
    num_workers,
    progress,
    fast: tuple = (None, False, Accel()),
) -> FeatureSet:
    t0 = time.perf_counter()
    batches, n = _batches(
        bundle, split, backbone, batch_size, num_workers, progress, _pin_gpu(device, fast), *fast
    )
    with atomic_directory(entry) as tmp, _embedding(backbone, device, fast[2]) as embed:
        out = _EntryWriter(tmp, entry, n, dtype, backbone.tag, f"{bundle.name}/{split}")
        bar = progress_bar(n, f"{backbone.tag} {bundle.name}/{split}", progress)
        for batch in batches:
            bar.update(out.write(embed(batch)))
        bar.close()
        seconds = time.perf_counter() - t0
        out.finish(bundle.split(split).labels, key_obj, seconds)
    log(f"wrote {backbone.tag} features for {bundle.name}/{split} in {seconds:.1f}s", "cache")
    fs = _open(entry, key, hit=False)
    fs.seconds = seconds
    return fs


def _pin_gpu(device: torch.device, fast: tuple) -> tuple[bool, bool]:
    """(pin host batches?, running on a GPU?): pinned memory serves host-to-GPU copies only; on
    the CPU the flag has nothing to do."""
    gpu = device.type == "cuda"
    return fast[2].pin_memory and gpu, gpu


@contextlib.contextmanager
def _embedding(backbone: Backbone, device: torch.device, accel: Accel):
    """A function from a uint8 NCHW batch to its float32 features (numpy): normalised on
    ``device``, in the memory format ``accel`` asks, through ``accel.prepared``'s forward pass
    (channels-last weights, compiled), under bf16 autocast where the device runs it. One
    process and every torchrun rank embed through it, so a batch gets the same bits in both."""
    backbone.model.to(device).eval()
    amp = autocast_dtype(device) == "bfloat16"
    with prepared(backbone, accel) as forward:

        def embed(batch: torch.Tensor) -> np.ndarray:
            x = backbone.preprocessing.normalise(batch.to(device, non_blocking=True))
            x = x.contiguous(memory_format=accel.memory_format())
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                f = forward(x)
            return f.float().cpu().numpy()

        yield embed


def _batches(
    bundle,
    split,
    backbone,
    batch_size,
    num_workers,
    progress,
    pin_gpu,
    cache_dir,
    decode,
    accel,
    numbers=None,
):
    """(uint8 NCHW batches, the split's image count): from the decode cache's map, or decoded
    and resized per image by DataLoader workers. Every batch of ``batch_size`` images in order,
    or only the batches numbered ``numbers`` (a torchrun rank's share), cut the same way."""
    pin, gpu = pin_gpu
    if decode:
        src = decoded_in_world(
            bundle, split, backbone.preprocessing, cache_dir, num_workers, progress
        )
        # on a GPU the map's NHWC rows travel as they are and the layout the model runs in is
        # made there (_embedding's .contiguous), not by a transposing copy on the host
        nhwc = accel.channels_last or gpu
        return src.batches(batch_size, nhwc, pin, numbers), len(src)
    images = Images(bundle.split(split), backbone.preprocessing)
    n = len(images)
    if num_workers is None:
        num_workers = 0 if images.split.images is not None else min(4, os.cpu_count() or 1)
    if numbers is None:
        cut = {"batch_size": batch_size, "shuffle": False}
    else:
        cut = {
            "batch_sampler": [range(b * batch_size, min(n, (b + 1) * batch_size)) for b in numbers]
        }
    batches = loader(images, num_workers=num_workers, pin_memory=pin, **cut)
    return worker_errors(batches), n


class _EntryWriter:
    """The files of a feature cache entry being written into its temporary folder ``tmp``:
    batches of features in order (the memory-mapped array opened at the first, every value
    checked finite), then the labels and meta.json with the files' checksums. Used by one
    process (``_extract``) and by rank 0 of a torchrun world (``_write_ranks``)."""

    def __init__(self, tmp: Path, entry: Path, n: int, dtype: str, tag: str, data: str):
        self.tmp, self.entry, self.n, self.dtype = tmp, entry, n, dtype
        self.tag, self.data = tag, data  # the backbone's tag, "dataset/split": for messages
        self.out, self.done = None, 0

    def write(self, f: np.ndarray) -> int:
        """Append one batch of features; returns its row count."""
        if self.out is None:
            path, shape = self.tmp / "features.npy", (self.n, f.shape[1])
            self.out = reserved_memmap(
                path,
                DTYPES[self.dtype],
                shape,
                f"the feature cache entry {self.entry}",
                "free space or pass --cache-dir on another disk",
            )
        rows = slice(self.done, self.done + len(f))
        self.out[rows] = f
        if not np.isfinite(self.out[rows]).all():
            raise UserError(
                f"{self.tag} features overflow {self.dtype} (or are NaN) on {self.data}; rerun "
                "with --feature-dtype float32"
            )
        self.done += len(f)
        return len(f)

    def finish(self, labels, key_obj: dict, seconds: float) -> None:
        if self.out is None:
            raise UserError(f"{self.data} is empty")
        self.out.flush()
        self.out = None  # the memmap closed before the checksums read the file
        np.save(self.tmp / "labels.npy", np.asarray(labels, dtype=np.int64))
        sums = {f: file_checksum(self.tmp / f) for f in ("features.npy", "labels.npy")}
        meta = {"key": key_obj, "n": self.n, "seconds": seconds, "checksum": CHECKSUM}
        atomic_write_json(self.tmp / "meta.json", meta | {"checksums": sums})


def _open(entry: Path, key: str, hit: bool, verify: bool = False) -> FeatureSet:
    """Open an entry; with ``verify``, every file is checked against the checksums its
    meta.json holds, and anything missing, truncated or altered raises ``Damaged``."""
    try:
        if verify:
            meta = json.loads((entry / "meta.json").read_text())
            verify_checksums(entry, meta, ("features.npy", "labels.npy"))
        feats = np.load(entry / "features.npy", mmap_mode="r")
        labels = np.load(entry / "labels.npy")
        if feats.ndim != 2 or len(feats) != len(labels):
            raise Damaged("features and labels disagree in length")
    except (OSError, ValueError, EOFError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Damaged(str(e).splitlines()[0] if str(e) else type(e).__name__) from e
    return FeatureSet(feats, labels, key, entry, hit)


# ---------------------------------------------------------------- several processes (torchrun)


def _extract_ranks(
    backbone,
    bundle,
    split,
    entry,
    key,
    key_obj,
    what,
    dtype,
    device,
    batch_size,
    nw,
    progress,
    fast: tuple = (None, False, Accel()),
) -> FeatureSet:
    """The entry, extracted by every rank of a torchrun world and written by rank 0 alone.

    The images are cut into the batches one process would use, and rank r embeds batches r,
    r + W, r + 2W ...: every image passes through the network in the same batch as in one
    process, so its features are the same bits. Each round the ranks' batches are gathered and
    rank 0 writes them in batch order into the same memory-mapped file one process writes; the
    other ranks wait for the entry and then read it. Rank 0 alone takes the entry's lock.
    ``fast`` is one process's (cache_dir, decode cache?, Accel): a rank reads its batches from
    the decode cache's map (built once, by rank 0) and embeds them as one process does."""
    with (
        file_lock(lock_path(entry), f"the feature cache entry {entry} ({what})")
        if (distributed.is_main())
        else contextlib.nullcontext()
    ):
        hit = distributed.on_main(lambda: _cached(entry, key, what, discard=True) is not None)
        seconds = 0.0
        if not hit:
            args = (entry, key_obj, dtype, device, batch_size, nw, progress, fast)
            seconds = _write_ranks(backbone, bundle, split, *args)
    distributed.barrier()  # rank 0 has released the entry
    error = None
    try:
        fs = _open(entry, key, hit=hit)
    except Damaged as e:
        fs, error = (
            None,
            (
                f"rank {distributed.rank()} cannot read the feature cache entry {entry} rank 0 "
                f"wrote ({e}); put --cache-dir on a filesystem every node shares"
            ),
        )
    distributed.agree(error)
    fs.seconds = distributed.broadcast(seconds)
    return fs


def _write_ranks(
    backbone, bundle, split, entry, key_obj, dtype, device, batch_size, nw, progress, fast
) -> float:
    t0 = time.perf_counter()
    labels = bundle.split(split).labels
    n = len(labels)
    if n == 0:
        raise UserError(f"{bundle.name}/{split} is empty")
    W, main = distributed.world(), distributed.is_main()
    count = math.ceil(n / batch_size)  # the single-process batches; this rank's: r, r + W ...
    mine = range(distributed.rank(), count, W)
    pin_gpu = _pin_gpu(device, fast)
    batch_iter, _ = _batches(
        bundle, split, backbone, batch_size, nw, progress and main, pin_gpu, *fast, mine
    )
    rounds_done, main_error = False, None
    try:
        with (
            atomic_directory(entry) if main else contextlib.nullcontext() as tmp,
            _embedding(backbone, device, fast[2]) as embed,
        ):
            data = f"{bundle.name}/{split}"
            out = _EntryWriter(tmp, entry, n, dtype, backbone.tag, data) if main else None
            bar = progress_bar(n, f"{backbone.tag} {bundle.name}/{split}", progress and main)
            for r in range(math.ceil(count / W)):
                f, error = None, None
                if r < len(mine):
                    try:
                        f = embed(next(batch_iter))
                    except UserError as e:
                        error = str(e)
                parts = distributed.all_gather((f, error))
                distributed.agree(next((e for _, e in parts if e), None))
                error = None
                if main:  # rank 0 writes the round's batches, in batch order
                    try:
                        for f, _ in parts:
                            if f is not None:
                                bar.update(out.write(f))
                    except (UserError, OSError) as e:
                        error = str(e).splitlines()[0]
                distributed.agree(error)
            bar.close()
            rounds_done = True
            seconds = time.perf_counter() - t0
            if main:
                out.finish(labels, key_obj, seconds)
    except (UserError, OSError) as e:
        if not rounds_done:
            raise  # every rank raises it together
        main_error = f"could not write the feature cache entry {entry}: {str(e).splitlines()[0]}"
    distributed.agree(main_error)
    if main:
        log(f"wrote {backbone.tag} features for {bundle.name}/{split} in {seconds:.1f}s", "cache")
    return seconds
