"""The shapes generator's versions: the default (v2, the suite's data) renders exactly what it
rendered before ``generate`` learnt ``generator=``, so no dataset fingerprint, feature, unit or
result changes; ``generator=1`` renders version 1 as it was (commit 1725954), for the sizing
sweep's comparison (benchmarks/suite_sizing.py --sweep)."""

import hashlib
import inspect

import numpy as np
import pytest

from ssl_eval.data import shapes
from ssl_eval.data.shapes import generate

# sha256 of generate(6, 16, 3)'s images, by the code before the generator parameter existed
V2_SHA256 = "6785e90d95337777d70a1c4bac8d064a5aab65536831078519aac5dca82c2f34"
# version 1 (commit 1725954): each image's quadrant means (top-left, top-right, bottom-left,
# bottom-right). Its background is a float32 sine grating, whose last bits may differ between
# numpy's SIMD targets, so v1 is compared within a tolerance rather than to the byte.
V1_QUADRANTS = [
    [140.7, 143.1, 142.5, 142.4],
    [132.8, 87.5, 85.5, 86.4],
    [76.8, 88.9, 75.7, 76.9],
    [97.6, 101.3, 97.4, 97.3],
    [83.5, 84.4, 83.4, 108.5],
    [113.5, 113.7, 114.1, 113.3],
]
LABELS = {"shape": [4, 0, 1, 1, 1, 4], "colour": [5, 3, 0, 0, 1, 2], "position": [0, 0, 1, 1, 3, 2]}


def _quadrants(im: np.ndarray) -> np.ndarray:
    n, s = len(im), im.shape[1] // 2
    return im.astype(float).reshape(n, 2, s, 2, s, 3).mean(axis=(2, 4, 5)).reshape(n, 4)


def test_the_default_is_version_2_unchanged():
    assert shapes.GENERATOR_VERSION == 2
    assert inspect.signature(generate).parameters["generator"].default == 2
    im, lab = generate(6, 16, 3)
    assert hashlib.sha256(im.tobytes()).hexdigest() == V2_SHA256
    assert np.array_equal(im, generate(6, 16, 3, generator=2)[0])
    for k, v in LABELS.items():
        assert lab[k].tolist() == v


def test_version_1_renders_as_it_did():
    im, lab = generate(6, 16, 3, generator=1)
    np.testing.assert_allclose(_quadrants(im), V1_QUADRANTS, atol=0.5)
    for k, v in LABELS.items():  # the same labels: only the rendering differs
        assert lab[k].tolist() == v
    assert not np.array_equal(im, generate(6, 16, 3)[0])


def test_unknown_version_refused():
    with pytest.raises(ValueError, match="generator"):
        generate(2, 16, 0, generator=3)
