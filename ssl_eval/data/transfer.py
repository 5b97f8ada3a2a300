"""Transfer datasets in torchvision's on-disk layouts, each with the split and the metric the
transfer literature uses (Kornblith et al. 2019, "Do Better ImageNet Models Transfer Better?";
SimCLR and BYOL's linear-transfer tables), and the ``transfer`` collection of them all.

Each dataset is read from the official annotation files in the exact folder torchvision puts
them in (``torchvision.datasets.<Class>(root)``), so a folder torchvision downloaded is read as
is; ``--download`` asks torchvision to fetch what is missing. What a dataset needs is checked
first: an incomplete folder is refused in one line naming the first missing file.

The split is the literature's, written out in ``SPLITS`` (and docs/datasets.md):
train+val of the official files is the train split (the evaluation carves its own validation
split from it for every choice), the official test split reports. The metric is declared per
dataset: ``top1``, ``mean_per_class`` (the mean over classes of each class's top-1 accuracy:
Aircraft, Caltech-101, Flowers-102, Pets) or ``map11`` (VOC2007's 11-point interpolated mean
average precision, multi-label)."""

from __future__ import annotations

import hashlib
import json
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.errors import UserError
from .datasets import DATASETS, DatasetBundle, DatasetOptions, DatasetSpec, ImageSplit

# what a reader returns: classes, (train paths, labels), (test paths, labels), multi-label
# targets {"train": (N, C), "test": ...} in the VOC devkit's encoding (1, 0 difficult, -1) or None
Read = tuple[list[str], tuple[list[Path], list[int]], tuple[list[Path], list[int]], dict | None]

CALTECH_TRAIN_PER_CLASS, CALTECH_SEED = 30, 0


@dataclass(frozen=True)
class TransferSpec:
    name: str
    title: str
    files: tuple[str, ...]  # what must exist under --data-root, checked in order
    metric: str  # top1 | mean_per_class | map11
    split: str  # the split, as recorded in the fingerprint
    read: Callable[[Path], Read]
    download: Callable[[Path], None] | None  # torchvision's download, None where it has none
    no_download: str = ""  # why --download cannot fetch it


def _mat(path: Path) -> dict:
    from scipy.io import loadmat

    return loadmat(str(path), squeeze_me=True)


def _lines(path: Path) -> list[str]:
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]


def _food101(root: Path) -> Read:
    base = root / "food-101"
    meta = {s: json.loads((base / "meta" / f"{s}.json").read_text()) for s in ("train", "test")}
    classes = sorted(meta["train"])
    splits = []
    for s in ("train", "test"):
        paths, labels = [], []
        for ci, c in enumerate(classes):
            for rel in meta[s].get(c, []):
                paths.append(base / "images" / f"{rel}.jpg")
                labels.append(ci)
        splits.append((paths, labels))
    return classes, splits[0], splits[1], None


def _sun397(root: Path) -> Read:
    base = root / "SUN397"
    classes = [c[3:] for c in _lines(base / "ClassName.txt")]  # "/a/abbey" -> "abbey"
    index = {c: i for i, c in enumerate(classes)}
    splits = []
    for f in ("Training_01.txt", "Testing_01.txt"):
        rels = _lines(base / f)  # "/a/abbey/sun_xxx.jpg"
        splits.append(
            (
                [base / r.lstrip("/") for r in rels],
                [index["/".join(r.split("/")[2:-1])] for r in rels],
            )
        )
    return classes, splits[0], splits[1], None


def _cars(root: Path) -> Read:
    base = root / "stanford_cars"
    classes = [str(c) for c in _mat(base / "devkit" / "cars_meta.mat")["class_names"].tolist()]
    splits = []
    for mat, folder in (
        (base / "devkit" / "cars_train_annos.mat", "cars_train"),
        (base / "cars_test_annos_withlabels.mat", "cars_test"),
    ):
        annos = np.atleast_1d(_mat(mat)["annotations"])
        splits.append(
            ([base / folder / str(a["fname"]) for a in annos], [int(a["class"]) - 1 for a in annos])
        )
    return classes, splits[0], splits[1], None


