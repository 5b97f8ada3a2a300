"""Dense data: the shapes generator's masks and depth (the images unchanged, byte for byte),
and the official dense layouts (VOC 2012, ADE20K, Cityscapes, NYU Depth v2) read from a few
fake files in the exact structure, refused with one line naming what is missing."""

import hashlib

import numpy as np
import pytest
from PIL import Image

from ssl_eval.core.errors import UserError
from ssl_eval.data import shapes
from ssl_eval.data.datasets import DatasetOptions, get_dataset

V2_SHA256 = "6785e90d95337777d70a1c4bac8d064a5aab65536831078519aac5dca82c2f34"  # as test_shapes


def test_dense_shapes_keep_the_images_and_labels():
    im, lab, masks, depth = shapes.generate_dense(6, 16, 3)
    assert hashlib.sha256(im.tobytes()).hexdigest() == V2_SHA256
    im2, lab2 = shapes.generate(6, 16, 3)
    assert np.array_equal(im, im2) and all(np.array_equal(lab[k], lab2[k]) for k in lab)
    assert masks.shape == (6, 16, 16) and depth.shape == (6, 16, 16)


def test_masks_and_depth_follow_the_drawing():
    n, size = 60, 16
    im, lab, masks, depth = shapes.generate_dense(n, size, 7)
    for i in range(n):  # one shape class per image, on background
        assert set(np.unique(masks[i])) == {0, 1 + lab["shape"][i]}
    # the floor plane where no shape covers a pixel: the mean of its two supersampled rows
    yy = (np.arange(2 * size, dtype=np.float32) / (2 * size)).reshape(size, 2).mean(1)
    floor = shapes.DEPTH_FAR_FLOOR + (shapes.DEPTH_NEAR_FLOOR - shapes.DEPTH_FAR_FLOOR) * yy
    corner = depth[:, 0, 0]  # the top-left pixel: background unless a shape reaches it
    bg = masks[:, 0, 0] == 0
    np.testing.assert_allclose(corner[bg], floor[0], rtol=1e-6)
    # a pixel inside the shape: DEPTH_SCALE / r, nearer for larger sizes
    inside = [depth[i][masks[i] > 0].min() for i in range(n)]
    lo, hi = shapes._SIZE_RANGES[2][0][0], shapes._SIZE_RANGES[2][2][1]
    assert min(inside) >= shapes.DEPTH_SCALE / hi - 1e-5 and max(inside) <= shapes.DEPTH_SCALE / lo
    by_size = [np.mean([inside[i] for i in range(n) if lab["size"][i] == s]) for s in range(3)]
    assert by_size[0] > by_size[1] > by_size[2]
    area = [masks[i].astype(bool).mean() for i in range(n)]
    a = [np.mean([area[i] for i in range(n) if lab["size"][i] == s]) for s in range(3)]
    assert a[0] < a[1] < a[2]


def test_shapes_seg_dataset_is_offline(monkeypatch):
    from ssl_eval.data import dense

    monkeypatch.setattr(dense, "SHAPES_DENSE_TRAIN", 12)  # the registered sizes: 2,000 / 500
    monkeypatch.setattr(dense, "SHAPES_DENSE_TEST", 4)
    b = get_dataset("shapes-seg", DatasetOptions())
    assert b.dense.task == "segmentation" and b.dense.classes[0] == "background"
    assert b.dense.train.load(0).shape == b.train.load(0).shape[:2]
    d = get_dataset("shapes-depth", DatasetOptions())
    assert d.dense.task == "depth" and d.dense.test.load(0).dtype == np.float32


def _png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _jpg(path, h=24, w=32):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 120, np.uint8)).save(path)


