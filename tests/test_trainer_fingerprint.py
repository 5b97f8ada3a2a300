"""What was trained is keyed on what trained it: the trainer's fingerprint hashes the code that
trains (every ssl_eval module train/loop.py reaches through its imports) and nothing else, the
trainer writes it into the sidecar, and the evaluation's record copies it."""

import json
import shutil

import pytest
import torch

from ssl_eval.backbones.base import BuildOptions
from ssl_eval.backbones.families.trained import build_from_training_dir
from ssl_eval.core.config import RunConfig
from ssl_eval.core.errors import UserError
from ssl_eval.train import fingerprint as fp
from ssl_eval.train.config import TrainConfig


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """A copy of the ssl_eval package to edit."""
    root = tmp_path_factory.mktemp("pkg") / "ssl_eval"
    shutil.copytree(fp.PACKAGE_DIR, root, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _edited(package, rel: str) -> str:
    """The source fingerprint of ``package`` with one line appended to file ``rel``."""
    f = package / rel
    before = f.read_bytes()
    try:
        f.write_bytes(before + b"\n# edited\n")
        return fp.source_fingerprint(package)
    finally:
        f.write_bytes(before)


@pytest.mark.parametrize(
    "rel",
    [
        "train/losses.py",  # imported by the methods
        "train/methods/simclr.py",  # reached only through the registry's folder scan
        "backbones/archs.py",  # the architectures (an absolute-depth relative import, ..)
        "data/shapes.py",  # the data generator
        "data/splits.py",  # the evaluation's validation split the training images avoid
        "protocols/search/knn.py",  # the monitor's k-NN
        "train/fingerprint.py",  # itself, through the checkpoint module
    ],
)
@pytest.mark.slow
def test_editing_code_that_trains_changes_the_source_hash(package, rel):
    base = fp.source_fingerprint(package)
    assert len(base) == 16 and int(base, 16) >= 0
    assert _edited(package, rel) != base
    assert fp.source_fingerprint(package) == base  # restored: the same hash again


@pytest.mark.parametrize(
    "rel",
    [
        "report/leaderboard.py",
        "orchestrate/evaluate.py",
        "features/extraction.py",
        "protocols/knn.py",
        "backbones/families/dino.py",
        "train/resolve.py",  # assembles the config, which the sidecar records in full
    ],
)
@pytest.mark.slow
def test_editing_code_that_does_not_train_keeps_the_source_hash(package, rel):
    assert _edited(package, rel) == fp.source_fingerprint(package)


def test_the_reached_modules_are_the_training_code(package):
    files = {p.relative_to(package).as_posix() for p in fp.trainer_files(package)}
    assert {"train/loop.py", "train/losses.py", "train/methods/dino.py", "train/data.py"} <= files
    assert {
        "backbones/archs.py",
        "data/shapes.py",
        "data/datasets.py",
        "protocols/search/knn.py",
    } <= files
    assert not files & {
        "report/leaderboard.py",
        "orchestrate/evaluate.py",
        "features/extraction.py",
        "report/gate.py",
    }
    # of the protocols, only the k-NN search the monitor shares
    assert not any(
        f.startswith("protocols/") and not f.startswith("protocols/search/") for f in files
    )


@pytest.mark.slow
def test_the_file_reader_is_what_is_hashed(package):
    """Monkeypatching the reader (no copy edited) changes the hash of a reached file only."""
    real = fp.source_fingerprint(package)

    def reader(changed):
        return lambda p: p.read_bytes() + (b"#" if p.name == changed else b"")

    assert fp.source_fingerprint(package, reader("losses.py")) != real
    assert fp.source_fingerprint(package, reader("leaderboard.py")) == real


def test_fingerprint_is_cached_and_names_the_libraries():
    a, b = fp.trainer_fingerprint(), fp.trainer_fingerprint()
    assert a == b and a is not b  # a fresh dict every call, computed once (lru_cache)
    assert fp._fingerprint.cache_info().hits >= 1
    assert a["source"] == fp.source_fingerprint()
    from importlib.metadata import version

    assert a["versions"]["torch"] == version("torch") and torch.__version__.startswith(
        a["versions"]["torch"]
    )
    assert set(a["versions"]) >= {"torch", "numpy", "torchvision", "timm"}


# ------------------------------------------------------------- the sidecar and the record

SIDECAR = {
    "format": "ssl-eval-trained-backbone",
    "format_version": 1,
    "method": "simclr",
    "architecture": {"name": "cifar_resnet_tiny", "kwargs": {}},
    "preprocessing": {
        "resize": 16,
        "crop": 16,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "interpolation": "bilinear",
    },
    "feature_kind": "model",
    "dataset": {"name": "digits", "fingerprint": {"source": "sklearn.load_digits"}},
    "epochs": 2,
    "epochs_done": 2,
    "complete": True,
    "seed": 0,
    "code_version": "0",
    "collapsed": False,
}


def _folder(path, **changes):
    from safetensors.torch import save_file

    from ssl_eval.backbones.archs import build_arch

    path.mkdir(parents=True)
    model = build_arch("cifar_resnet_tiny")
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(path / "backbone.safetensors"),
    )
    cfg = json.loads(json.dumps(TrainConfig(dataset="digits", epochs=2).to_dict()))
    doc = {**SIDECAR, "train_config": cfg, **changes}
    (path / "backbone.json").write_text(json.dumps(doc))
    return path