def _aircraft(root: Path) -> Read:
    data = root / "fgvc-aircraft-2013b" / "data"
    classes = _lines(data / "variants.txt")
    index = {c: i for i, c in enumerate(classes)}
    splits = []
    for s in ("trainval", "test"):
        pairs = [ln.split(" ", 1) for ln in _lines(data / f"images_variant_{s}.txt")]
        splits.append(
            ([data / "images" / f"{i}.jpg" for i, _ in pairs], [index[c] for _, c in pairs])
        )
    return classes, splits[0], splits[1], None


def _dtd(root: Path) -> Read:
    base = root / "dtd" / "dtd"
    rel = {s: _lines(base / "labels" / f"{s}1.txt") for s in ("train", "val", "test")}
    classes = sorted({r.split("/")[0] for rs in rel.values() for r in rs})
    index = {c: i for i, c in enumerate(classes)}

    def split(rs: list[str]):
        return [base / "images" / r for r in rs], [index[r.split("/")[0]] for r in rs]

    return classes, split(rel["train"] + rel["val"]), split(rel["test"]), None


def _pets(root: Path) -> Read:
    base = root / "oxford-iiit-pet"
    splits, names = [], {}
    for s in ("trainval", "test"):
        rows = [ln.split() for ln in _lines(base / "annotations" / f"{s}.txt")]
        for r in rows:
            names[int(r[1]) - 1] = r[0].rsplit("_", 1)[0]
        splits.append(
            ([base / "images" / f"{r[0]}.jpg" for r in rows], [int(r[1]) - 1 for r in rows])
        )
    classes = [names.get(i, str(i)) for i in range(max(names) + 1)]
    return classes, splits[0], splits[1], None


def _caltech101(root: Path) -> Read:
    """No official split: 30 images per class to train, the rest to test (Kornblith et al.
    2019's choice), drawn with a fixed seed. The 101 object classes, without
    BACKGROUND_Google (as torchvision's Caltech101)."""
    base = root / "caltech101" / "101_ObjectCategories"
    classes = sorted(p.name for p in base.iterdir() if p.is_dir() and p.name != "BACKGROUND_Google")
    rng = np.random.default_rng(CALTECH_SEED)
    train, test = ([], []), ([], [])
    for ci, c in enumerate(classes):
        files = sorted(p for p in (base / c).iterdir() if p.suffix.lower() == ".jpg")
        chosen = set(rng.permutation(len(files))[:CALTECH_TRAIN_PER_CLASS].tolist())
        for i, f in enumerate(files):
            side = train if i in chosen else test
            side[0].append(f)
            side[1].append(ci)
    return classes, train, test, None


def _flowers102(root: Path) -> Read:
    base = root / "flowers-102"
    labels = np.asarray(_mat(base / "imagelabels.mat")["labels"]).reshape(-1).astype(int) - 1
    ids = _mat(base / "setid.mat")

    def split(*keys: str):
        img = [int(i) for k in keys for i in np.atleast_1d(ids[k]).tolist()]
        return [base / "jpg" / f"image_{i:05d}.jpg" for i in img], [int(labels[i - 1]) for i in img]

    return [str(i + 1) for i in range(102)], split("trnid", "valid"), split("tstid"), None


VOC_CLASSES = (  # noqa: SIM905 (one line per word would be 20 lines)
    "aeroplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse motorbike "
    "person pottedplant sheep sofa train tvmonitor"
).split()


def _voc2007(root: Path) -> Read:
    """Multi-label targets as the VOC2007 devkit assigns them per image and class: 1 (at least
    one object not marked difficult), 0 (only difficult objects: ignored by the AP), -1 (none).
    ``labels`` (what the stratified validation split uses) is the first object's class."""
    base = root / "VOCdevkit" / "VOC2007"
    out, targets = [], {}
    for s, key in (("trainval", "train"), ("test", "test")):
        ids = _lines(base / "ImageSets" / "Main" / f"{s}.txt")
        t = -np.ones((len(ids), len(VOC_CLASSES)), dtype=np.int8)
        first = []
        for n, i in enumerate(ids):
            path = base / "Annotations" / f"{i}.xml"
            try:
                objects = ET.parse(path).getroot().findall("object")
            except (OSError, ET.ParseError) as e:
                raise UserError(f"cannot read VOC annotation {path}: {e}; replace the file") from e
            names = []
            for o in objects:
                c = VOC_CLASSES.index(o.findtext("name", "").strip())
                hard = o.findtext("difficult", "0").strip() == "1"
                t[n, c] = max(t[n, c], 0 if hard else 1)
                names.append(c)
            first.append(names[0] if names else 0)
        out.append(([base / "JPEGImages" / f"{i}.jpg" for i in ids], first))
        targets[key] = t
    return list(VOC_CLASSES), out[0], out[1], targets


