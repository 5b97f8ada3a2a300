"""ssl-eval report: the self-contained HTML page (sorted and filtered in headless Chromium), the
markdown with its figures, escaping of hostile names, diagnostics' rank correlation, and
sections left out when their records or cached features are absent."""

from __future__ import annotations

import copy
import html
import json
import re
from pathlib import Path

import pytest

from ssl_eval.cli import main
from ssl_eval.core.files import sha256_json
from ssl_eval.report import maps, write_report

SLOW_FIXTURES = ("report",)  # module fixtures that train or start processes (conftest)

HOSTILE = "<script>x</script>|y"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
RUN_FILE = re.compile(r"^[0-9a-f]{20}-")  # the record files ssl-eval run writes


def _records(results: Path) -> dict[tuple[str, str], Path]:
    out = {}
    for p in sorted((results / "records").glob("*.json")):
        r = json.loads(p.read_text())["records"][0]
        out[(r["backbone"], r["protocol"]["name"])] = p
    return out


def _clone(src: Path, name: str, edit) -> None:
    """A record file copied from ``src`` with each record changed by ``edit`` (checksum redone)."""
    doc = json.loads(src.read_text())
    doc["records"] = [r for r in (edit(copy.deepcopy(r)) for r in doc["records"]) if r]
    doc["sha256"] = sha256_json(doc["records"])
    (src.parent / f"{name}.json").write_text(json.dumps(doc))


def _as(backbone: str, value: float | None = None, cache_key: str | None = None):
    def edit(r):
        r["backbone"] = backbone
        s = r["setting"]  # the setting is the named backbone's (a row of its own), as run writes it
        s["summary"]["row"]["backbone"] = backbone
        s["row"], s["hash"] = sha256_json(s["summary"]["row"])[:16], sha256_json(s["summary"])[:16]
        if cache_key is not None:
            r["details"]["feature_cache"] = {"test": cache_key, "train": cache_key}
        if value is not None and r["metric"] == "top1":
            r["value"], r["ci95"] = value, [value - 0.05, value + 0.05]
        return r

    return edit


def _protocol(ptype: str, backbone: str, metrics: dict[str, float]):
    """A record of protocol type ``ptype`` (diagnostics, invariance) with ``metrics``."""

    def edit(r):
        if r["metric"] != "top1":
            return None
        r["backbone"], r["protocol"] = backbone, {"name": ptype, "type": ptype, "version": 1}
        r["setting"]["column"] = r["setting"]["hash"] = f"{ptype}-column"
        r["details"], r["spread"], r["ci95"], r["ci_method"] = (
            {},
            None,
            None,
            "",
        )  # as build_records writes it
        return r

    def expand(src: Path, name: str) -> None:
        doc = json.loads(src.read_text())
        base = edit(copy.deepcopy(doc["records"][0]))
        doc["records"] = [dict(base, metric=m, value=v) for m, v in metrics.items()]
        doc["sha256"] = sha256_json(doc["records"])
        (src.parent / f"{name}.json").write_text(json.dumps(doc))

    return expand


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    base = tmp_path_factory.mktemp("report")
    results, cache = base / "results", base / "cache"
    argv = ["run", "--backbone", "pixels,random:resnet10t", "--dataset", "digits"]
    argv += [
        "--protocol",
        "knn,linear,fewshot",
        "--image-size",
        "16",
        "--results-dir",
        str(results),
    ]
    # a smaller few-shot card keeps the run short (2 Ks, 3 draws, 3 Cs; still chosen on val)
    for s in ("fewshot.shots=[1,5]", "fewshot.seeds=3", "fewshot.logreg_cs=[0.1,1.0,10.0]"):
        argv += ["--set", s]
    assert main([*argv, "--cache-dir", str(cache), "--no-progress"]) == 0
    rec = _records(results)
    # a hostile name (the run command refuses it as a label): knn and linear, no few-shot, and
    # a feature-cache key with no entry (its t-SNE map is skipped)
    _clone(rec[("pixels", "knn")], "hostile-knn", _as(HOSTILE, cache_key="0" * 32))
    _clone(rec[("pixels", "linear")], "hostile-linear", _as(HOSTILE, 0.5, "0" * 32))
    diag = {"pixels": (3.0, 0.1), "random:resnet10t": (2.0, 0.2), HOSTILE: (1.0, 0.3)}
    for i, (b, (rank, align)) in enumerate(diag.items()):
        metrics = {"rankme": rank, "alignment": align} | ({"uniformity": -1.0} if i == 0 else {})
        _protocol("diagnostics", b, metrics)(rec[("pixels", "linear")], f"diag-{i}")
    _protocol("invariance", "pixels", {"inv_crop": 0.4, "decode_shape": 0.9})(
        rec[("pixels", "linear")], "invariance"
    )
    with pytest.MonkeyPatch.context() as mp:  # a smaller t-SNE keeps the test short
        mp.setattr(maps, "TSNE_POINTS", 150)
        mp.setattr(maps, "TSNE_ITERATIONS", 250)
        index = write_report(results, cache_dir=cache, progress=False)
    return index


