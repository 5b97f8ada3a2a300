"""The dataset registry: built-in (digits, shapes), torchvision (cifar10, cifar100, stl10) and
image folders (the transfer datasets register themselves from transfer.py). Every dataset yields a train and a test split of uint8 RGB images plus labels,
and a fingerprint that identifies its content in cache keys and result records."""

from __future__ import annotations

import contextlib
import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.errors import UserError
from ..core.registry import Registry
from . import shapes as shapes_gen

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}


@dataclass
class ImageSplit:
    """One split: either an in-memory uint8 array (N, H, W, 3) or a list of image files."""

    labels: np.ndarray
    images: np.ndarray | None = None
    paths: list[Path] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, i: int) -> np.ndarray:
        """Image ``i`` as uint8 HWC RGB."""
        if self.images is not None:
            return self.images[i]
        from PIL import Image

        try:
            with Image.open(self.paths[i]) as im:
                return np.array(im.convert("RGB"))  # a writable copy: torch.from_numpy needs one
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(
                f"cannot read image {self.paths[i]}: {reason}. Remove or replace the file."
            ) from e


@dataclass
class DatasetBundle:
    name: str
    classes: list[str]
    train: ImageSplit
    test: ImageSplit
    fingerprint: dict = field(default_factory=dict)
    # every label set of a dataset whose images carry several (shapes: shape, colour, size,
    # position): {"train": {factor: labels}, "test": {...}}; None elsewhere
    factors: dict | None = None
    # the metric the dataset is reported in (data/transfer.py): top1, mean_per_class or map11
    metric: str = "top1"
    # a multi-label dataset's targets {"train": (N, C), "test": ...} in the VOC devkit's
    # encoding (1 present, 0 only difficult, -1 absent); None for single-label datasets
    multilabel: dict | None = None
    # test sets evaluated with the head or bank trained on ``train`` (ImageNet's robustness
    # sets, data/imagenet.py), labelled in ``classes``; and for those that cover only some
    # classes, the classes a prediction is chosen among
    extra_tests: dict[str, ImageSplit] = field(default_factory=dict)
    class_subsets: dict[str, list[int]] = field(default_factory=dict)
    # per-pixel targets of a dense dataset (data/dense.py: DenseTargets); None elsewhere
    dense: object | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> ImageSplit:
        return {"train": self.train, "test": self.test, **self.extra_tests}[name]

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "test": len(self.test)}


