"""Fake transfer datasets in the exact on-disk layouts torchvision reads (file names and
annotation formats from torchvision/datasets/*.py and the datasets' official archives): a few
tiny flat-colour JPEGs per class, whose colour is the class, so a pixel k-NN scores well."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def jpeg(path: Path, c: int, i: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = [(70 * c + 3 * i) % 256, (40 * c) % 256, (200 - 50 * c) % 256]
    Image.fromarray(np.full((8, 8, 3), colour, dtype=np.uint8)).save(path, quality=95)


def _savemat(path: Path, data: dict) -> None:
    from scipy.io import savemat

    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(str(path), data)


def food101(root: Path, classes=("apple_pie", "baby_back_ribs"), n=(3, 2)) -> dict:
    base = root / "food-101"
    meta = {}
    for s, k in zip(("train", "test"), n, strict=True):
        meta[s] = {c: [f"{c}/{s}{i}" for i in range(k)] for c in classes}
        for ci, c in enumerate(classes):
            for i in range(k):
                jpeg(base / "images" / c / f"{s}{i}.jpg", ci, i)
    (base / "meta").mkdir(parents=True, exist_ok=True)
    for s in meta:
        (base / "meta" / f"{s}.json").write_text(json.dumps(meta[s]))
    return {"train": n[0] * len(classes), "test": n[1] * len(classes), "classes": len(classes)}


def sun397(root: Path) -> dict:
    base = root / "SUN397"
    classes = ["/a/abbey", "/b/beach"]
    base.mkdir(parents=True, exist_ok=True)
    (base / "ClassName.txt").write_text("\n".join(classes) + "\n")
    split = {"Training_01.txt": [], "Testing_01.txt": []}
    for ci, c in enumerate(classes):
        for i in range(5):
            rel = f"{c}/sun_{ci}{i}.jpg"
            jpeg(base / rel.lstrip("/"), ci, i)
            split["Training_01.txt" if i < 3 else "Testing_01.txt"].append(rel)
    for f, rels in split.items():
        (base / f).write_text("\n".join(rels) + "\n")
    return {"train": 6, "test": 4, "classes": 2}


def stanford_cars(root: Path) -> dict:
    base = root / "stanford_cars"
    _savemat(
        base / "devkit" / "cars_meta.mat",
        {"class_names": np.array(["AM General", "Audi"], dtype=object)},
    )
    for mat, folder, n in (
        (base / "devkit" / "cars_train_annos.mat", "cars_train", 3),
        (base / "cars_test_annos_withlabels.mat", "cars_test", 2),
    ):
        rows = []
        for c in range(2):
            for i in range(n):
                name = f"{c}{i:04d}.jpg"
                jpeg(base / folder / name, c, i)
                rows.append((1, 1, 8, 8, c + 1, name))
        dt = [(k, "O") for k in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")]
        _savemat(mat, {"annotations": np.array(rows, dtype=dt)})
    return {"train": 6, "test": 4, "classes": 2}


def fgvc_aircraft(root: Path) -> dict:
    data = root / "fgvc-aircraft-2013b" / "data"
    classes = ["707-320", "A300B4"]
    data.mkdir(parents=True, exist_ok=True)
    (data / "variants.txt").write_text("\n".join(classes) + "\n")
    for s, n in (("trainval", 4), ("test", 2)):
        lines = []
        for ci, c in enumerate(classes):
            for i in range(n):
                img = f"{s[:2]}{ci}{i:04d}"
                jpeg(data / "images" / f"{img}.jpg", ci, i)
                lines.append(f"{img} {c}")
        (data / f"images_variant_{s}.txt").write_text("\n".join(lines) + "\n")
    return {"train": 8, "test": 4, "classes": 2}


def dtd(root: Path) -> dict:
    base = root / "dtd" / "dtd"
    classes = ["banded", "blotchy"]
    for s, n in (("train", 2), ("val", 1), ("test", 2)):
        lines = []
        for ci, c in enumerate(classes):
            for i in range(n):
                rel = f"{c}/{c}_{s}{i}.jpg"
                jpeg(base / "images" / rel, ci, i)
                lines.append(rel)
        (base / "labels").mkdir(parents=True, exist_ok=True)
        (base / "labels" / f"{s}1.txt").write_text("\n".join(lines) + "\n")
    return {"train": 6, "test": 4, "classes": 2}


def oxford_pets(root: Path) -> dict:
    base = root / "oxford-iiit-pet"
    breeds = [("Abyssinian", 1), ("american_bulldog", 2)]  # (name, species 1 cat / 2 dog)
    (base / "annotations").mkdir(parents=True, exist_ok=True)
    for s, n, first in (("trainval", 3, 100), ("test", 2, 200)):
        lines = []
        for ci, (b, species) in enumerate(breeds):
            for i in range(n):
                img = f"{b}_{first + i}"
                jpeg(base / "images" / f"{img}.jpg", ci, i)
                lines.append(f"{img} {ci + 1} {species} {i + 1}")
        (base / "annotations" / f"{s}.txt").write_text("\n".join(lines) + "\n")
    return {"train": 6, "test": 4, "classes": 2}


def caltech101(root: Path, per_class=(32, 33)) -> dict:
    base = root / "caltech101" / "101_ObjectCategories"
    for ci, (c, n) in enumerate(zip(("Faces", "accordion"), per_class, strict=True)):
        for i in range(n):
            jpeg(base / c / f"image_{i + 1:04d}.jpg", ci, i)
    for i in range(3):  # torchvision's Caltech101 leaves the background class out
        jpeg(base / "BACKGROUND_Google" / f"image_{i + 1:04d}.jpg", 3, i)
    return {"train": 60, "test": sum(per_class) - 60, "classes": 2}


def flowers102(root: Path) -> dict:
    base = root / "flowers-102"
    labels = np.array([1, 1, 2, 2, 1, 2, 1, 1, 2, 1, 1, 2])  # image_00001 ... image_00012
    for i, y in enumerate(labels, 1):  # image 12 looks like class 1: a k-NN gets it wrong
        jpeg(base / "jpg" / f"image_{i:05d}.jpg", 0 if i == 12 else int(y) - 1, i)
    _savemat(base / "imagelabels.mat", {"labels": labels.reshape(1, -1)})
    _savemat(
        base / "setid.mat",
        {
            "trnid": np.array([[1, 3, 5, 6]]),
            "valid": np.array([[2, 4]]),
            "tstid": np.array([[7, 8, 9, 10, 11, 12]]),
        },
    )
    return {"train": 6, "test": 6, "classes": 102}


# (image, [(class, difficult)]) per split; colours follow the first object's class
VOC_IMAGES = {
    "trainval": [
        ("000005", [("chair", 0), ("chair", 1)]),
        ("000007", [("car", 0)]),
        ("000009", [("horse", 0), ("person", 0)]),
        ("000012", [("car", 0), ("person", 1)]),
    ],
    "test": [("000001", [("dog", 0), ("person", 0)]), ("000002", [("train", 0)])],
}


def voc2007(root: Path, images=None) -> dict:
    base = root / "VOCdevkit" / "VOC2007"
    (base / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    (base / "Annotations").mkdir(parents=True, exist_ok=True)
    for s, rows in (images or VOC_IMAGES).items():
        for n, (img, objects) in enumerate(rows):
            from ssl_eval.data.transfer import VOC_CLASSES

            jpeg(base / "JPEGImages" / f"{img}.jpg", VOC_CLASSES.index(objects[0][0]), n)
            objs = "".join(
                f"<object><name>{c}</name><pose>Left</pose><truncated>0</truncated>"
                f"<difficult>{d}</difficult><bndbox><xmin>1</xmin><ymin>1</ymin>"
                "<xmax>8</xmax><ymax>8</ymax></bndbox></object>"
                for c, d in objects
            )
            (base / "Annotations" / f"{img}.xml").write_text(
                f"<annotation><folder>VOC2007</folder><filename>{img}.jpg</filename>"
                f"<size><width>8</width><height>8</height><depth>3</depth></size>{objs}</annotation>"
            )
        (base / "ImageSets" / "Main" / f"{s}.txt").write_text("\n".join(r[0] for r in rows) + "\n")
    return {
        "train": len((images or VOC_IMAGES)["trainval"]),
        "test": len((images or VOC_IMAGES)["test"]),
        "classes": 20,
    }


def voc2007_every_class(root: Path, train: int = 6, test: int = 2) -> dict:
    """A VOC2007 fake in which every class has images of its own (one object, a second one
    of the next class on every third image) in trainval and test."""
    from ssl_eval.data.transfer import VOC_CLASSES

    images = {"trainval": [], "test": []}
    for s, n in (("trainval", train), ("test", test)):
        for c, name in enumerate(VOC_CLASSES):
            for i in range(n):
                objects = [(name, 0)] + ([(VOC_CLASSES[(c + 1) % 20], 0)] if i % 3 == 2 else [])
                images[s].append((f"{s[:2]}{c:02d}{i:02d}", objects))
    return voc2007(root, images)


BUILDERS = {
    "food101": food101,
    "sun397": sun397,
    "stanford_cars": stanford_cars,
    "fgvc_aircraft": fgvc_aircraft,
    "dtd": dtd,
    "oxford_pets": oxford_pets,
    "caltech101": caltech101,
    "flowers102": flowers102,
    "voc2007": voc2007,
}