def test_voc2012_layout(tmp_path):
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    ids = {"train": ["2007_000032"], "val": ["2007_000033"]}
    for split, names in ids.items():
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
        for n in names:
            _jpg(voc / "JPEGImages" / f"{n}.jpg")
            m = np.zeros((24, 32), np.uint8)
            m[5:10, 5:10], m[10, :] = 15, 255  # a person and the border
            palette = [0, 0, 0, 128, 0, 0] + [0, 0, 0] * 13 + [192, 128, 128] + [0] * 3 * 240
            (voc / "SegmentationClass").mkdir(exist_ok=True)
            im = Image.fromarray(m, "L").convert("P")  # a palette PNG, as VOC ships
            im.putpalette(palette[:768])
            im.save(voc / "SegmentationClass" / f"{n}.png")
    b = get_dataset("voc2012-seg", DatasetOptions(data_root=tmp_path))
    assert len(b.classes) == 21 and b.dense.classes[15] == "person"
    t = b.dense.test.load(0)
    assert t.shape == (24, 32) and t[6, 6] == 15 and t[10, 0] == 255 and t[0, 0] == 0
    (voc / "SegmentationClass" / "2007_000033.png").unlink()
    with pytest.raises(UserError, match="2007_000033.png is missing"):
        get_dataset("voc2012-seg", DatasetOptions(data_root=tmp_path))
    with pytest.raises(UserError, match="--data-root"):
        get_dataset("voc2012-seg", DatasetOptions())


