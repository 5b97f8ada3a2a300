import subprocess
import sys
import zipfile

import pytest
from conftest import ROOT


@pytest.mark.slow
def test_wheel_ships_protocol_cards_inside_the_package(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    wheel = next(tmp_path.glob("*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    cards = sorted(p.name for p in (ROOT / "protocols").glob("*.yaml"))
    for card in cards:
        assert f"ssl_eval/_cards/{card}" in names
    assert "ssl_eval/_cards/suites/standard.yaml" in names
    assert any(n.endswith("entry_points.txt") for n in names)
    # the committed references travel with the package: found from any folder, installed
    for suite in ("default", "quick"):
        assert f"ssl_eval/_reference/{suite}/baseline.json" in names
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    found = subprocess.run(
        [
            sys.executable,
            "-c",
            "from ssl_eval.orchestrate.suite.spec import shipped_reference as r; print(r('quick'), r('nope'))",
        ],
        cwd=elsewhere,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout.split()
    assert found == [str(target / "ssl_eval/_reference/quick/baseline.json"), "None"]
