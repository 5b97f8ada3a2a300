"""Optional speed paths of feature extraction: channels-last memory format, torch.compile and
pinned host memory. Each is off by default; the GPU figures that would justify turning one on
by default are not measured yet (docs/gpu.md, benchmarks/gpu_checks.py).

Channels-last and compile run other kernels, whose float results may differ in the last bits,
so they enter the feature-cache key (``Accel.key``); pinned memory changes only how bytes
travel to the GPU, not the features, and stays out of it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Accel:
    channels_last: bool = False  # feed the model NHWC-strided tensors, weights converted too
    compile: bool = False  # torch.compile the forward pass (inductor)
    pin_memory: bool = False  # page-locked host batches, copied to the GPU asynchronously

    def key(self) -> dict:
        """The options that can change the features' values (empty with the defaults, so
        default cache keys are those of a run without these options)."""
        return {
            k: True
            for k, on in (("channels_last", self.channels_last), ("compile", self.compile))
            if on
        }

    def record(self, device_type: str) -> dict:
        """Every option as it ran, for the result record (pinned memory only runs on a GPU)."""
        return {
            "channels_last": self.channels_last,
            "compile": self.compile,
            "pin_memory": self.pin_memory and device_type == "cuda",
        }

    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format


@contextlib.contextmanager
def prepared(backbone, accel: Accel) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """The backbone's ``embed`` as ``accel`` asks: weights in channels-last for the duration
    (restored afterwards: the backbone is shared with other protocols), compiled if asked."""
    model = backbone.model
    if accel.channels_last:
        model.to(memory_format=torch.channels_last)
    try:
        fn = backbone.embed
        if accel.compile:
            fn = torch.compile(fn)
        yield fn
    finally:
        if accel.channels_last:
            model.to(memory_format=torch.contiguous_format)
