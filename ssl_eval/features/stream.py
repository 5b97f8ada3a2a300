"""Rows of a feature matrix read a chunk at a time, converted to float32 per chunk.

The feature cache stores float16 ``.npy`` files that are memory-mapped on read. Converting the
whole bank to float32 (``np.asarray(x, np.float32)``) would cost 2x the file in anonymous
memory (5 GB for ImageNet's 1.28M x 1,024). ``FeatureRows`` instead hands out float32 copies of
row ranges (``read``) or listed rows (``take``) on the protocol's device, optionally
L2-normalised row by row (the same arithmetic as normalising the whole matrix: each row's norm
depends only on that row).

Pages of a memory-mapped file that were read stay in the process's resident set until the
kernel needs them back, so a plain pass over a memmap grows the peak RSS with N. Once the bytes
read in order since the last release exceed ``release_mb`` (or after any gather of scattered
rows), the mapping's pages are dropped from this process (``madvise(MADV_DONTNEED)``: they stay in the page cache and are read back from there
on the next touch; the file is opened read-only, so nothing is lost). Peak RSS is then bounded
by the chunk sizes and ``release_mb``, not by the number of rows.

A gather of scattered rows (a mini-batch) maps one whole folio per row (up to the PMD size, 2 MB
on x86-64), so it reads ``release_mb`` / 2 MB rows at a time and releases in between: a 512-row
batch of a 2.6 GB bank otherwise held up to 1 GB of it at once.
"""

from __future__ import annotations

import mmap

import numpy as np
import torch
import torch.nn.functional as F


def _folio_bytes() -> int:
    """The largest folio a page fault on a file mapping may map: the PMD size (2 MB on
    x86-64), the cap of the page cache's large folios."""
    try:
        return int(open("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size").read())
    except (OSError, ValueError):
        return 2 << 20


FOLIO_BYTES = _folio_bytes()


def _mapping(x: np.ndarray) -> mmap.mmap | None:
    """The mmap behind a memory-mapped array (np.memmap or np.load(mmap_mode=...)), if any."""
    base = x
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None)
    return base if isinstance(base, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED") else None


class FeatureRows:
    """A read-only view of ``x`` (N, D) (numpy array, memmap or torch tensor), or of its rows
    ``rows``, handing out float32 chunks on ``device``."""

    def __init__(
        self,
        x,
        rows: np.ndarray | None = None,
        device: torch.device | str = "cpu",
        normalise: bool = False,
        release_mb: int | None = 256,
    ):
        if isinstance(x, FeatureRows):
            raise TypeError("FeatureRows of FeatureRows: pass the underlying matrix")
        self.x = x
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        self.device = torch.device(device)
        self.normalise = normalise
        # release_mb None: never release (to measure what releasing saves)
        keep = release_mb is None
        self._map = _mapping(x) if isinstance(x, np.ndarray) and not keep else None
        self._release_mb = release_mb
        self._release_bytes = 0 if keep else release_mb << 20
        self._touched = 0

    def __len__(self) -> int:
        return len(self.rows) if self.rows is not None else len(self.x)

    @property
    def dim(self) -> int:
        return int(self.x.shape[1])

    @property
    def itemsize(self) -> int:
        """Bytes per stored value (2 for the float16 cache)."""
        return self.x.element_size() if isinstance(self.x, torch.Tensor) else self.x.itemsize

    def normalised(self) -> FeatureRows:
        """The same rows, L2-normalised per chunk."""
        return FeatureRows(self.x, self.rows, self.device, True, self._release_mb)

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` (of the view) as a fresh float32 (stop - start, D) tensor."""
        if self.rows is not None:
            return self._gather(self.rows[start:stop])
        return self._finish(self.x[start:stop], contiguous=True)

    def take(self, idx) -> torch.Tensor:
        """The listed rows (positions in the view) as a fresh float32 (len(idx), D) tensor."""
        if isinstance(idx, torch.Tensor):
            idx = idx.cpu().numpy()
        idx = np.asarray(idx, dtype=np.int64)
        return self._gather(self.rows[idx] if self.rows is not None else idx)

    def _gather(self, idx: np.ndarray) -> torch.Tensor:
        if isinstance(self.x, torch.Tensor):
            return self._finish(self.x[torch.from_numpy(idx).to(self.x.device)])
        group = max(1, self._release_bytes // FOLIO_BYTES)
        if self._map is None or len(idx) <= group:
            return self._finish(self.x[idx])
        # Each scattered row maps its whole folio (up to FOLIO_BYTES), so a 512-row gather of a
        # large file would hold 512 folios at once (1 GB): gather ``group`` rows at a time and
        # drop the pages in between, which bounds the mapped pages by release_mb.
        out = np.empty((len(idx), self.x.shape[1]), dtype=self.x.dtype)
        for s in range(0, len(idx), group):
            out[s : s + group] = self.x[idx[s : s + group]]
            self.release()
        return self._finish(out)

    def _finish(self, part, contiguous: bool = False) -> torch.Tensor:
        # normalising makes a fresh tensor anyway: no copy before it
        if isinstance(part, torch.Tensor):
            out = part.to(self.device, torch.float32, copy=not self.normalise)
        elif self.device.type != "cpu" and np.asarray(part).dtype != np.float32:
            # to a GPU the stored values travel (half the bytes of float32 for the float16
            # cache) and are converted there, exactly, instead of on the host
            out = torch.from_numpy(np.array(part)).to(self.device).float()
            self._account(part.nbytes, release=not contiguous)
        else:
            out = torch.from_numpy(np.asarray(part, dtype=np.float32)).to(self.device)
            same = out.data_ptr() == np.asarray(part).__array_interface__["data"][0]
            if same and not self.normalise:
                out = out.clone()  # a float32 in-memory array: never hand out its own memory
            self._account(part.nbytes, release=not contiguous)
        return F.normalize(out, dim=1) if self.normalise else out

    def _account(self, nbytes: int, release: bool) -> None:
        # Rows gathered from all over the file are released at once: a page fault on a file
        # mapping maps the cached pages around it too (fault-around, whole large folios: up to
        # megabytes per row), so the resident size of a gather cannot be told from its rows.
        if self._map is None:
            return
        self._touched += nbytes
        if release or self._touched > self._release_bytes:
            self.release()

    def release(self) -> None:
        """Drop the pages of the memory-mapped file from this process's resident set."""
        if self._map is not None:
            self._map.madvise(mmap.MADV_DONTNEED)
        self._touched = 0


def as_rows(x, device: torch.device | str | None = None) -> FeatureRows:
    """``x`` itself if it already is a FeatureRows, else a FeatureRows over it (on ``device``,
    by default the tensor's own device or the CPU)."""
    if isinstance(x, FeatureRows):
        return x
    if device is None:
        device = x.device if isinstance(x, torch.Tensor) else "cpu"
    return FeatureRows(x, device=device)
