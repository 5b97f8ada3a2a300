"""Decode once: a split's images decoded, resized and centre-cropped to the evaluation
resolution, kept as one uint8 (N, H, W, 3) memory map, so repeated extraction (another
backbone, another feature kind, a rerun after a code change) is bound by the model rather than
by JPEG decoding.

An entry is keyed by what fixes its pixels and nothing else (``decode_key``): the dataset's
name and content fingerprint, the split, the *geometric* part of the preprocessing (resize,
crop, interpolation), the source of this file, of loading.py (whose ``Images`` decodes), entries.py and
of ``data/`` (decoding and resizing code), and the versions of the libraries that decode and
resize (Pillow, torchvision, torch, numpy).
Mean and std are not in it: normalisation runs per batch on the uint8 pixels, so every backbone
with the same resize and crop shares one entry. The pixels are exactly those the per-image path
(``loading.Images``) produces, built by that same code, so the features are identical and the
feature-cache key does not change when the decode cache is used.

Entries sit under ``<cache>/decoded/<key>/`` (images.npy, labels.npy, meta.json with crc32
checksums of both arrays, verified on every open, as feature-cache entries are), appear in one
rename, and one process builds an entry while others wait on its lock.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..core import distributed
from ..core.errors import UserError
from ..core.files import (
    atomic_directory,
    atomic_write_json,
    file_lock,
    lock_path,
    sha256_json,
)
from ..core.provenance import library_versions, source_hash
from ..core.runtime import log
from ..data.datasets import DatasetBundle, ImageSplit
from ..data.transforms import Preprocessing
from .entries import (
    CHECKSUM,
    Damaged,
    cached_entry,
    file_checksum,
    reserved_memmap,
    verify_checksums,
)
from .loading import Images, loader, progress_bar, worker_errors

DECODE_FORMAT_VERSION = 1
DECODE_LIBRARIES = ("torch", "torchvision", "numpy", "pillow")  # decoding and resizing
_FILES = ("images.npy", "labels.npy")


def geometry(pre: Preprocessing) -> dict:
    """The deterministic part of ``pre`` up to the uint8 tensor (not mean and std)."""
    return {"resize": pre.resize, "crop": pre.crop, "interpolation": pre.interpolation}


def decode_key(bundle: DatasetBundle, split: str, pre: Preprocessing) -> dict:
    """Everything that changes the decoded pixels of ``bundle``'s ``split`` under ``pre``."""
    return {
        "format": DECODE_FORMAT_VERSION,
        "code": source_hash(
            "features/decode_cache.py", "features/loading.py", "features/entries.py", "data"
        ),  # loading.Images decodes
        "libraries": library_versions(DECODE_LIBRARIES),
        "dataset": bundle.name,
        "dataset_fingerprint": bundle.fingerprint,
        "split": split,
        "geometry": geometry(pre),
    }


@dataclass
class DecodedSplit:
    """A split's decoded images (N, H, W, 3) uint8, memory-mapped, and its labels."""

    images: np.ndarray
    labels: np.ndarray
    key: str
    path: Path
    cache_hit: bool
    seconds: float = 0.0

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, start: int, size: int, channels_last: bool = False, pin: bool = False):
        """Images ``start:start+size`` as a uint8 NCHW tensor, in the memory format the model
        will be fed (contiguous NCHW unless ``channels_last``), pinned if asked."""
        x = torch.from_numpy(np.array(self.images[start : start + size])).permute(0, 3, 1, 2)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        x = x.contiguous(memory_format=fmt)
        return x.pin_memory() if pin else x

    def batches(
        self,
        size: int,
        channels_last: bool = False,
        pin: bool = False,
        numbers: Sequence[int] | None = None,
    ) -> Iterator[torch.Tensor]:
        """The images ``size`` at a time, in order: every batch, or only the batches numbered
        ``numbers`` (batch b holds images b*size to (b+1)*size: a torchrun rank reads its share
        of the single-process batches). The next batch is read from the map in a background
        thread while the caller runs the model on this one."""
        n = len(self)
        numbers = range(math.ceil(n / size)) if numbers is None else numbers
        starts = [b * size for b in numbers]
        if any(not 0 <= s < n for s in starts):
            raise ValueError(
                f"batch numbers {list(numbers)} beyond {n} images in batches of {size}"
            )
        with ThreadPoolExecutor(1) as ex:
            nxt = ex.submit(self.batch, starts[0], size, channels_last, pin) if starts else None
            for i in range(len(starts)):
                x = nxt.result()
                if i + 1 < len(starts):
                    nxt = ex.submit(self.batch, starts[i + 1], size, channels_last, pin)
                yield x

    def as_split(self) -> ImageSplit:
        """An ImageSplit whose ``load(i)`` reads image ``i`` from the map (copy-on-write, so
        a transform that writes in place never reaches the file)."""
        return ImageSplit(self.labels, images=_MappedImages(self.path / "images.npy"))