def _tv_download(cls_name: str) -> Callable[[Path], None]:
    """torchvision's own download (every split comes in its one archive)."""

    def download(root: Path) -> None:
        import torchvision.datasets as tvd

        getattr(tvd, cls_name)(str(root), download=True)

    return download


def _voc_download(root: Path) -> None:
    import torchvision.datasets as tvd

    for s in ("trainval", "test"):
        tvd.VOCDetection(str(root), year="2007", image_set=s, download=True)


SPECS = {
    s.name: s
    for s in [
        TransferSpec(
            "food101",
            "Food-101",
            ("food-101/meta/train.json", "food-101/meta/test.json"),
            "top1",
            "official train 75,750 / test 25,250",
            _food101,
            _tv_download("Food101"),
        ),
        TransferSpec(
            "sun397",
            "SUN397",
            ("SUN397/ClassName.txt", "SUN397/Training_01.txt", "SUN397/Testing_01.txt"),
            "top1",
            "official partition 1 (Training_01 / Testing_01, 50 / 50 per class)",
            _sun397,
            _tv_download("SUN397"),
            "torchvision's download has no partition files: put Training_01.txt and "
            "Testing_01.txt of the official Partitions.zip into SUN397/",
        ),
        TransferSpec(
            "stanford_cars",
            "Stanford Cars",
            (
                "stanford_cars/devkit/cars_meta.mat",
                "stanford_cars/devkit/cars_train_annos.mat",
                "stanford_cars/cars_test_annos_withlabels.mat",
            ),
            "top1",
            "official train 8,144 / test 8,041",
            _cars,
            None,
            "its original URL is gone (torchvision cannot download it)",
        ),
        TransferSpec(
            "fgvc_aircraft",
            "FGVC-Aircraft",
            (
                "fgvc-aircraft-2013b/data/variants.txt",
                "fgvc-aircraft-2013b/data/images_variant_trainval.txt",
                "fgvc-aircraft-2013b/data/images_variant_test.txt",
            ),
            "mean_per_class",
            "variants; official trainval 6,667 / test 3,333",
            _aircraft,
            _tv_download("FGVCAircraft"),
        ),
        TransferSpec(
            "voc2007",
            "VOC2007 classification",
            (
                "VOCdevkit/VOC2007/ImageSets/Main/trainval.txt",
                "VOCdevkit/VOC2007/ImageSets/Main/test.txt",
            ),
            "map11",
            "official trainval 5,011 / test 4,952, 20 classes multi-label",
            _voc2007,
            _voc_download,
        ),
        TransferSpec(
            "dtd",
            "DTD",
            tuple(f"dtd/dtd/labels/{s}1.txt" for s in ("train", "val", "test")),
            "top1",
            "partition 1: train1+val1 3,760 / test1 1,880",
            _dtd,
            _tv_download("DTD"),
        ),
        TransferSpec(
            "oxford_pets",
            "Oxford-IIIT Pets",
            ("oxford-iiit-pet/annotations/trainval.txt", "oxford-iiit-pet/annotations/test.txt"),
            "mean_per_class",
            "official trainval 3,680 / test 3,669",
            _pets,
            _tv_download("OxfordIIITPet"),
        ),
        TransferSpec(
            "caltech101",
            "Caltech-101",
            ("caltech101/101_ObjectCategories",),
            "mean_per_class",
            f"{CALTECH_TRAIN_PER_CLASS} per class train / rest test, seed {CALTECH_SEED}, "
            "101 classes (no background)",
            _caltech101,
            _tv_download("Caltech101"),
        ),
        TransferSpec(
            "flowers102",
            "Flowers-102",
            ("flowers-102/imagelabels.mat", "flowers-102/setid.mat"),
            "mean_per_class",
            "official trnid+valid 2,040 / tstid 6,149",
            _flowers102,
            _tv_download("Flowers102"),
        ),
    ]
}

