"""ImageNet-1k from its folder layout, and the robustness test sets evaluated with the head or
bank trained on it (ImageNet-V2, -A, -R, -Sketch).

Under ``--data-root``:

* ``imagenet/train/<wnid>/*.JPEG`` (1,000 class folders, their sorted wnids the class order
  every ImageNet model uses) and the validation images either as ``imagenet/val/<wnid>/``
  (torchvision's ImageNet layout) or flat in ``imagenet/val/`` with the official labels of the
  devkit: ``imagenet/ILSVRC2012_devkit_t12/data/meta.mat`` (ILSVRC2012_ID -> wnid) and
  ``.../data/ILSVRC2012_validation_ground_truth.txt`` (one ID per image, in file-name order);
* ``imagenetv2-matched-frequency-format-val/<class index>/`` (ImageNet-V2, folders named by the
  class index 0..999, as its tarball extracts);
* ``imagenet-a/<wnid>/`` and ``imagenet-r/<wnid>/`` (200 classes each, as their tarballs);
* ``sketch/<wnid>/`` (ImageNet-Sketch, 1,000 classes, as its zip extracts).

``imagenet`` is ImageNet alone; ``imagenet-robust`` adds the four sets as extra test splits
(``DatasetBundle.extra_tests``), each labelled in ImageNet's 1,000-class indices, and for
ImageNet-A and -R the classes they cover (``class_subsets``): a prediction there is the best of
those 200 classes, as their authors evaluate (hendrycks/natural-adv-examples and
hendrycks/imagenet-r: the logits restricted to ``indices_in_1k`` before the arg max)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from ..core.errors import UserError
from .datasets import (
    DATASETS,
    IMAGE_SUFFIXES,
    DatasetBundle,
    DatasetOptions,
    DatasetSpec,
    ImageSplit,
)

DEVKIT = "ILSVRC2012_devkit_t12/data"
ROBUSTNESS = {  # name -> (folder under --data-root, how its class folders are named)
    "imagenet-v2": ("imagenetv2-matched-frequency-format-val", "index"),
    "imagenet-a": ("imagenet-a", "wnid"),
    "imagenet-r": ("imagenet-r", "wnid"),
    "imagenet-sketch": ("sketch", "wnid"),
}
SUBSET_SETS = ("imagenet-a", "imagenet-r")  # evaluated on the classes they cover


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def _class_folders(split: Path, classes: list[str], by: str) -> tuple[list[Path], list[int]]:
    """Images and 1,000-class labels of a folder of class folders (``by``: wnid or index)."""
    index = {c: i for i, c in enumerate(classes)}
    paths, labels = [], []
    for d in sorted(p for p in split.iterdir() if p.is_dir()):
        if by == "index":
            ok = d.name.isdigit() and int(d.name) < len(classes)
            label = int(d.name) if ok else -1
        else:
            label = index.get(d.name, -1)
        if label < 0:
            raise UserError(
                f"{d} is no ImageNet class ({'an index 0..' + str(len(classes) - 1) if by == 'index' else 'a wnid of imagenet/train/'}); "
                "remove it or use the official layout"
            )
        files = _images(d)
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise UserError(f"no images found under {split}; use the official layout")
    return paths, labels


def _flat_val(root: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    from scipy.io import loadmat

    devkit = root / "imagenet" / DEVKIT
    for f in ("meta.mat", "ILSVRC2012_validation_ground_truth.txt"):
        if not (devkit / f).is_file():
            raise UserError(
                f"imagenet/val/ has no class folders and imagenet/{DEVKIT}/{f} is missing: put "
                "the official devkit there (its labels name each flat validation image's class) "
                "or arrange val/ as val/<wnid>/"
            )
    synsets = loadmat(str(devkit / "meta.mat"), squeeze_me=True)["synsets"]
    id_to_wnid = {int(s[0]): str(s[1]) for s in synsets if int(s[4]) == 0}  # leaves: the classes
    ids = [int(x) for x in (devkit / "ILSVRC2012_validation_ground_truth.txt").read_text().split()]
    paths = _images(root / "imagenet" / "val")
    if len(paths) != len(ids):
        raise UserError(
            f"imagenet/val/ holds {len(paths)} images but the devkit labels {len(ids)}; "
            "use the complete official validation set"
        )
    index = {c: i for i, c in enumerate(classes)}
    return paths, [index[id_to_wnid[i]] for i in ids]


def _load(name: str, opt: DatasetOptions) -> DatasetBundle:
    if opt.data_root is None:
        raise UserError(f"dataset {name!r} needs --data-root DIR (the folder that holds imagenet/)")
    root = Path(opt.data_root).expanduser().resolve()
    train_dir, val_dir = root / "imagenet" / "train", root / "imagenet" / "val"
    for d in (train_dir, val_dir):
        if not d.is_dir():
            raise UserError(
                f"dataset {name!r} is incomplete under {root}: missing {d.relative_to(root)}/; "
                "place ImageNet there (train/<wnid>/, val/<wnid>/ or val/ with the devkit); "
                "it cannot be downloaded (its licence needs an account)"
            )
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    tr_paths, tr_labels = _class_folders(train_dir, classes, "wnid")
    if any(p.is_dir() for p in val_dir.iterdir()):
        te_paths, te_labels = _class_folders(val_dir, classes, "wnid")
    else:
        te_paths, te_labels = _flat_val(root, classes)
    extra, subsets = {}, {}
    if name == "imagenet-robust":
        for test_set, (folder, by) in ROBUSTNESS.items():
            if not (root / folder).is_dir():
                raise UserError(
                    f"dataset {name!r} is incomplete under {root}: missing {folder}/ "
                    f"({test_set}); place the official release there (docs/datasets.md)"
                )
            paths, labels = _class_folders(root / folder, classes, by)
            extra[test_set] = ImageSplit(np.asarray(labels, dtype=np.int64), paths=paths)
            if test_set in SUBSET_SETS:
                subsets[test_set] = sorted(set(labels))
    index = hashlib.sha256()  # every file name with its label (the images are not read)
    for paths, labels in [(tr_paths, tr_labels), (te_paths, te_labels)] + [
        (x.paths, x.labels.tolist()) for x in extra.values()
    ]:
        for p, y in zip(paths, labels, strict=True):
            index.update(f"{p.relative_to(root)}\0{y}\n".encode())
    return DatasetBundle(
        name=name,
        classes=classes,
        train=ImageSplit(np.asarray(tr_labels, dtype=np.int64), paths=tr_paths),
        test=ImageSplit(np.asarray(te_labels, dtype=np.int64), paths=te_paths),
        fingerprint={
            "source": "ImageNet-1k folder layout",
            "sizes": [len(tr_paths), len(te_paths)] + [len(s) for s in extra.values()],
            "index_sha256": index.hexdigest(),
            "test_sets": list(extra),
            "class_subsets": {k: len(v) for k, v in subsets.items()},
        },
        extra_tests=extra,
        class_subsets=subsets,
    )


for _name, _desc in (
    ("imagenet", "ImageNet-1k from imagenet/train/ and imagenet/val/ under --data-root"),
    (
        "imagenet-robust",
        "ImageNet-1k plus ImageNet-V2, -A, -R and -Sketch as extra test sets (--data-root)",
    ),
):
    DATASETS.register(_name, DatasetSpec(_name, lambda o, n=_name: _load(n, o), _desc), _desc)