class _MappedImages:
    """The (N, H, W, 3) map, opened copy-on-write; pickled as its path (a DataLoader worker
    started by spawn reopens the map instead of receiving a copy of every image)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.array = np.load(self.path, mmap_mode="c")

    def __getitem__(self, i):
        return self.array[i]

    def __len__(self) -> int:
        return len(self.array)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape

    def __reduce__(self):
        return (_MappedImages, (self.path,))


def decoded(
    bundle: DatasetBundle,
    split: str,
    pre: Preprocessing,
    *,
    cache_dir: Path,
    num_workers: int | None = None,
    progress: bool = True,
) -> DecodedSplit:
    """``bundle``'s ``split`` decoded under ``pre``'s geometry, from the cache when present."""
    spot = DecodeEntry.of(bundle, split, pre, cache_dir)
    got = spot.cached(discard=False)
    if got is not None:
        return got
    with spot.lock():
        return spot.get(num_workers, progress)


@dataclass(frozen=True)
class DecodeEntry:
    """Where ``bundle``'s ``split`` decoded under ``pre`` lives, and the steps of reaching it:
    ``decoded`` takes them in one process; a torchrun world takes them rank by rank (rank 0
    builds under the lock, the others wait on the lock and then ``read``: ``decoded_in_world``)."""

    bundle: DatasetBundle
    split: str
    pre: Preprocessing
    path: Path
    key: str
    key_obj: dict
    what: str

    @classmethod
    def of(
        cls, bundle: DatasetBundle, split: str, pre: Preprocessing, cache_dir: Path
    ) -> DecodeEntry:
        key_obj = decode_key(bundle, split, pre)
        key = sha256_json(key_obj)[:32]
        what = f"decoded {bundle.name}/{split} at {_size_name(pre)}"
        return cls(bundle, split, pre, Path(cache_dir) / "decoded" / key, key, key_obj, what)

    def lock(self, quiet: bool = False):
        """The entry's lock (``quiet``: a waiter does not say that it waits)."""
        what = f"the decode cache entry {self.path} ({self.what})"
        return file_lock(lock_path(self.path), what, **({"log": None} if quiet else {}))

    def cached(self, discard: bool) -> DecodedSplit | None:
        """The entry, verified, or None (a damaged one is removed only with ``discard``)."""
        return _cached(self.path, self.key, self.what, discard)

    def get(self, num_workers: int | None, progress: bool) -> DecodedSplit:
        """With the lock held: the entry, verified, or built now."""
        got = self.cached(discard=True)
        if got is not None:
            return got
        args = (self.key, self.key_obj, num_workers, progress)
        return _build(self.bundle, self.split, self.pre, self.path, *args)

    def read(self) -> DecodedSplit:
        """The entry another process built, verified and opened without a word; missing or
        damaged, a UserError (never removed or rebuilt here)."""
        try:
            return _open(self.path, self.key, verify=True)
        except Damaged as e:
            raise UserError(f"cannot read the decode cache entry {self.path} ({e})") from None


def _size_name(pre: Preprocessing) -> str:
    if pre.crop is not None:
        return f"{pre.crop}x{pre.crop} ({pre.interpolation} resize to {pre.resize})"
    return "native size" if pre.resize is None else f"shorter side {pre.resize}"


def _cached(entry: Path, key: str, what: str, discard: bool) -> DecodedSplit | None:
    """The entry, verified, or None; a damaged one is removed only under its lock."""
    return cached_entry(
        entry,
        lambda: _open(entry, key, verify=True),
        what,
        discard,
        "decode cache entry",
        "decoding again",
        "decode",
    )


_VERIFIED: set[tuple] = set()  # entries this process checked, by identity of their files


def _stamp(entry: Path) -> tuple:
    return tuple(
        (f, st.st_ino, st.st_size, st.st_mtime_ns) for f in _FILES for st in [(entry / f).stat()]
    )