# the collection ``--dataset transfer`` expands to (CIFAR-10/100 are registered in datasets.py)
COLLECTIONS = {"transfer": (*SPECS, "cifar10", "cifar100")}


def label_kind(name: str) -> str | None:
    """ "multi" or "single" for a dataset of this module, None for others (known on loading)."""
    return ("multi" if SPECS[name].metric == "map11" else "single") if name in SPECS else None


def dataset_metric(name: str) -> str:
    """The metric a dataset is reported in (``top1`` unless it declares another)."""
    return SPECS[name].metric if name in SPECS else "top1"


def expand_collections(names) -> tuple[str, ...]:
    """Dataset names with every collection name (``transfer``) replaced by its members."""
    out: list[str] = []
    for n in names:
        for m in COLLECTIONS.get(n, (n,)):
            if m not in out:
                out.append(m)
    return tuple(out)


def _missing(spec: TransferSpec, root: Path) -> str | None:
    return next((f for f in spec.files if not (root / f).exists()), None)


def _refuse(spec: TransferSpec, root: Path, what: str, download: bool) -> UserError:
    if spec.download is None or spec.no_download:
        how = f"place the official files there ({spec.no_download or 'no download'})"
    elif download:
        how = "the download did not provide it; place the official files there"
    else:
        how = "place the official files there or add --download to fetch them (needs network)"
    return UserError(f"dataset {spec.name!r} is incomplete under {root}: missing {what}; {how}")


def _load(spec: TransferSpec, opt: DatasetOptions) -> DatasetBundle:
    if opt.data_root is None:
        raise UserError(
            f"dataset {spec.name!r} needs --data-root DIR (the folder that holds "
            f"{spec.files[0].split('/')[0]}/); add --download to fetch it there when online"
        )
    root = Path(opt.data_root).expanduser()
    if _missing(spec, root) and opt.download and spec.download is not None:
        try:
            spec.download(root)
        except (RuntimeError, OSError, ValueError) as e:
            raise UserError(f"dataset {spec.name!r}: download failed ({e})") from e
    missing = _missing(spec, root)
    if missing:
        raise _refuse(spec, root, missing, opt.download)
    try:
        classes, train, test, targets = spec.read(root)
    except (OSError, KeyError, ValueError, IndexError) as e:
        raise UserError(
            f"dataset {spec.name!r}: its annotation files under {root} are unreadable or "
            f"inconsistent ({type(e).__name__}: {e}); replace them with the official files"
        ) from e
    for paths, _ in (train, test):
        lost = next((p for p in paths if not p.is_file()), None)
        if lost is not None:
            raise _refuse(spec, root, str(lost.relative_to(root)), opt.download)
    index = hashlib.sha256()
    for paths, labels in (train, test):
        for p, y in zip(paths, labels, strict=True):
            index.update(f"{p.relative_to(root)}\0{y}\n".encode())
    if targets is not None:
        index.update(targets["train"].tobytes() + targets["test"].tobytes())
    return DatasetBundle(
        name=spec.name,
        classes=classes,
        train=ImageSplit(np.asarray(train[1], dtype=np.int64), paths=train[0]),
        test=ImageSplit(np.asarray(test[1], dtype=np.int64), paths=test[0]),
        fingerprint={
            "source": f"torchvision layout ({spec.title})",
            "split": spec.split,
            "sizes": [len(train[0]), len(test[0])],
            "index_sha256": index.hexdigest(),  # every file name with its label(s)
        },
        metric=spec.metric,
        multilabel=targets,
    )


for _spec in SPECS.values():
    _how = "--data-root" if _spec.download is None else "--data-root, --download"
    _desc = f"{_spec.title} via torchvision's layout ({_spec.metric}; {_how})"
    DATASETS.register(
        _spec.name, DatasetSpec(_spec.name, lambda o, s=_spec: _load(s, o), _desc), _desc
    )
