"""The decode cache (ssl_eval/features/decode_cache.py): the features it gives are the per-image path's,
bit for bit; entries are shared by backbones with the same resize/crop and only by them; a
damaged entry is rebuilt; changed image files make a new entry."""

import numpy as np
import pytest
import torch
from conftest import image_folder
from PIL import Image

from ssl_eval.backbones import BuildOptions, build_backbone
from ssl_eval.core.config import RunConfig
from ssl_eval.data.datasets import DatasetOptions, get_dataset
from ssl_eval.data.transforms import Preprocessing
from ssl_eval.features.accel import Accel
from ssl_eval.features.decode_cache import decode_key, decoded, native_bundle
from ssl_eval.features.extraction import extract
from ssl_eval.orchestrate.evaluate import run
from ssl_eval.protocols.cards import load_cards

CPU = torch.device("cpu")


def _noisy_folder(root, shape=(20, 24)):
    """Textured JPEGs (not flat colours): resizing them really interpolates."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(2):
            d = root / split / f"c{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(5):
                img = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
                Image.fromarray(img).save(d / f"{i}.jpg", quality=90)
    return get_dataset(f"folder:{root}", DatasetOptions())


def _entries(cache):
    return sorted(p.name for p in (cache / "decoded").iterdir() if not p.name.startswith("."))


def test_features_from_the_decode_cache_are_bitwise_those_of_the_per_image_path(tmp_path):
    ds = _noisy_folder(tmp_path / "imgs")  # 20x24: resized to 16 (interpolated), then cropped
    bb = build_backbone("random:cifar_resnet_tiny", BuildOptions(image_size=16))
    kw = dict(device=CPU, dtype="float32", progress=False, batch_size=4, num_workers=0)
    plain = extract(bb, ds, "train", cache_dir=tmp_path / "a", **kw)
    fast = extract(bb, ds, "train", cache_dir=tmp_path / "b", decode_cache=True, **kw)
    assert not fast.cache_hit and _entries(tmp_path / "b")  # it did go through the map
    np.testing.assert_array_equal(np.asarray(plain.features), np.asarray(fast.features))
    np.testing.assert_array_equal(plain.labels, fast.labels)
    assert plain.key == fast.key  # same features, same feature-cache key


def test_one_entry_serves_backbones_with_the_same_resize_and_crop_only(tmp_path, capsys):
    ds = _noisy_folder(tmp_path / "imgs")
    cache = tmp_path / "cache"
    kw = dict(cache_dir=cache, device=CPU, progress=False, decode_cache=True, num_workers=0)
    pixels16 = build_backbone("pixels", BuildOptions(image_size=16))  # mean 0, std 1
    resnet16 = build_backbone("random:cifar_resnet_tiny", BuildOptions(image_size=16))  # ImageNet
    assert pixels16.preprocessing.mean != resnet16.preprocessing.mean
    extract(pixels16, ds, "test", **kw)
    extract(resnet16, ds, "test", **kw)
    assert len(_entries(cache)) == 1
    assert "reusing decoded" in capsys.readouterr().err
    extract(build_backbone("pixels", BuildOptions(image_size=12)), ds, "test", **kw)
    assert len(_entries(cache)) == 2
    bicubic = Preprocessing(resize=16, crop=16, interpolation="bicubic")  # timm resnet18: 17/16
    assert decode_key(ds, "test", bicubic) != decode_key(ds, "test", resnet16.preprocessing)
    assert decode_key(ds, "train", resnet16.preprocessing) != decode_key(
        ds, "test", resnet16.preprocessing
    )


def test_a_damaged_entry_is_discarded_and_rebuilt(tmp_path, capsys):
    ds = _noisy_folder(tmp_path / "imgs")
    pre = Preprocessing(resize=16, crop=16)
    first = decoded(ds, "train", pre, cache_dir=tmp_path, progress=False)
    assert decoded(ds, "train", pre, cache_dir=tmp_path, progress=False).cache_hit  # verified
    good = np.array(first.images)
    path = first.path / "images.npy"
    del first
    raw = bytearray(path.read_bytes())
    raw[-7] ^= 0xFF  # one pixel of the last image
    path.write_bytes(bytes(raw))
    again = decoded(ds, "train", pre, cache_dir=tmp_path, progress=False)
    assert "is damaged" in capsys.readouterr().err and not again.cache_hit
    np.testing.assert_array_equal(np.asarray(again.images), good)
    assert decoded(ds, "train", pre, cache_dir=tmp_path, progress=False).cache_hit


def test_changed_image_files_make_a_new_entry(tmp_path):
    root = image_folder(tmp_path / "imgs")
    pre = Preprocessing(resize=8, crop=8)
    ds = get_dataset(f"folder:{root}", DatasetOptions())
    before = decoded(ds, "train", pre, cache_dir=tmp_path / "c", progress=False)
    # same size, same name, other pixels
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(root / "train" / "c0" / "0.png")
    ds2 = get_dataset(f"folder:{root}", DatasetOptions())
    after = decoded(ds2, "train", pre, cache_dir=tmp_path / "c", progress=False)
    assert after.key != before.key and not after.cache_hit
    assert (np.asarray(after.images[0]) == 200).all() and not (
        np.asarray(before.images[0]) == 200
    ).all()


def test_native_bundle_gives_the_decoded_full_images_or_refuses_mixed_sizes(tmp_path):
    ds = _noisy_folder(tmp_path / "imgs")
    native, how = native_bundle(ds, cache_dir=tmp_path / "c", progress=False)
    assert how.startswith("decode cache")
    for i in range(len(ds.train)):
        np.testing.assert_array_equal(native.train.load(i), ds.train.load(i))
    assert native.train.load(0).flags.writeable  # copy-on-write: torch.from_numpy takes it
    mixed = get_dataset(
        f"folder:{image_folder(tmp_path / 'mixed', shape=lambda c, i: (8, 8 + i))}",
        DatasetOptions(),
    )
    same, how = native_bundle(mixed, cache_dir=tmp_path / "c", progress=False)
    assert same is mixed and "sizes" in how


def test_run_with_decode_cache_records_it_and_keeps_the_unit_key(tmp_path):
    ds_root = _noisy_folder(tmp_path / "imgs")
    del ds_root
    base = dict(
        backbones=("pixels",),
        datasets=(f"folder:{tmp_path / 'imgs'}",),
        protocols=load_cards(["knn"], ["ks=[1]"]),
        cache_dir=tmp_path / "cache",
        image_size=8,
        progress=False,
        num_workers=0,
    )
    (on,) = run(RunConfig(results_dir=tmp_path / "r1", decode_cache=True, pin_memory=True, **base))
    (off,) = run(RunConfig(results_dir=tmp_path / "r2", **base))
    assert on.metrics == off.metrics and on.path.name.split("-")[0] == off.path.name.split("-")[0]
    assert _entries(tmp_path / "cache")  # the first run did read through the decode cache
    import json

    rec = json.loads(on.path.read_text())
    details = (rec[0] if isinstance(rec, list) else rec["records"][0])["details"]
    assert details["decode_cache"] is True and details["accel"]["channels_last"] is False
    assert details["accel"]["pin_memory"] is False  # asked for, but the CPU copies nothing to a GPU


def test_channels_last_and_compile_enter_the_feature_key_pinned_memory_does_not(tmp_path):
    ds = _noisy_folder(tmp_path / "imgs")
    bb = build_backbone("random:cifar_resnet_tiny", BuildOptions(image_size=16))
    kw = dict(cache_dir=tmp_path, device=CPU, dtype="float32", progress=False, num_workers=0)
    plain = extract(bb, ds, "test", **kw)
    pinned = extract(bb, ds, "test", accel=Accel(pin_memory=True), **kw)  # a no-op on the CPU
    assert pinned.key == plain.key and pinned.cache_hit
    cl = extract(bb, ds, "test", accel=Accel(channels_last=True), **kw)
    assert cl.key != plain.key
    np.testing.assert_allclose(np.asarray(cl.features), np.asarray(plain.features), atol=1e-5)
    conv = next(m for m in bb.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous()  # the shared backbone's weights are given back as they were


def test_compile_compiles_the_forward_and_enters_the_key(tmp_path, monkeypatch):
    """torch.compile itself takes about a minute on this CPU: a spy stands in for it here;
    benchmarks/gpu_checks.py runs the real one."""
    compiled = []

    def spy(fn, **kw):
        compiled.append(fn)
        return fn

    monkeypatch.setattr(torch, "compile", spy)
    ds = _noisy_folder(tmp_path / "imgs")
    bb = build_backbone("random:cifar_resnet_tiny", BuildOptions(image_size=16))
    kw = dict(cache_dir=tmp_path, device=CPU, progress=False, num_workers=0)
    plain = extract(bb, ds, "test", **kw)
    comp = extract(bb, ds, "test", accel=Accel(compile=True), **kw)
    assert compiled == [bb.embed] and comp.key != plain.key


@pytest.mark.parametrize("channels_last", [False, True])
def test_decoded_batches_come_in_order_in_the_asked_layout(tmp_path, channels_last):
    ds = _noisy_folder(tmp_path / "imgs")
    got = decoded(
        ds, "train", Preprocessing(resize=16, crop=16), cache_dir=tmp_path, progress=False
    )
    parts = list(got.batches(3, channels_last=channels_last))
    assert [len(p) for p in parts] == [3, 3, 3, 1]
    x = torch.cat(parts)
    np.testing.assert_array_equal(x.permute(0, 2, 3, 1).numpy(), np.asarray(got.images))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert all(p.is_contiguous(memory_format=fmt) for p in parts)


def test_loading_images_leaves_the_global_rng_alone(tmp_path):
    """A DataLoader without its own generator draws its workers' base seed from the global RNG
    each time it is iterated: extraction, the decode cache's build and the augmented probe's
    shared forwards would each move the draws of whatever runs after them."""
    from ssl_eval.protocols._shared_forward import SharedForward

    ds = _noisy_folder(tmp_path / "imgs")
    bb = build_backbone("random:cifar_resnet_tiny", BuildOptions(image_size=16))
    kw = dict(device=CPU, progress=False, batch_size=4, num_workers=0)
    torch.manual_seed(3)
    before = torch.get_rng_state()
    extract(bb, ds, "train", cache_dir=tmp_path / "a", **kw)
    assert torch.equal(torch.get_rng_state(), before), "per-image extraction moved the RNG"
    extract(bb, ds, "train", cache_dir=tmp_path / "b", decode_cache=True, **kw)
    assert torch.equal(torch.get_rng_state(), before), "the decode cache moved the RNG"
    fwd = SharedForward(lambda x: x.float().mean((1, 2, 3)), {"num_workers": 0}, CPU)
    data = [(torch.full((3, 2, 2), i, dtype=torch.uint8), i) for i in range(6)]
    got = [y.tolist() for _, y in fwd.cuts(data, [[0, 1], [2, 3], [4, 5]])]
    assert got == [[0, 1], [2, 3], [4, 5]]
    assert torch.equal(torch.get_rng_state(), before), "the shared forward moved the RNG"