def _open(entry: Path, key: str, verify: bool) -> DecodedSplit:
    """Open an entry; with ``verify``, its files are checked against meta.json's crc32 sums
    once per process (an ImageNet-size map is tens of GB: every split of every backbone would
    otherwise read it again), and again whenever a file's inode, size or mtime changes."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
        if verify and _stamp(entry) not in _VERIFIED:
            verify_checksums(entry, meta, _FILES)
            _VERIFIED.add(_stamp(entry))
        images = np.load(entry / "images.npy", mmap_mode="r")
        labels = np.load(entry / "labels.npy")
        if images.ndim != 4 or images.shape[-1] != 3 or len(images) != len(labels):
            raise Damaged("images and labels disagree in shape")
    except (OSError, ValueError, EOFError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Damaged(str(e).splitlines()[0] if str(e) else type(e).__name__) from e
    return DecodedSplit(images, labels, key, entry, cache_hit=True, seconds=meta.get("seconds", 0))


def _build(bundle, split, pre, entry, key, key_obj, num_workers, progress) -> DecodedSplit:
    t0 = time.perf_counter()
    src = bundle.split(split)
    images = Images(src, pre)  # the very code the per-image extraction path runs
    if num_workers is None:
        num_workers = 0 if src.images is not None else min(4, _cpus())
    batches = loader(images, batch_size=256, shuffle=False, num_workers=num_workers)
    n = len(images)
    with atomic_directory(entry) as tmp:
        out, done = None, 0
        bar = progress_bar(n, f"decode {bundle.name}/{split}", progress)
        for batch in worker_errors(batches):
            if out is None:
                out = reserved_memmap(
                    tmp / "images.npy",
                    np.uint8,
                    (n, *batch.shape[2:], 3),
                    f"the decode cache entry {entry}",
                    "free space, pass --cache-dir on another disk or drop --decode-cache",
                )
            out[done : done + len(batch)] = batch.permute(0, 2, 3, 1).numpy()
            done += len(batch)
            bar.update(len(batch))
        bar.close()
        if out is None:
            raise UserError(f"{bundle.name}/{split} is empty")
        out.flush()
        del out
        np.save(tmp / "labels.npy", np.asarray(src.labels, dtype=np.int64))
        seconds = time.perf_counter() - t0
        sums = {f: file_checksum(tmp / f) for f in _FILES}
        atomic_write_json(
            tmp / "meta.json",
            {"key": key_obj, "n": n, "seconds": seconds, "checksum": CHECKSUM, "checksums": sums},
        )
    log(f"decoded {bundle.name}/{split} ({n} images) in {seconds:.1f}s -> {entry}", "decode")
    got = _open(entry, key, verify=False)
    got.cache_hit, got.seconds = False, seconds
    return got


def _cpus() -> int:
    import os

    return os.cpu_count() or 1


def native_bundle(
    bundle: DatasetBundle, *, cache_dir: Path, num_workers: int | None = None, progress=True
) -> tuple[DatasetBundle, str]:
    """For protocols that draw their own crops of the full image (fine-tuning's random resized
    crops): ``bundle`` with its splits read from decoded full-resolution maps, when every image
    of it has one size (a fixed-size array cannot hold images of several sizes); otherwise
    ``bundle`` itself. The second value says which, for the log and the record."""
    if all(s.images is not None for s in (bundle.train, bundle.test)):
        return bundle, "in memory already"
    sizes = {_header_size(p) for s in (bundle.train, bundle.test) for p in s.paths or ()}
    if len(sizes) != 1:
        return bundle, f"original files (images of {len(sizes)} sizes cannot share one map)"
    native = Preprocessing()
    # decoded_in_world: one process decodes; under torchrun rank 0 builds, the others wait
    splits = {
        s: decoded_in_world(bundle, s, native, cache_dir, num_workers, progress).as_split()
        for s in ("train", "test")
    }
    from dataclasses import replace

    return replace(bundle, train=splits["train"], test=splits["test"]), "decode cache (native size)"


def _header_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError, SyntaxError) as e:
        raise UserError(f"cannot read image {path}: {e}. Remove or replace the file.") from e


def decoded_in_world(bundle, split, pre, cache_dir, num_workers, progress):
    """The split's decode cache entry, built once. One process: ``decode_cache.decoded``. A
    torchrun world: rank 0 takes the entry's lock and builds the entry if it is missing, as one
    process does; the other ranks wait on that lock, not in a collective (a build can outlast
    the process group's timeout), then open the entry rank 0 left, verified."""
    if distributed.world() == 1:
        return decoded(
            bundle, split, pre, cache_dir=cache_dir, num_workers=num_workers, progress=progress
        )
    spot, main = DecodeEntry.of(bundle, split, pre, cache_dir), distributed.is_main()
    got, error = None, None
    if not main:
        distributed.barrier()  # until rank 0 holds the lock
    with spot.lock(quiet=not main):
        if main:
            distributed.barrier()  # the others now wait on the lock
        try:
            got = spot.get(num_workers, progress) if main else spot.read()
        except UserError as e:
            error = str(e)
            if not main:  # rank 0 built it, this rank cannot see it
                where = "put --cache-dir on a filesystem every node shares"
                error = f"rank {distributed.rank()} {error}; {where}"
    distributed.agree(error)  # rank 0's failure first: the others then find no entry
    return got
