import subprocess
import sys
import zipfile

from conftest import ROOT


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