@dataclass(frozen=True)
class DatasetOptions:
    data_root: Path | None = None
    download: bool = False
    manifest_dir: Path | None = (
        None  # where image-folder content hashes are remembered (None: rehash)
    )


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: ``load(options)`` returns its bundle."""

    name: str
    load: Callable[[DatasetOptions], DatasetBundle]
    description: str


DATASETS: Registry[DatasetSpec] = Registry("dataset", listing="ssl-eval list datasets")


def get_dataset(name: str, options: DatasetOptions) -> DatasetBundle:
    return DATASETS.get(name).load(options)


# ---------------------------------------------------------------- built-in, offline


def _load_digits(_: DatasetOptions) -> DatasetBundle:
    from sklearn.datasets import load_digits

    d = load_digits()
    # 8x8 grey levels 0..16 -> uint8 RGB
    img = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    img = np.repeat(img[..., None], 3, axis=-1)
    labels = d.target.astype(np.int64)
    # scikit-learn ships no test split: a fixed, stratified 30% test split
    rng = np.random.default_rng(12345)
    test = np.zeros(len(labels), dtype=bool)
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        test[rng.choice(idx, size=int(round(0.3 * len(idx))), replace=False)] = True
    return DatasetBundle(
        name="digits",
        classes=[str(i) for i in range(10)],
        train=ImageSplit(labels[~test], img[~test]),
        test=ImageSplit(labels[test], img[test]),
        fingerprint={"source": "sklearn.load_digits", "test_split": "stratified-30%-seed12345"},
    )


SHAPES_TRAIN, SHAPES_TEST, SHAPES_SIZE, SHAPES_SEED = 10_000, 2_000, 32, 0


@functools.lru_cache(maxsize=4)
def _shapes_arrays(n: int, size: int, seed: int):
    return shapes_gen.generate(n, size, seed)


def _shapes_loader(label_set: str) -> DatasetSpec:
    if label_set not in shapes_gen.LABEL_SETS:
        raise UserError(
            f"shapes has no label set {label_set!r}; use one of "
            + ", ".join(f"shapes:{k}" for k in shapes_gen.LABEL_SETS)
        )
    name = "shapes" if label_set == "shape" else f"shapes:{label_set}"

    def load(_: DatasetOptions) -> DatasetBundle:
        tr_img, tr_lab = _shapes_arrays(SHAPES_TRAIN, SHAPES_SIZE, SHAPES_SEED)
        te_img, te_lab = _shapes_arrays(SHAPES_TEST, SHAPES_SIZE, SHAPES_SEED + 1)
        return DatasetBundle(
            name=name,
            classes=list(shapes_gen.LABEL_SETS[label_set]),
            train=ImageSplit(tr_lab[label_set], tr_img),
            test=ImageSplit(te_lab[label_set], te_img),
            fingerprint={
                "generator_version": shapes_gen.GENERATOR_VERSION,
                "sizes": [SHAPES_TRAIN, SHAPES_TEST],
                "image_size": SHAPES_SIZE,
                "seeds": [SHAPES_SEED, SHAPES_SEED + 1],
                "label_set": label_set,
            },
            factors={"train": dict(tr_lab), "test": dict(te_lab)},
        )

    return DatasetSpec(name, load, f"procedural shapes, label set '{label_set}'")


# ---------------------------------------------------------------- torchvision


_TV_FILES = {
    "cifar10": ("cifar-10-batches-py", ["data_batch_1..5", "test_batch", "batches.meta"]),
    "cifar100": ("cifar-100-python", ["train", "test", "meta"]),
    "stl10": (
        "stl10_binary",
        ["train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "class_names.txt"],
    ),
}


def _torchvision_loader(name: str) -> Callable[[DatasetOptions], DatasetBundle]:
    def load(opt: DatasetOptions) -> DatasetBundle:
        import torchvision.datasets as tvd

        folder, files = _TV_FILES[name]
        if opt.data_root is None:
            raise UserError(
                f"dataset {name!r} needs --data-root DIR (the folder that holds {folder}/); "
                "add --download to fetch it there when online"
            )
        root = Path(opt.data_root).expanduser()
        try:
            if name == "stl10":
                tr = tvd.STL10(str(root), split="train", download=opt.download)
                te = tvd.STL10(str(root), split="test", download=opt.download)
                tr_img, te_img = tr.data.transpose(0, 2, 3, 1), te.data.transpose(0, 2, 3, 1)
                tr_lab, te_lab, classes = tr.labels, te.labels, list(tr.classes)
            else:
                cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
                tr = cls(str(root), train=True, download=opt.download)
                te = cls(str(root), train=False, download=opt.download)
                tr_img, te_img, classes = tr.data, te.data, list(tr.classes)
                tr_lab, te_lab = tr.targets, te.targets
        except (RuntimeError, OSError) as e:
            hint = "" if opt.download else " or add --download to fetch them (needs network)"
            raise UserError(
                f"dataset {name!r} not found under {root}: expected {root / folder}/ with "
                f"{', '.join(files)}. Place the official files there{hint}. ({e})"
            ) from e
        return DatasetBundle(
            name=name,
            classes=classes,
            train=ImageSplit(np.asarray(tr_lab, dtype=np.int64), np.ascontiguousarray(tr_img)),
            test=ImageSplit(np.asarray(te_lab, dtype=np.int64), np.ascontiguousarray(te_img)),
            fingerprint={"source": f"torchvision.{name}", "sizes": [len(tr_lab), len(te_lab)]},
        )

    return load


# ---------------------------------------------------------------- image folders


def _scan(split_dir: Path, classes: list[str] | None) -> tuple[list[str], list[Path], np.ndarray]:
    found = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if classes is None:
        classes = found
    elif set(found) - set(classes):
        raise UserError(
            f"{split_dir} has classes not in train/: {sorted(set(found) - set(classes))}"
        )
    paths, labels = [], []
    for ci, c in enumerate(classes):
        d = split_dir / c
        if not d.is_dir():
            continue
        files = sorted(p for p in d.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        paths += files
        labels += [ci] * len(files)
    if not paths:
        raise UserError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {split_dir}")
    return classes, paths, np.asarray(labels, dtype=np.int64)


def _content_fingerprint(
    root: Path, paths: list[Path], manifest_dir: Path | None
) -> tuple[str, str]:
    """(sha256 over every file's relative path and content sha256, how it was computed).

    The content of every image is hashed, so overwriting images (even with files of the same
    size) changes the fingerprint. With ``manifest_dir``, each file's hash is remembered under
    its path, size and modification time, so an unchanged large folder is not read again."""
    import json

    from ..core.files import atomic_write_json

    manifest_path = None
    known: dict = {}
    if manifest_dir is not None:
        manifest_path = (
            Path(manifest_dir) / f"{hashlib.sha256(str(root).encode()).hexdigest()[:24]}.json"
        )
        try:
            known = json.loads(manifest_path.read_text()).get("files", {})
        except (OSError, ValueError, AttributeError):
            known = {}
    files, read = {}, 0
    h = hashlib.sha256()
    for p in paths:
        rel = str(p.relative_to(root))
        st = p.stat()
        entry = known.get(rel)
        if not (
            isinstance(entry, list)
            and len(entry) == 3
            and entry[:2] == [st.st_size, st.st_mtime_ns]
        ):
            with open(p, "rb") as f:
                entry = [st.st_size, st.st_mtime_ns, hashlib.file_digest(f, "sha256").hexdigest()]
            read += 1
        files[rel] = entry
        h.update(f"{rel}\0{entry[2]}\n".encode())
    how = "sha256 of every file's content"
    if manifest_path is not None:
        how += " (manifest keyed by path, size and mtime; unchanged files not re-read)"
        if read or len(files) != len(known):
            with contextlib.suppress(
                OSError
            ):  # a read-only cache: the hash stays right, only slower
                atomic_write_json(manifest_path, {"root": str(root), "files": files})
    return h.hexdigest(), how


def _folder_loader(path: str) -> DatasetSpec:
    def load(opt: DatasetOptions) -> DatasetBundle:
        root = Path(path).expanduser().resolve()
        if not root.is_dir():
            raise UserError(f"image folder {root} does not exist")
        train_dir = root / "train"
        test_dir = next((root / s for s in ("test", "val") if (root / s).is_dir()), None)
        if not train_dir.is_dir() or test_dir is None:
            raise UserError(
                f"image folder {root} needs train/ and val/ (or test/) subfolders, each with "
                "one folder of images per class"
            )
        classes, tr_paths, tr_lab = _scan(train_dir, None)
        _, te_paths, te_lab = _scan(test_dir, classes)
        content, how = _content_fingerprint(root, tr_paths + te_paths, opt.manifest_dir)
        return DatasetBundle(
            name=f"folder:{root.name}",
            classes=classes,
            train=ImageSplit(tr_lab, paths=tr_paths),
            test=ImageSplit(te_lab, paths=te_paths),
            fingerprint={
                "test_dir": test_dir.name,
                "content_sha256": content,
                "content_hash": how,
                "classes": classes,
            },
        )

    return DatasetSpec(f"folder:{path}", load, f"image folder {path}")


DATASETS.register(
    "digits",
    DatasetSpec(
        "digits", _load_digits, "scikit-learn's 8x8 digits, 1,797 images, 10 classes, offline"
    ),
)
DATASETS.register(
    "shapes", _shapes_loader("shape"), "procedural shapes (embedded default), 6 classes"
)
DATASETS.register_prefix("shapes", _shapes_loader, "shapes:<shape|colour|size|position>")
for _name, _desc in [
    ("cifar10", "CIFAR-10 via torchvision (--data-root, --download)"),
    ("cifar100", "CIFAR-100 via torchvision (--data-root, --download)"),
    ("stl10", "STL-10 labelled splits via torchvision (--data-root, --download)"),
]:
    DATASETS.register(_name, DatasetSpec(_name, _torchvision_loader(_name), _desc), _desc)
DATASETS.register_prefix("folder", _folder_loader, "folder:PATH with train/ and val/ or test/")

DEFAULT_DATASET = "shapes"