def test_the_record_says_which_trainer_made_the_weights(tmp_path):
    trainer = {"source": "0123456789abcdef", "versions": {"torch": "9.9"}}
    bb = build_from_training_dir(_folder(tmp_path / "r", trainer=trainer))
    training = bb.load_report["training"]
    assert training["trainer_source"] == "0123456789abcdef"
    assert training["trainer_versions"] == {"torch": "9.9"}
    old = build_from_training_dir(_folder(tmp_path / "old")).load_report["training"]
    assert old["trainer_source"] is None  # written before the trainer recorded itself


def test_recipe_leaves_out_device_seed_and_trainer(tmp_path):
    """Runs of one recipe with other seeds, on other devices or by another trainer are the same
    recipe (the seed and trainer are recorded apart); another setting is another recipe."""

    def recipe(name, **cfg_changes):
        folder = _folder(tmp_path / name)
        doc = json.loads((folder / "backbone.json").read_text())
        doc["train_config"].update(cfg_changes)
        doc["trainer"] = {"source": name, "versions": {}}
        doc["seed"] = cfg_changes.get("seed", 0)
        (folder / "backbone.json").write_text(json.dumps(doc))
        return build_from_training_dir(folder).load_report["training"]

    base = recipe("a")
    assert recipe("b", seed=3)["recipe"] == base["recipe"]
    assert recipe("c", device="cuda")["recipe"] == base["recipe"]
    assert recipe("d", seed=3)["seed"] == 3  # the seed is recorded, apart from the recipe
    assert recipe("e", epochs=3)["recipe"] != base["recipe"]
    assert recipe("f", val_fraction=0.2)["recipe"] != base["recipe"]


# ------------------------------------------------------------- unfinished trainings


def test_an_unfinished_training_is_refused_unless_allowed(tmp_path):
    for name, changes in {
        "flagged": {"complete": False, "epochs_done": 1},
        "counted": {"epochs_done": 1},  # a sidecar without `complete`: judged by its epochs
    }.items():
        folder = _folder(tmp_path / name, **changes)
        if name == "counted":
            doc = json.loads((folder / "backbone.json").read_text())
            del doc["complete"]
            (folder / "backbone.json").write_text(json.dumps(doc))
        with pytest.raises(
            UserError, match="unfinished training .1/2 epochs.*--allow-incomplete"
        ) as e:
            build_from_training_dir(folder)
        assert "\n" not in str(e.value)
        bb = build_from_training_dir(folder, BuildOptions(allow_incomplete=True))
        assert bb.load_report["training"]["incomplete_allowed"] is True
        assert "INCOMPLETE" in bb.description
    done = build_from_training_dir(_folder(tmp_path / "done"))
    assert "incomplete_allowed" not in done.load_report["training"]
    assert "INCOMPLETE" not in done.description


def test_allow_incomplete_reaches_the_builder_from_the_command_line():
    from ssl_eval.cli import build_parser

    a = build_parser().parse_args(["run", "--backbone", "pixels", "--allow-incomplete"])
    assert a.allow_incomplete is True
    from ssl_eval.orchestrate.evaluate import _build_options

    cfg = RunConfig(backbones=("pixels",), datasets=("digits",), protocols=(object(),))
    assert _build_options(cfg, 0).allow_incomplete is False
    cfg = RunConfig(
        backbones=("pixels",), datasets=("digits",), protocols=(object(),), allow_incomplete=True
    )
    assert _build_options(cfg, 0).allow_incomplete is True