@pytest.mark.slow
def test_report_files_and_figures(report):
    out = report.parent
    assert report == out / "index.html" and report.is_file()
    md = (out / "report.md").read_text()
    pngs = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", md)
    assert pngs and all((out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    kinds = [p.split("-")[0] for p in pngs]
    assert kinds.count("bars") == 3 and kinds.count("fewshot") == 1
    assert kinds.count("invariance") == 1
    assert kinds.count("tsne") == 2  # the hostile backbone's cache entry is missing: skipped
    page = report.read_text()
    assert page.count('src="data:image/png;base64,') == len(pngs)


def test_html_is_self_contained(report):
    page = report.read_text()
    assert not re.search(r"""(?:src|href|action)\s*=\s*["']?\s*(?:https?:)?//""", page, re.I)
    assert "<link" not in page and "url(" not in page
    srcs = re.findall(r"""\ssrc\s*=\s*["']([^"']*)""", page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "default-src 'none'" in page  # the page may fetch nothing


def test_hostile_names_are_escaped(report):
    page = report.read_text()
    assert HOSTILE not in page and "<script>x" not in page
    assert f"<td>{html.escape(HOSTILE)}</td>" in page
    md = (report.parent / "report.md").read_text()
    assert "<script>" not in md
    row = next(line for line in md.splitlines() if "&lt;script&gt;" in line)
    header = next(line for line in md.splitlines() if line.startswith("| backbone | digits"))
    unescaped = re.compile(r"(?<!\\)\|")
    assert len(unescaped.findall(row)) == len(unescaped.findall(header))


def test_findings_escape_names(report):
    """The generated findings name every backbone (here all baselines): escaped in the page,
    in report.md and in findings.md alike."""
    page = report.read_text()
    section = page.split('<div id="findings">', 1)[1].split("</div>", 1)[0]
    assert html.escape(HOSTILE) in section and "<script>" not in section
    md = (report.parent / "findings.md").read_text()
    assert "<script>" not in md and "&lt;script&gt;x&lt;/script&gt;\\|y" in md
    assert md.split("\n", 2)[2] in (report.parent / "report.md").read_text()


def test_cells_carry_their_setting(report):
    page = report.read_text()
    titles = re.findall(r'<td data-v="[^"]+" title="([^"]*)"', page)
    assert len(titles) == 8  # 2 backbones x 3 protocols + the hostile one's knn and linear
    assert all("column.protocol.name=" in t and "interval=" in t for t in titles)
    assert any("column.features.image_size=16" in t for t in titles)


def test_diagnostics_spearman(report):
    page = report.read_text()
    assert "<td>rankme</td><td>+1.00</td><td>3</td>" in page
    assert "<td>alignment</td><td>-1.00</td><td>3</td>" in page
    assert "<td>uniformity</td><td>" not in page  # one backbone only: no correlation


def test_absent_sections_and_cache_are_skipped(tmp_path, report):
    results = tmp_path / "r"
    (results / "records").mkdir(parents=True)
    runs = [p for p in (report.parents[1] / "records").glob("*.json") if RUN_FILE.match(p.name)]
    for p in sorted(runs)[:2]:  # two record files of the real run (no diagnostics)
        (results / "records" / p.name).write_bytes(p.read_bytes())
    index = write_report(results, cache_dir=tmp_path / "empty-cache", progress=False)
    page, md = index.read_text(), (index.parent / "report.md").read_text()
    assert "t-SNE" not in page and "Diagnostics" not in page and "tsne-" not in md
    assert "Leaderboard" in page and "bars-" in md
    empty = tmp_path / "empty"
    (empty / "records").mkdir(parents=True)
    assert "No records" in write_report(empty, progress=False).read_text()


def test_cli_out_folder(tmp_path, report):
    results, out = tmp_path / "r", tmp_path / "elsewhere"
    (results / "records").mkdir(parents=True)
    runs = [p for p in (report.parents[1] / "records").glob("*.json") if RUN_FILE.match(p.name)]
    for p in sorted(runs)[:1]:
        (results / "records" / p.name).write_bytes(p.read_bytes())
    out.mkdir()
    (out / "holiday.png").write_bytes(b"mine")  # not the report's: kept
    (out / "bars-old-0123abcd.png").write_bytes(b"stale")  # an earlier report's figure: removed
    argv = ["report", "--results-dir", str(results), "--out", str(out), "--no-progress"]
    assert main([*argv, "--cache-dir", str(tmp_path / "no-cache")]) == 0
    assert (out / "index.html").is_file() and (out / "report.md").is_file()
    assert not (results / "report").exists()
    assert (out / "holiday.png").read_bytes() == b"mine"
    assert not (out / "bars-old-0123abcd.png").exists()
    assert re.search(r"\(bars-[^)]+\.png\)", (out / "report.md").read_text())


def test_cli_without_records_is_one_line(tmp_path, capsys):
    assert main(["report", "--results-dir", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no records" in err


def _driver():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is absent (apt-get install chromium chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[dev]')")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(CHROMEDRIVER) if Path(CHROMEDRIVER).exists() else Service()
    return webdriver.Chrome(service=service, options=opts)


@pytest.mark.slow
def test_browser_sorts_and_filters(report):
    d = _driver()
    try:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import Select

        d.get(report.as_uri())

        def column(i):
            rows = d.find_elements(By.CSS_SELECTOR, "#leaderboard tbody tr")
            return [r.find_elements(By.TAG_NAME, "td")[i].get_attribute("data-v") for r in rows]

        heads = d.find_elements(By.CSS_SELECTOR, "#leaderboard thead th")
        i = [h.text for h in heads].index("digits / linear")
        before = [float(v) for v in column(i)]
        heads[i].click()
        desc = [float(v) for v in column(i)]
        assert desc == sorted(before, reverse=True) and desc != before
        heads[i].click()
        assert [float(v) for v in column(i)] == sorted(before)

        names = d.find_elements(By.CSS_SELECTOR, "#leaderboard tbody tr td:first-child")
        assert HOSTILE in [n.text for n in names]  # shown as text, never run
        Select(d.find_element(By.ID, "filter-protocol")).select_by_value("fewshot")
        shown = [
            r.find_element(By.TAG_NAME, "td").text
            for r in d.find_elements(By.CSS_SELECTOR, "#leaderboard tbody tr")
            if r.is_displayed()
        ]
        assert sorted(shown) == ["pixels", "random:resnet10t"]  # no few-shot: hidden
        assert [h.text for h in heads if h.is_displayed()] == ["backbone", "digits / fewshot"]
        Select(d.find_element(By.ID, "filter-protocol")).select_by_value("")
        assert all(
            r.is_displayed() for r in d.find_elements(By.CSS_SELECTOR, "#leaderboard tbody tr")
        )

        assert d.execute_script("return window.reportErrors") == []  # window.onerror saw none
        severe = [e for e in d.get_log("browser") if e.get("level") == "SEVERE"]
        assert not severe, severe
    finally:
        d.quit()


def _rgb(png: bytes):
    import io

    import numpy as np
    from PIL import Image

    return Image.open(io.BytesIO(png)), np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), int)


@pytest.mark.slow
def test_figures_are_palette_pngs_exact_on_flat_colours():
    """to_png stores a palette PNG: a figure of flat colours comes back pixel for pixel as
    matplotlib rendered it; a scatter's anti-aliased edges move to near colours only, in a
    file smaller than the RGBA one."""
    import io

    import numpy as np

    from ssl_eval.report.figures import DPI, plt, to_png

    def rgba_png(fig) -> bytes:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
        return buf.getvalue()

    p = plt()
    mask = np.arange(64).reshape(8, 8) % 7  # seven flat classes, as a predicted mask
    fig, ax = p.subplots(figsize=(2, 2))
    ax.imshow(mask, cmap="tab10", interpolation="nearest", vmin=0, vmax=9)
    ax.set_axis_off()
    want = rgba_png(fig)
    im, got = _rgb(to_png(fig))
    assert im.mode == "P"
    _, ref = _rgb(want)
    assert np.array_equal(got, ref)

    rng = np.random.default_rng(0)
    fig, ax = p.subplots(figsize=(4.2, 4.0))
    ax.scatter(*rng.normal(size=(2, 1000)), c=rng.integers(0, 10, 1000), s=6, cmap="tab10")
    want = rgba_png(fig)
    png = to_png(fig)
    im, got = _rgb(png)
    _, ref = _rgb(want)
    assert im.mode == "P" and len(png) < 0.7 * len(want)
    assert np.abs(got - ref).max() <= 64 and np.abs(got - ref).mean() < 1.0


@pytest.mark.slow
def test_the_report_shows_the_leaderboards_table(tmp_path):
    """The report's leaderboard is leaderboard.md's: a recipe trained twice (other weights,
    one recipe) is one row with the t interval over its training runs, never a row per
    training run with one run's bootstrap interval; the best cell is bold in both."""
    from test_results import _rec

    from ssl_eval.core.files import atomic_write_json
    from ssl_eval.records.schema import make_setting
    from ssl_eval.report.leaderboard import write_leaderboard

    recs = [_rec("base", "d", "linear", 0.5, ci95=[0.48, 0.52])]
    for i, v in enumerate((0.64, 0.66)):
        r = _rec("m", "d", "linear", v, run_id=f"t{i}", ci95=[v - 0.02, v + 0.02])
        r["weights"] = {"source": "file", "sha256": f"trained-{i}"}
        r["load_report"] = {"training": {"recipe": "recipe-m", "seed": i}}
        features = {"dtype": "float16", "image_size": None, "feature_kind": None}
        r["setting"] = make_setting(
            "m",
            r["weights"],
            {"crop": 32},
            "model",
            r["protocol"],
            r["dataset"],
            r["split"],
            features,
        )
        recs.append(r)
    for i, r in enumerate(recs):
        doc = {"schema_version": 2, "records": [r], "sha256": sha256_json([r])}
        atomic_write_json(tmp_path / "records" / f"u{i}-r.json", doc)
    _, md_path = write_leaderboard(tmp_path)
    board = md_path.read_text()
    assert (
        "| m | **65.00 ± 12.71 (n=2)ʳ** |" in board
    )  # t(0.975, 1) = 12.706 x the standard error 0.01
    index = write_report(tmp_path, cache_dir=tmp_path / "no-cache", progress=False)
    page, md = index.read_text(), (index.parent / "report.md").read_text()
    assert "| m | **65.00 ± 12.71 (n=2)ʳ** |" in md and md.count("| m") == 1
    assert "| base | 50.00 ± 2.00ᵇ |" in md
    cell = re.search(r"<td>m</td><td data-v=\"65\" title=\"([^\"]*)\"><b>([^<]*)</b></td>", page)
    assert cell and cell.group(2) == "65.00 ± 12.71 (n=2)ʳ", page
    assert "interval=95% t interval over training runs" in html.unescape(cell.group(1))
    assert page.count("<td>m") == 1  # one row for the recipe, not one per training run
