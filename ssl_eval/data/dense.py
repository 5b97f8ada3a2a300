"""Dense datasets: images with a per-pixel target (segmentation classes or depth in metres).

A dense dataset is an ordinary ``DatasetBundle`` whose ``dense`` holds the targets
(``DenseTargets``), at each image's own resolution: the dense protocols score against these
full-resolution targets, never resized ones. Registered here:

  shapes-seg, shapes-depth   the shapes generator's masks and synthetic depth (offline)
  voc2012-seg                Pascal VOC 2012 segmentation, torchvision's VOCdevkit layout
  ade20k                     ADE20K SceneParsing (ADEChallengeData2016), 150 classes
  cityscapes                 Cityscapes fine annotations, torchvision's layout, 19 train ids
  nyu-depth                  NYU Depth v2, the Eigen split as DINOv2/DINOv3 read it
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.errors import UserError, one_line
from . import shapes as shapes_gen
from .datasets import (
    DATASETS,
    DatasetBundle,
    DatasetOptions,
    DatasetSpec,
    ImageSplit,
    _content_fingerprint,
)

IGNORE = 255  # the ignore index of every segmentation target here (VOC's border value)
TASKS = ("segmentation", "depth")


@dataclass
class DenseSplit:
    """The targets of one split: an array (N, H, W) or one file per image with its decoder."""

    targets: np.ndarray | None = None
    paths: list[Path] | None = None
    decode: Callable[[Path], np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.targets) if self.targets is not None else len(self.paths)

    def load(self, i: int) -> np.ndarray:
        """Target ``i`` at its full resolution: int64 class ids or float32 depth (metres)."""
        if self.targets is not None:
            t = self.targets[i]
        else:
            try:
                t = self.decode(self.paths[i])
            except (OSError, ValueError, SyntaxError) as e:
                raise UserError(f"cannot read target {self.paths[i]}: {e}") from e
        return t.astype(np.float32) if t.dtype.kind == "f" else t.astype(np.int64)


@dataclass
class DenseTargets:
    """``task`` "segmentation": ``classes`` names the class ids, ``IGNORE`` marks unlabelled
    pixels. ``task`` "depth": ``depth_range`` (min, max) bounds the valid depths and
    ``eval_box`` (y1, y2, x1, x2, fractions of the height and width) the scored region (NYU's
    Eigen crop); a depth of 0 is a missing measurement. ``image_labels``: whether the bundle's
    image-level labels mean something (shapes: the shape class), else classification protocols
    are refused on it."""

    task: str
    train: DenseSplit
    test: DenseSplit
    classes: tuple[str, ...] = ()
    depth_range: tuple[float, float] | None = None
    eval_box: tuple[float, float, float, float] | None = None
    image_labels: bool = False

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"dense task {self.task!r}: one of {TASKS}")

    def split(self, name: str) -> DenseSplit:
        return {"train": self.train, "test": self.test}[name]


# ---------------------------------------------------------------- shapes (offline)

SHAPES_DENSE_TRAIN, SHAPES_DENSE_TEST, SHAPES_DENSE_SIZE, SHAPES_DENSE_SEED = 2_000, 500, 32, 100


@functools.lru_cache(maxsize=2)
def _shapes_dense(n: int, size: int, seed: int):
    return shapes_gen.generate_dense(n, size, seed)


def _shapes_dense_loader(task: str) -> Callable[[DatasetOptions], DatasetBundle]:
    def load(_: DatasetOptions) -> DatasetBundle:
        tr = _shapes_dense(SHAPES_DENSE_TRAIN, SHAPES_DENSE_SIZE, SHAPES_DENSE_SEED)
        te = _shapes_dense(SHAPES_DENSE_TEST, SHAPES_DENSE_SIZE, SHAPES_DENSE_SEED + 1)
        at = 2 if task == "segmentation" else 3  # masks or depth in generate_dense's output
        far = shapes_gen.DEPTH_FAR_FLOOR
        dense = DenseTargets(
            task,
            DenseSplit(tr[at]),
            DenseSplit(te[at]),
            classes=shapes_gen.DENSE_CLASSES if task == "segmentation" else (),
            depth_range=(1e-3, far) if task == "depth" else None,
            image_labels=True,
        )
        return DatasetBundle(
            name="shapes-seg" if task == "segmentation" else "shapes-depth",
            classes=list(shapes_gen.SHAPES),
            train=ImageSplit(tr[1]["shape"], tr[0]),
            test=ImageSplit(te[1]["shape"], te[0]),
            fingerprint={
                "generator_version": shapes_gen.GENERATOR_VERSION,
                "dense": task,
                "sizes": [SHAPES_DENSE_TRAIN, SHAPES_DENSE_TEST],
                "image_size": SHAPES_DENSE_SIZE,
                "seeds": [SHAPES_DENSE_SEED, SHAPES_DENSE_SEED + 1],
                "depth": [shapes_gen.DEPTH_NEAR_FLOOR, far, shapes_gen.DEPTH_SCALE],
            },
            dense=dense,
        )

    return load


# ---------------------------------------------------------------- decoders of official files


def _png(path: Path, modes: tuple[str, ...], what: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        if im.mode not in modes:
            raise ValueError(f"{what} must be a PNG of mode {'/'.join(modes)}, found {im.mode}")
        return np.array(im)


def _voc_mask(path: Path) -> np.ndarray:
    # palette PNGs whose indices are the class ids (0 background .. 20), 255 the object border
    return _png(path, ("P", "L"), "a VOC SegmentationClass mask")


def _ade_mask(path: Path) -> np.ndarray:
    # 0 "other" is not a class: ignored, and 1..150 become 0..149 (reduce_zero_label)
    m = _png(path, ("L", "P"), "an ADE20K annotation").astype(np.int64)
    return np.where(m == 0, IGNORE, m - 1)


@functools.cache
def _cityscapes_lut() -> np.ndarray:
    from torchvision.datasets import Cityscapes

    lut = np.full(256, IGNORE, dtype=np.int64)
    for c in Cityscapes.classes:  # the official id -> train id table (255: not evaluated)
        if c.id >= 0 and 0 <= c.train_id < 255:
            lut[c.id] = c.train_id
    return lut


def _cityscapes_mask(path: Path) -> np.ndarray:
    return _cityscapes_lut()[_png(path, ("L", "P"), "a Cityscapes *_gtFine_labelIds.png")]


def _nyu_depth(path: Path) -> np.ndarray:
    # 16-bit PNG in millimetres (the toolbox's depth_scale 1000); 0: no measurement
    d = _png(path, ("I;16", "I"), "an NYU depth map").astype(np.float32)
    return d / 1000.0


# ---------------------------------------------------------------- official layouts


def _root(opt: DatasetOptions, name: str, holds: str) -> Path:
    if opt.data_root is None:
        raise UserError(f"dataset {name!r} needs --data-root DIR (the folder that holds {holds})")
    return Path(opt.data_root).expanduser().resolve()


def _need(path: Path, name: str) -> Path:
    if not path.exists():
        raise UserError(f"dataset {name!r}: {path} is missing; place the official files there")
    return path


def _pairs(name: str, images: list[Path], targets: list[Path]) -> None:
    missing = [p for p in images + targets if not p.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"dataset {name!r}: {missing[0]} is missing{more}")
    if not images:
        raise UserError(f"dataset {name!r}: a split lists no images")


def _bundle(name, root, classes, splits, task, decode, opt, **dense) -> DatasetBundle:
    """``splits``: {"train": (images, targets), "test": (...)}, every file checked present."""
    for ims, tgs in splits.values():
        _pairs(name, ims, tgs)
    files = [p for ims, tgs in splits.values() for p in ims + tgs]
    content, how = _content_fingerprint(root, files, opt.manifest_dir)
    im = {s: ImageSplit(np.zeros(len(v[0]), np.int64), paths=v[0]) for s, v in splits.items()}
    tg = {s: DenseSplit(paths=v[1], decode=decode) for s, v in splits.items()}
    return DatasetBundle(
        name=name,
        classes=list(classes) if classes else [task],
        train=im["train"],
        test=im["test"],
        fingerprint={"content_sha256": content, "content_hash": how, "dense": task},
        dense=DenseTargets(task, tg["train"], tg["test"], classes=tuple(classes), **dense),
    )


VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip


def _load_voc(opt: DatasetOptions) -> DatasetBundle:
    name = "voc2012-seg"
    root = _root(opt, name, "VOCdevkit/VOC2012/")
    voc = root / "VOCdevkit" / "VOC2012"
    # torchvision fetches the 2 GB archive whenever download=True: only when it is not here
    if opt.download and not (voc / "ImageSets" / "Segmentation" / "val.txt").is_file():
        import torchvision.datasets

        try:
            torchvision.datasets.VOCSegmentation(
                str(root), year="2012", image_set="train", download=True
            )
        except (OSError, RuntimeError) as e:  # URLError is an OSError
            raise UserError(
                f"dataset {name!r}: could not download VOC 2012 into {root} "
                f"({type(e).__name__}: {one_line(e, limit=120)}); place the official files "
                "there (VOCdevkit/VOC2012/) and run without --download"
            ) from e
    splits = {}
    for split, listed in (("train", "train"), ("test", "val")):  # the val split is the test
        lst = _need(voc / "ImageSets" / "Segmentation" / f"{listed}.txt", name)
        ids = [x.strip() for x in lst.read_text().splitlines() if x.strip()]
        splits[split] = (
            [voc / "JPEGImages" / f"{i}.jpg" for i in ids],
            [voc / "SegmentationClass" / f"{i}.png" for i in ids],
        )
    return _bundle(name, root, VOC_CLASSES, splits, "segmentation", _voc_mask, opt)


def _load_ade20k(opt: DatasetOptions) -> DatasetBundle:
    name = "ade20k"
    root = _root(opt, name, "ADEChallengeData2016/")
    base = _need(root / "ADEChallengeData2016", name)
    classes = _ade_classes(base)
    splits = {}
    for split, folder in (("train", "training"), ("test", "validation")):
        ims = sorted(_need(base / "images" / folder, name).glob("*.jpg"))
        splits[split] = (ims, [base / "annotations" / folder / f"{p.stem}.png" for p in ims])
    return _bundle(name, root, classes, splits, "segmentation", _ade_mask, opt)


def _ade_classes(base: Path) -> tuple[str, ...]:
    """The 150 class names, when a class list is shipped: ``objectInfo150.txt`` (what the
    ADEChallengeData2016 download holds: tab-separated, a header ``Idx Ratio Train Val Name``,
    names listing synonyms after commas, "building, edifice") or ``objectInfo150.csv`` (the
    CSAIL repository's comma-separated copy, synonyms after semicolons, "building;edifice").
    Each class is named by its first synonym, as mmseg's ADE20K class list does."""
    layouts = (("objectInfo150.txt", "\t", ","), ("objectInfo150.csv", ",", ";"))
    found = [(base / f, sep, syn) for f, sep, syn in layouts if (base / f).is_file()]
    if not found:
        return tuple(f"class{i}" for i in range(1, 151))
    info, sep, syn = found[0]
    lines = [ln for ln in info.read_text(encoding="utf-8").splitlines() if ln.strip()]
    header = [h.strip().lower() for h in lines[0].split(sep)] if lines else []
    if "name" not in header:
        raise UserError(f"{info} has no Name column in its header (Idx, Ratio, Train, Val, Name)")
    col = header.index("name")
    rows = []
    for ln in lines[1:]:
        cells = ln.split(sep)
        if sep == "," and len(cells) > len(header):  # a name with commas: the rest of the line
            cells = [*cells[:col], sep.join(cells[col:])]
        if len(cells) <= col:
            raise UserError(f"{info}: a row without a name: {ln.strip()!r}")
        rows.append(cells[col].split(syn)[0].strip())
    if len(rows) != 150:
        raise UserError(f"{info} lists {len(rows)} classes, ADE20K SceneParsing has 150")
    return tuple(rows)


def _load_cityscapes(opt: DatasetOptions) -> DatasetBundle:
    name = "cityscapes"
    root = _root(opt, name, "leftImg8bit/ and gtFine/")
    splits = {}
    for split, folder in (("train", "train"), ("test", "val")):
        ims = sorted(_need(root / "leftImg8bit" / folder, name).glob("*/*_leftImg8bit.png"))
        tgs = [
            root / "gtFine" / folder / p.parent.name / p.name.replace("_leftImg8bit.png", "")
            for p in ims
        ]
        splits[split] = (ims, [t.with_name(t.name + "_gtFine_labelIds.png") for t in tgs])
    from torchvision.datasets import Cityscapes

    classes = tuple(c.name for c in sorted(Cityscapes.classes, key=lambda c: c.train_id)
                    if 0 <= c.train_id < 255)  # fmt: skip
    return _bundle(name, root, classes, splits, "segmentation", _cityscapes_mask, opt)


NYU_EIGEN_BOX = (45 / 480, 471 / 480, 41 / 640, 601 / 640)  # rows 45:471, cols 41:601 of 480x640


def _load_nyu(opt: DatasetOptions) -> DatasetBundle:
    name = "nyu-depth"
    root = _root(opt, name, "nyu_train.txt, nyu_test.txt and the files they list")
    splits = {}
    for split, listed in (("train", "nyu_train.txt"), ("test", "nyu_test.txt")):
        lines = sorted(_need(root / listed, name).read_text().splitlines())
        rows = [ln.split() for ln in lines if ln.strip()]
        if any(len(r) != 3 for r in rows):
            raise UserError(f"{root / listed}: each line must be 'image depth focal'")
        splits[split] = (
            [root / r[0].strip("/") for r in rows],
            [root / r[1].strip("/") for r in rows],
        )
    return _bundle(
        name, root, (), splits, "depth", _nyu_depth, opt,
        depth_range=(1e-3, 10.0), eval_box=NYU_EIGEN_BOX,
    )  # fmt: skip


_SEG, _DEPTH = "segmentation", "depth"
_DENSE = [
    ("shapes-seg", _SEG, _shapes_dense_loader(_SEG), "shapes with masks (7 classes), offline"),
    ("shapes-depth", _DEPTH, _shapes_dense_loader(_DEPTH), "shapes with synthetic depth, offline"),
    (
        "voc2012-seg",
        _SEG,
        _load_voc,
        "Pascal VOC 2012 segmentation, 21 classes (--data-root, --download)",
    ),
    ("ade20k", _SEG, _load_ade20k, "ADE20K SceneParsing, 150 classes (--data-root)"),
    ("cityscapes", _SEG, _load_cityscapes, "Cityscapes fine, 19 train ids (--data-root)"),
    ("nyu-depth", _DEPTH, _load_nyu, "NYU Depth v2, Eigen split (--data-root)"),
]
# the built-in datasets of each dense task, for the refusals that name them
DENSE_DATASETS: dict[str, tuple[str, ...]] = {
    task: tuple(n for n, t, _, _ in _DENSE if t == task) for task in (_SEG, _DEPTH)
}
for _name, _task, _load, _desc in _DENSE:
    DATASETS.register(_name, DatasetSpec(_name, _load, _desc), _desc)