def test_ade20k_layout_reduces_the_zero_label(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    for folder, stem in (("training", "ADE_train_00000001"), ("validation", "ADE_val_00000001")):
        _jpg(base / "images" / folder / f"{stem}.jpg")
        m = np.zeros((24, 32), np.uint8)
        m[:12], m[12:, :5] = 1, 150  # wall (1), the last class (150), other (0)
        _png(base / "annotations" / folder / f"{stem}.png", m)
    b = get_dataset("ade20k", DatasetOptions(data_root=tmp_path))
    t = b.dense.test.load(0)
    assert len(b.dense.classes) == 150
    assert t[0, 0] == 0 and t[20, 0] == 149 and t[20, 20] == 255
    (base / "annotations" / "training" / "ADE_train_00000001.png").unlink()
    with pytest.raises(UserError, match="ADE_train_00000001.png is missing"):
        get_dataset("ade20k", DatasetOptions(data_root=tmp_path))


@pytest.mark.slow  # the first import of torchvision takes seconds on its own
def test_cityscapes_layout_maps_train_ids(tmp_path):
    for split in ("train", "val"):
        stem = f"aachen_000000_00001{'9' if split == 'train' else '8'}"
        _png(tmp_path / "leftImg8bit" / split / "aachen" / f"{stem}_leftImg8bit.png",
             np.full((16, 32, 3), 90, np.uint8))  # fmt: skip
        m = np.zeros((16, 32), np.uint8)
        m[:4], m[4:8], m[8:12] = 7, 26, 33  # road -> 0, car -> 13, bicycle -> 18
        _png(tmp_path / "gtFine" / split / "aachen" / f"{stem}_gtFine_labelIds.png", m)
    b = get_dataset("cityscapes", DatasetOptions(data_root=tmp_path))
    t = b.dense.train.load(0)
    assert len(b.dense.classes) == 19 and b.dense.classes[13] == "car"
    assert (t[0, 0], t[5, 0], t[9, 0], t[13, 0]) == (0, 13, 18, 255)
    next((tmp_path / "gtFine" / "val").rglob("*.png")).unlink()
    with pytest.raises(UserError, match="gtFine_labelIds.png is missing"):
        get_dataset("cityscapes", DatasetOptions(data_root=tmp_path))


def test_nyu_eigen_layout_reads_millimetres(tmp_path):
    rows = {"nyu_train.txt": "/kitchen_0028a/rgb_00045.jpg /kitchen_0028a/sync_depth_00045.png",
            "nyu_test.txt": "bathroom/rgb_00045.jpg bathroom/sync_depth_00045.png"}  # fmt: skip
    for listed, line in rows.items():
        (tmp_path / listed).write_text(line + " 518.8579\n")
        img, dep = line.split()
        _jpg(tmp_path / img.strip("/"), 48, 64)
        d = np.full((48, 64), 2500, np.uint16)
        d[0, 0] = 0  # no measurement
        _png(tmp_path / dep.strip("/"), d)
    b = get_dataset("nyu-depth", DatasetOptions(data_root=tmp_path))
    t = b.dense.test.load(0)
    assert b.dense.task == "depth" and t.dtype == np.float32
    assert t[1, 1] == pytest.approx(2.5) and t[0, 0] == 0
    assert b.dense.eval_box == (45 / 480, 471 / 480, 41 / 640, 601 / 640)
    (tmp_path / "nyu_test.txt").unlink()
    with pytest.raises(UserError, match="nyu_test.txt is missing"):
        get_dataset("nyu-depth", DatasetOptions(data_root=tmp_path))


def _ade_base(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    for folder, stem in (("training", "ADE_train_00000001"), ("validation", "ADE_val_00000001")):
        _jpg(base / "images" / folder / f"{stem}.jpg")
        _png(base / "annotations" / folder / f"{stem}.png", np.ones((24, 32), np.uint8))
    return base


def test_ade20k_class_names_from_the_official_txt_and_the_csail_csv(tmp_path):
    """objectInfo150.txt as ADEChallengeData2016.zip ships it (tab-separated, header Idx Ratio
    Train Val Name, synonyms after commas) and the CSAIL repository's objectInfo150.csv
    (comma-separated with a Stuff column, synonyms after semicolons): the first synonym."""
    base = _ade_base(tmp_path)
    rest = [f"thing{i}" for i in range(3, 151)]
    txt = ["Idx\tRatio\tTrain\tVal\tName", "1\t0.1576\t11664\t1172\twall",
           "2\t0.1072\t6046\t612\tbuilding, edifice"]  # fmt: skip
    txt += [f"{i}\t0.001\t10\t1\t{n}, other name" for i, n in enumerate(rest, 3)]
    (base / "objectInfo150.txt").write_text("\n".join(txt) + "\n")
    b = get_dataset("ade20k", DatasetOptions(data_root=tmp_path))
    assert b.dense.classes[:3] == ("wall", "building", "thing3") and len(b.dense.classes) == 150
    (base / "objectInfo150.txt").unlink()
    csv = ["Idx,Ratio,Train,Val,Stuff,Name", "1,0.1576,11664,1172,1,wall",
           "2,0.1072,6046,612,1,building;edifice"]  # fmt: skip
    csv += [f"{i},0.001,10,1,0,{n};other" for i, n in enumerate(rest, 3)]
    (base / "objectInfo150.csv").write_text("\n".join(csv) + "\n")
    b = get_dataset("ade20k", DatasetOptions(data_root=tmp_path))
    assert b.dense.classes[:3] == ("wall", "building", "thing3") and len(b.dense.classes) == 150
    (base / "objectInfo150.csv").write_text("\n".join(csv[:-1]) + "\n")
    with pytest.raises(UserError, match="lists 149 classes"):
        get_dataset("ade20k", DatasetOptions(data_root=tmp_path))


def test_voc2012_download_only_when_absent_and_a_failed_download_in_one_line(tmp_path, monkeypatch):
    """--download on a VOC folder already in place reads it (torchvision's VOCSegmentation
    fetches the 2 GB archive again whenever download=True); on an empty folder a download that
    fails (no network) is one line naming the folder and what to place there."""
    import urllib.error

    import torchvision.datasets

    calls = []

    def offline_voc(root, **kw):
        calls.append(root)
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torchvision.datasets, "VOCSegmentation", offline_voc)
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    for split, n in (("train", "2007_000032"), ("val", "2007_000033")):
        (voc / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text(n + "\n")
        _jpg(voc / "JPEGImages" / f"{n}.jpg")
        _png(voc / "SegmentationClass" / f"{n}.png", np.zeros((24, 32), np.uint8))
    b = get_dataset("voc2012-seg", DatasetOptions(data_root=tmp_path, download=True))
    assert len(b.train) == 1 and calls == []
    empty = tmp_path / "empty"
    with pytest.raises(UserError, match="could not download VOC 2012 into") as e:
        get_dataset("voc2012-seg", DatasetOptions(data_root=empty, download=True))
    assert "\n" not in str(e.value) and str(empty) in str(e.value) and len(calls) == 1


def test_the_dense_datasets_listing_says_which_download():
    """`ssl-eval list datasets` says --download where it fetches (VOC 2012 through torchvision)
    and nowhere else among the dense sets (ADE20K, Cityscapes and NYU are placed by hand)."""
    from ssl_eval.data.datasets import DATASETS

    help_of = {e.name: e.help for e in DATASETS.entries()}
    assert "--download" in help_of["voc2012-seg"]
    assert not any("--download" in help_of[n] for n in ("ade20k", "cityscapes", "nyu-depth"))
