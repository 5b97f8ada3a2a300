"""The checksummed cache entries the feature cache and the decode cache share: a crc32 per file
in the entry's meta.json (``file_checksum``), ``Damaged`` for an entry that fails it, and
``cached_entry``, which opens an entry verified or discards a damaged one under its lock."""

from __future__ import annotations

import shutil
import zlib
from pathlib import Path

import numpy as np

from ..core.errors import UserError
from ..core.files import preallocate
from ..core.runtime import log, warn


def cached_entry(
    entry: Path,
    open_verified,
    what: str,
    discard: bool,
    kind: str = "cache entry",
    redo: str = "extracting again",
    tag: str = "cache",
):
    """``open_verified()`` of a cache entry, or None when the entry is absent or damaged (it
    raised ``Damaged``). A damaged entry is removed only under the entry's lock
    (``discard``): unlocked, the path may already name a good entry another process wrote.
    Shared by the feature cache and the decode cache (``kind``, ``redo`` and ``tag`` word
    their messages)."""
    if not entry.exists():
        return None
    try:
        got = open_verified()
    except Damaged as e:
        if discard:
            warn(f"{kind} {entry} is damaged ({e}); discarding it and {redo}")
            shutil.rmtree(entry, ignore_errors=True)
        return None
    log(f"reusing {what} ({entry})", tag)
    return got


CHECKSUM = "crc32"  # detects damage (not tampering) at memory speed: see docs/reliability.md


class Damaged(Exception):
    pass


def file_checksum(path: Path, chunk: int = 1 << 22) -> str:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def verify_checksums(entry: Path, meta: object, files: tuple[str, ...]) -> None:
    """Raise ``Damaged`` unless ``meta`` (an entry's meta.json) holds a checksum for exactly
    ``files`` and each file of ``entry`` matches its own."""
    sums = meta.get("checksums") if isinstance(meta, dict) else None
    if not isinstance(sums, dict) or set(sums) != set(files):
        raise Damaged("no checksums in meta.json")
    for f, want in sums.items():
        if file_checksum(entry / f) != want:
            raise Damaged(f"{f} does not match its checksum")


def reserved_memmap(path: Path, dtype, shape: tuple[int, ...], what: str, hint: str) -> np.memmap:
    """A new memory-mapped ``.npy`` array at ``path``, its blocks reserved up front: a full disk
    is a clear one-line error now (``what`` names the entry, ``hint`` what to do; the temporary
    entry is then removed), never a SIGBUS half-way through writing it."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    try:
        preallocate(path, out.offset + out.nbytes)
    except OSError as e:
        del out
        size = np.dtype(dtype).itemsize * int(np.prod(shape)) / 2**20
        raise UserError(f"no room for {what} ({size:.0f} MB; {e.strerror or e}): {hint}") from e
    return out
