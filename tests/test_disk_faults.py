"""Folders that cannot be written and full disks: one clear error before any work, or after
it with the numbers kept; never a partial file."""

import errno
import json

import pytest

from ssl_eval.cli import main
from ssl_eval.features import entries
from ssl_eval.records import store as results


def _run(tmp_path, *extra):
    return main(
        [
            "run",
            "--backbone",
            "pixels",
            "--dataset",
            "digits",
            "--protocol",
            "knn",
            "--no-progress",
            "--no-leaderboard",
            "--cache-dir",
            str(tmp_path / "cache"),
            *extra,
        ]
    )


def test_results_folder_that_is_a_file_fails_before_any_work(tmp_path, capsys):
    (tmp_path / "r").write_text("not a folder")
    assert _run(tmp_path, "--results-dir", str(tmp_path / "r")) == 2
    err = capsys.readouterr().err
    assert "ssl-eval: error" in err and "Traceback" not in err
    assert not (tmp_path / "cache" / "features").exists()  # nothing was extracted


def test_cache_folder_that_is_a_file_fails_before_any_work(tmp_path, capsys):
    (tmp_path / "cache").write_text("x")
    assert _run(tmp_path, "--results-dir", str(tmp_path / "r")) == 2
    assert "cache folder" in capsys.readouterr().err


def test_full_disk_while_writing_a_cache_entry_is_one_error_and_leaves_nothing(
    tmp_path, capsys, monkeypatch
):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(entries, "preallocate", full)
    assert _run(tmp_path, "--results-dir", str(tmp_path / "r")) == 2
    err = capsys.readouterr().err
    assert "no room for the feature cache entry" in err and "--cache-dir" in err
    assert list((tmp_path / "cache" / "features").iterdir()) == []  # no partial entry


def test_a_record_that_cannot_be_written_keeps_its_numbers(tmp_path, capsys, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(results, "atomic_write_json", full)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    assert _run(tmp_path, "--results-dir", str(tmp_path / "r")) == 2
    err = capsys.readouterr().err
    assert "its numbers are saved in" in err
    rescued = list((tmp_path / "tmp").glob("ssl-eval-unsaved-*.json"))
    assert len(rescued) == 1
    doc = json.loads(rescued[0].read_text())
    assert {r["metric"] for r in doc["records"]} >= {"top1"}
    # the rescued file is a valid record file: copied into the store, it reads
    (tmp_path / "r" / "records").mkdir(parents=True, exist_ok=True)
    (tmp_path / "r" / "records" / rescued[0].name.replace("ssl-eval-unsaved-", "")).write_text(
        rescued[0].read_text()
    )
    monkeypatch.undo()
    assert any(r.metric == "top1" for r in results.load_records(tmp_path / "r"))


@pytest.mark.parametrize("cmd", ["train"])
def test_train_output_that_is_a_file_fails_before_training(tmp_path, capsys, cmd):
    (tmp_path / "out").write_text("x")
    assert (
        main(
            [
                "train",
                "--method",
                "simclr",
                "--dataset",
                "digits",
                "--epochs",
                "1",
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 2
    )
    assert "Traceback" not in capsys.readouterr().err
