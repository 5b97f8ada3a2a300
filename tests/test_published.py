"""Published numbers (protocols/published.yaml) and ``ssl-eval reproduce``: the file's schema
and its refusals, the comparison's arithmetic, an end-to-end reproduce on a test-only entry
(raw pixels, digits, the knn card), the refusals without data or weights, and the report's
"Published numbers" table."""

import json
import re
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from ssl_eval.cli import main
from ssl_eval.core.errors import UserError
from ssl_eval.protocols.cards import load_card, shipped_cards
from ssl_eval.protocols.published import PublishedEntry, check_runnable, load_published
from ssl_eval.report.published import (
    cells,
    compare,
    matches,
    published_html,
    published_md,
    text_table,
)

# the seed lecture's table, as printed in the sources the shipped file cites
SEED_TABLE = {
    ("supervised_r50_v1", "linear"): 76.13,  # torchvision IMAGENET1K_V1 acc@1 76.130
    ("mocov3_vitb16", "linear@mocov3"): 76.7,  # moco-v3 README, ViT-Base linear acc
    ("simclr_r50", "linear@simclr"): 69.1,  # simclr README (the paper's Table 6: 69.3)
    ("mae_vith14", "linear@mae"): 76.6,  # mae FINETUNE.md, paper (TF/TPU) row
    ("mae_vith14", "finetune@mae-h"): 86.9,  # mae README, ImageNet-1K ViT-H
    ("dinov2_vits14", "linear@dinov2"): 81.1,  # dinov2 README, ImageNet linear
    ("dinov2_vits14", "knn"): 79.0,  # dinov2 README, ImageNet k-NN
    ("dinov2_vitb14", "linear@dinov2"): 84.5,
    ("dinov2_vitb14", "knn"): 82.1,
    ("dinov2_vitl14", "linear@dinov2"): 86.3,
    ("dinov2_vitl14", "knn"): 83.5,
    ("dinov2_vitg14", "linear@dinov2"): 86.5,
    ("dinov2_vitg14", "knn"): 83.5,
}


def test_shipped_file_holds_the_seed_table_with_sources():
    pub = load_published()
    got = {(e.tag, e.recipe): e for e in pub.entries if e.dataset == "imagenet"}
    for key, value in SEED_TABLE.items():
        assert got[key].value == value, key
        assert got[key].metric == "top1"
    for e in pub.entries:  # every figure says where it is printed, at which commit or version
        paper = re.search(r"arXiv:\d{4}\.\d{4,5}v\d", e.source)  # a paper's own table, versioned
        assert paper or any(s in e.source for s in ("@", "torchvision 0.")), e.label
    assert "image-net.org" in pub.datasets["imagenet"].download
    assert "--data-root DIR" in pub.datasets["imagenet"].download


# the papers' own tables where they print the seed lecture's figures, as printed there
PAPER_TABLE = {
    ("simclr_r50", "linear@simclr"): (69.3, "arXiv:2002.05709, Table 6"),  # README: 69.1
    ("simclr_r50_2x", "linear@simclr"): (74.2, "arXiv:2002.05709, Table 6"),
    ("simclr_r50_4x", "linear@simclr"): (76.5, "arXiv:2002.05709, Table 6"),  # README: 76.6
    ("dinov2_vits14", "linear@dinov2"): (81.1, "arXiv:2304.07193v2, Table 4"),
    ("dinov2_vits14", "knn"): (79.0, "arXiv:2304.07193v2, Table 4"),
    ("dinov2_vitb14", "linear@dinov2"): (84.5, "arXiv:2304.07193v2, Table 4"),
    ("dinov2_vitb14", "knn"): (82.1, "arXiv:2304.07193v2, Table 4"),
    ("dinov2_vitl14", "linear@dinov2"): (86.3, "arXiv:2304.07193v2, Table 4"),
    ("dinov2_vitl14", "knn"): (83.5, "arXiv:2304.07193v2, Table 4"),
    ("dinov2_vitg14", "linear@dinov2"): (86.5, "arXiv:2304.07193v2, Table 4"),
    ("dinov2_vitg14", "knn"): (83.5, "arXiv:2304.07193v2, Table 4"),
    ("mae_vitb16", "finetune@mae"): (83.6, "arXiv:2111.06377, Table 3"),
    ("mae_vitl16", "finetune@mae-l"): (85.9, "arXiv:2111.06377, Table 3"),
    ("mae_vith14", "finetune@mae-h"): (86.9, "arXiv:2111.06377, Table 3"),
    # 300 epochs, as the released ViTs (§6.2's unnumbered training-length table: 600-ep 73.4, 76.7)
    ("mocov3_vits16", "linear@mocov3"): (72.5, "arXiv:2104.02057, Table 4"),
    ("mocov3_vitb16", "linear@mocov3"): (76.5, "arXiv:2104.02057, Table 4"),
    # appendix B; FINETUNE.md quotes the same figures as its "paper (TF/TPU)" row
    ("mae_vitb16", "linear@mae"): (68.0, "arXiv:2111.06377, Table 12"),
    ("mae_vitl16", "linear@mae"): (75.8, "arXiv:2111.06377, Table 12"),
    ("mae_vith14", "linear@mae"): (76.6, "arXiv:2111.06377, Table 12"),
    # the README's figures are the paper's Table 2 (linear, k-NN)
    ("dino_vits16", "linear@dino"): (77.0, "arXiv:2104.14294, Table 2"),
    ("dino_vits16", "knn@dino"): (74.5, "arXiv:2104.14294, Table 2"),
    ("dino_vits8", "linear@dino"): (79.7, "arXiv:2104.14294, Table 2"),
    ("dino_vits8", "knn@dino"): (78.3, "arXiv:2104.14294, Table 2"),
    ("dino_vitb16", "linear@dino-vitb"): (78.2, "arXiv:2104.14294, Table 2"),
    ("dino_vitb16", "knn@dino"): (76.1, "arXiv:2104.14294, Table 2"),
    ("dino_vitb8", "linear@dino-vitb"): (80.1, "arXiv:2104.14294, Table 2"),
    ("dino_vitb8", "knn@dino"): (77.4, "arXiv:2104.14294, Table 2"),
    ("dino_resnet50", "linear@dino-r50"): (75.3, "arXiv:2104.14294, Table 2"),
    ("dino_resnet50", "knn@dino"): (67.5, "arXiv:2104.14294, Table 2"),
}


def test_shipped_file_holds_the_papers_own_figures_and_shows_them():
    pub = load_published()
    got = {(e.tag, e.recipe): e for e in pub.entries if e.dataset == "imagenet"}
    for key, (value, where) in PAPER_TABLE.items():
        assert got[key].paper_value == value and where in got[key].paper_source, key
    assert {k for k, e in got.items() if e.paper_source} == set(PAPER_TABLE)
    for key in PAPER_TABLE:  # each names its table and the text it was read in, never a guess
        assert re.search(r"Table \d+", got[key].paper_source), key
        assert "read in" in got[key].paper_source and "unverified" not in got[key].paper_source
    rec = SimpleNamespace(value=0.69, ci95=[0.68, 0.70], ci_method="bootstrap-test", unit="u")
    c = compare(got[("simclr_r50", "linear@simclr")], rec)
    assert c.theirs == 69.1  # theirs stays the source's figure; the paper's is shown beside it
    for text in (text_table([c]), "\n".join(published_md([c])), published_html([c])):
        assert "the paper: 69.3 (" in text and "Table 6" in text
    plain = compare(got[("mocov3_r50", "linear@mocov3-r50")], rec)
    assert "the paper: " not in text_table([plain]) + published_html([plain])


def test_published_is_not_a_card():
    assert "published" not in shipped_cards()


def test_published_tags_are_registered():
    from ssl_eval.backbones.catalog import get_spec
    from ssl_eval.backbones.registry import BACKBONES

    for e in load_published().entries:
        get_spec(e.tag)
        assert e.tag in BACKBONES, e.label


def test_published_cards_exist():
    for e in load_published().entries:
        assert e.recipe in shipped_cards(), e.label
        load_card(e.recipe)


def test_published_datasets_exist():
    from ssl_eval.data.datasets import DATASETS

    for e in load_published().entries:
        assert e.dataset in DATASETS, e.label


ENTRY = """\
  - tag: pixels
    dataset: digits
    recipe: knn
    metric: top1
    value: 97.5
    source: a test figure, tests/test_published.py
    note: raw pixels
"""
SOURCE = "    source: a test figure, tests/test_published.py\n"
PAPER = "    paper_value: 97.0\n    paper_source: a test paper, Table 1\n"


def _file(tmp_path, entries=ENTRY, head="version: 1\n", name="pub.yaml"):
    p = tmp_path / name
    p.write_text(head + "entries:\n" + entries)
    return p


@pytest.mark.parametrize(
    "head, entries, says",
    [
        ("version: 2\n", ENTRY, "version 2"),
        ("version: 1\nextra: 1\n", ENTRY, "unknown key 'extra'"),
        ("", ENTRY, "'version' and 'entries' are required"),
        ("version: 1\n", "  bad: 1\n", "entries must be a list"),
        ("version: 1\n", ENTRY.replace("recipe: knn", "recipes: knn"), "unknown key 'recipes'"),
        ("version: 1\n", ENTRY.replace("top1", "top3"), "metric 'top3'"),
        ("version: 1\n", ENTRY.replace("97.5", "0"), "not a percentage"),
        ("version: 1\n", ENTRY.replace("97.5", "120"), "not a percentage"),
        ("version: 1\n", ENTRY.replace("97.5", ".nan"), "not a percentage"),
        ("version: 1\n", ENTRY.replace("97.5", "'high'"), "expected float"),
        ("version: 1\n", ENTRY.replace("tag: pixels", "tag: my tag"), "without spaces"),
        ("version: 1\n", ENTRY.replace(SOURCE, "    source: ' '\n"), "is empty"),
        ("version: 1\n", ENTRY.replace(SOURCE, "    source: |\n      a\n      b\n"), "one line"),
        ("version: 1\n", ENTRY + ENTRY, "published twice"),
        ("version: 1\ndatasets:\n  digits:\n    url: x\n", ENTRY, "unknown key 'url'"),
        ("version: 1\ndatasets:\n  digits: {}\n", ENTRY, "missing required key(s) download"),
        ("version: 1\n", ENTRY.replace(SOURCE, ""), "entries[0]: missing required key(s) source"),
        ("version: 1\n", "  - 3\n", "entries[0]: expected a mapping, got int"),
        ("version: 1\n", ENTRY + "    paper_value: 97.0\n", "both or neither"),
        ("version: 1\n", ENTRY + "    paper_source: Table 1\n", "both or neither"),
        ("version: 1\n", ENTRY + PAPER.replace("97.0", "101"), "paper_value 101"),
        ("version: 1\n", ENTRY + PAPER.replace("97.0", "'x'"), "expected float"),
        ("version: 1\n", ENTRY + "    evaluation: own\n", "evaluation 'own' is not one of"),
        ("version: 1\n", ENTRY + "    evaluation: [probe]\n", "expected str"),
    ],
)
def test_schema_refusals_are_one_line(tmp_path, head, entries, says):
    p = _file(tmp_path, entries, head)
    with pytest.raises(UserError) as e:
        load_published(p)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_missing_file_and_missing_entry(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_published(tmp_path / "nope.yaml")
    pub = load_published(_file(tmp_path))
    with pytest.raises(UserError, match="no published number for pixels on cifar10.*digits/knn"):
        pub.select("pixels", "cifar10")
    with pytest.raises(UserError, match="tags with published numbers: pixels"):
        pub.select("dino_vits16", "digits")
    assert [e.recipe for e in pub.select("pixels", "digits", "knn")] == ["knn"]


@pytest.mark.parametrize(
    "change, says",
    [
        ({"recipe": "linear@nowhere"}, "recipe card 'linear@nowhere' is not shipped"),
        ({"tag": "dinov9_vitz14"}, "backbone tag 'dinov9_vitz14' is not registered"),
        ({"tag": "random:resnet10t"}, "backbone tag 'random:resnet10t' is not registered"),
        ({"dataset": "imagenet22k"}, "dataset 'imagenet22k' is not registered"),
    ],
)
def test_check_runnable_names_what_is_missing(change, says):
    fields = dict(tag="pixels", dataset="digits", recipe="knn", metric="top1", value=90.0)
    entry = PublishedEntry(**(fields | change), source="test")
    with pytest.raises(UserError) as e:
        check_runnable(entry)
    assert says in str(e.value) and "\n" not in str(e.value)
    assert check_runnable(PublishedEntry(**fields, source="test")).name == "knn"


def _entry(value=76.7):
    return PublishedEntry("t", "d", "knn", "top1", value, "src")


def test_compare_arithmetic():
    rec = SimpleNamespace(value=0.7512, ci95=[0.7401, 0.7623], ci_method="bootstrap-test", unit="u")
    c = compare(_entry(76.7), rec)
    assert c.ours == pytest.approx(75.12) and c.theirs == 76.7
    assert c.difference == pytest.approx(75.12 - 76.7)
    assert c.interval == pytest.approx((74.01, 76.23))
    assert c.inside is False
    assert compare(_entry(75.5), rec).inside is True
    assert compare(_entry(76.23), rec).inside is True  # the interval's ends belong to it
    assert compare(_entry(74.0), rec).inside is False
    none = compare(_entry(), SimpleNamespace(value=0.5, ci95=None, ci_method="", unit="u"))
    assert none.interval is None and none.inside is None
    # the table: theirs as printed (79.0 keeps its decimal), ours and the difference in points
    assert cells(compare(_entry(79.0), rec))[4:] == [
        "75.12", "79.0", "-3.88", "[74.01, 76.23]", "no",
    ]  # fmt: skip
    assert cells(none)[7:] == ["none", "n/a"]


def _run(argv, capsys):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.slow
def test_reproduce_end_to_end_and_report(tmp_path, capsys):
    pub = _file(tmp_path)
    res = tmp_path / "res"
    argv = ["reproduce", "pixels", "--dataset", "digits", "--published", str(pub)]
    rc, out, err = _run([*argv, "--results-dir", str(res), "--no-progress"], capsys)
    assert rc == 0, err
    (path,) = (res / "records").glob("*.json")
    (rec,) = [r for r in json.loads(path.read_text())["records"] if r["metric"] == "top1"]
    assert rec["protocol"]["name"] == "knn" and rec["backbone"] == "pixels"
    assert rec["dataset"]["name"] == "digits" and not rec["protocol"]["overrides"]
    ours, lo, hi = 100 * rec["value"], 100 * rec["ci95"][0], 100 * rec["ci95"][1]
    row = next(line for line in out.splitlines() if line.startswith("pixels"))
    inside = "yes" if lo <= 97.5 <= hi else "no"
    assert row.split() == [
        "pixels", "digits", "knn", "top1", f"{ours:.2f}", "97.5", f"{ours - 97.5:+.2f}",
        f"[{lo:.2f},", f"{hi:.2f}]", inside,
    ]  # fmt: skip
    assert "theirs (pixels, knn): a test figure, tests/test_published.py" in out
    assert "note: raw pixels" in out

    # the same command again reuses the record (skipped unit) and prints the same row
    rc, out2, _ = _run([*argv, "--results-dir", str(res), "--no-progress"], capsys)
    assert rc == 0 and row in out2.splitlines()

    # the report shows the same row; a record of another setting (a --set override) is not shown
    rc, _, err = _run(
        ["run", "--backbone", "pixels", "--dataset", "digits", "--protocol", "knn",
         "--set", "ks=[5]", "--results-dir", str(res), "--no-progress", "--no-leaderboard"],
        capsys,
    )  # fmt: skip
    assert rc == 0, err
    rc, _, err = _run(
        ["report", "--results-dir", str(res), "--published", str(pub), "--no-progress",
         "--cache-dir", str(tmp_path / "no-features")],  # no t-SNE maps to draw: faster
        capsys,
    )  # fmt: skip
    assert rc == 0, err
    md = (res / "report" / "report.md").read_text()
    section = md.split("## Published numbers", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| pixels")]
    assert rows == [
        "| " + " | ".join(row.split()[:7] + [f"\\[{lo:.2f}, {hi:.2f}\\]", inside]) + " |"
    ]
    assert "Published numbers" in (res / "report" / "index.html").read_text()


def _record(backbone="pixels", path=None):
    card = load_card("knn")
    return SimpleNamespace(
        backbone=backbone,
        weights={"source": "file", "sha256": "0" * 64, "path": path},
        dataset={"name": "digits"},
        metric="top1",
        protocol={"name": "knn", "source": "shipped:knn", "version": card.version, "overrides": {}},
        setting={"summary": {"column": {"features": {"image_size": None, "feature_kind": None}}}},
    )


def test_a_tag_on_another_weights_file_is_not_theirs():
    from ssl_eval.backbones.weights import WeightsSource

    hub = "/hf/hub/models--timm--vit_small_patch14_dinov2.lvd142m/snapshots/ab/model.safetensors"
    src = WeightsSource(
        ("dinov2_vits14_pretrain.pth",),
        hf_repo="timm/vit_small_patch14_dinov2.lvd142m",
        url="https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth",
    )
    assert src.is_official("/w/dinov2_vits14_pretrain.pth") and src.is_official(hub)
    assert not src.is_official("/w/finetuned.pth")
    assert not src.is_official("/hf/hub/models--me--mine/snapshots/ab/model.safetensors")
    entry = PublishedEntry("dinov2_vits14", "digits", "knn", "top1", 79.0, "src")
    version = load_card("knn").version
    assert matches(entry, _record("dinov2_vits14", hub), version, src)
    assert not matches(entry, _record("dinov2_vits14", "/w/finetuned.pth"), version, src)
    assert not matches(entry, _record("dinov2_vits14", None), version, src)


def test_matches_only_the_entrys_setting():
    entry = PublishedEntry("pixels", "digits", "knn", "top1", 97.5, "src")
    card = load_card("knn")
    base = SimpleNamespace(
        backbone="pixels",
        dataset={"name": "digits"},
        metric="top1",
        protocol={"name": "knn", "source": "shipped:knn", "version": card.version, "overrides": {}},
        setting={"summary": {"column": {"features": {"image_size": None, "feature_kind": None}}}},
    )
    assert matches(entry, base, card.version)
    for change in (
        {"backbone": "pixels2"},
        {"dataset": {"name": "shapes"}},
        {"metric": "top5"},
        {"protocol": base.protocol | {"overrides": {"ks": [5]}}},
        {"protocol": base.protocol | {"version": card.version + 1}},
        {"protocol": base.protocol | {"source": "my/knn.yaml"}},
        {"setting": {"summary": {"column": {"features": {"image_size": 64}}}}},
        {"setting": {"summary": {"column": {"features": {"feature_kind": "cls"}}}}},
    ):
        assert not matches(entry, SimpleNamespace(**(vars(base) | change)), card.version), change


def test_reproduce_without_weights_says_which_file_and_where(tmp_path, capsys):
    pub = _file(tmp_path, ENTRY.replace("tag: pixels", "tag: dinov2_vits14"))
    rc, out, err = _run(
        ["reproduce", "dinov2_vits14", "--dataset", "digits", "--published", str(pub),
         "--results-dir", str(tmp_path / "res")],
        capsys,
    )  # fmt: skip
    assert rc == 2 and out == ""
    (line,) = err.strip().splitlines()
    assert "dinov2_vits14_pretrain.pth" in line and str(tmp_path / "weights") in line
    assert not (tmp_path / "res" / "records").exists()  # refused before any work


def test_reproduce_without_data_says_what_to_download_and_where(tmp_path, capsys):
    hint = "get the CIFAR-10 python archive and extract it into DIR, then pass --data-root DIR"
    head = f"version: 1\ndatasets:\n  cifar10:\n    download: {hint}\n"
    pub = _file(tmp_path, ENTRY.replace("digits", "cifar10"), head)
    argv = ["reproduce", "pixels", "--dataset", "cifar10", "--published", str(pub)]
    rc, _, err = _run([*argv, "--results-dir", str(tmp_path / "res")], capsys)
    assert rc == 2
    assert err.strip().splitlines() == [
        f"ssl-eval: error: cifar10 is not here (no --data-root given): {hint}"
    ]
    rc, _, err = _run([*argv, "--data-root", str(tmp_path), "--results-dir", "r"], capsys)
    (line,) = err.strip().splitlines()
    assert rc == 2 and f"does not load from {tmp_path}" in line and line.endswith(hint)
    assert "cifar-10-batches-py" in line  # the loader's own word on the expected layout


def test_reproduce_refuses_a_recipe_card_not_shipped(tmp_path, capsys):
    pub = _file(tmp_path, ENTRY.replace("recipe: knn", "recipe: linear@nowhere"))
    rc, _, err = _run(
        ["reproduce", "pixels", "--dataset", "digits", "--published", str(pub)], capsys
    )
    (line,) = err.strip().splitlines()
    assert rc == 2 and "recipe card 'linear@nowhere' is not shipped" in line


def test_shipped_file_text_is_what_it_loads():
    """Anchors and folded lines read as intended: notes shared by anchors are one line."""
    pub = load_published()
    for e in pub.entries:
        assert "\n" not in e.source and "\n" not in e.note
    texts = {e.note for e in pub.entries if e.tag.startswith("dinov2") and e.recipe == "knn"}
    assert len(texts) == 1 and textwrap.shorten(texts.pop(), 30).startswith("dinov2/eval/knn.py")


# the card that follows each family's own linear-evaluation script (its name says whose):
# a paper's linear figure set against the generic `linear` card compares two recipes
LINEAR_CARDS = {
    "simclr": "linear@simclr",  # google-research/simclr run.py, the README's linear eval
    "simclr2": "linear@simclr",
    "mocov3_vit": "linear@mocov3",  # facebookresearch/moco-v3 main_lincls.py, --lr=3
    "mocov3_r50": "linear@mocov3-r50",  # main_lincls.py's defaults (lr 0.1)
    "mae": "linear@mae",  # facebookresearch/mae main_linprobe.py
    # facebookresearch/dino eval_linear.py, the README's command for each network
    "dino_vits": "linear@dino",  # the defaults: the class tokens of the last 4 blocks
    "dino_vitb": "linear@dino-vitb",  # --n_last_blocks 1 --avgpool_patchtokens true
    "dino_resnet50": "linear@dino-r50",  # --arch resnet50: the average pool
    "dino_xcit": "linear@dino-xcit",  # --arch xcit_*: model(inp), the normed class token
    "dinov2": "linear@dinov2",  # facebookresearch/dinov2 eval/linear.py
}


def _family(tag: str) -> str:
    if tag.startswith("dino_xcit_"):
        return "dino_xcit"
    if tag.startswith("dino_"):
        return tag.rstrip("0123456789") if tag.startswith("dino_vit") else tag
    if tag.startswith("mocov3_"):
        return "mocov3_r50" if tag == "mocov3_r50" else "mocov3_vit"
    return tag.split("_")[0]


def test_a_papers_linear_figure_runs_its_papers_card_never_the_generic_one():
    pub = load_published()
    linear = [e for e in pub.entries if e.recipe.split("@")[0] == "linear"]
    assert linear
    for e in linear:
        if e.recipe == "linear":  # the generic card: only for a figure no probe reproduces
            assert e.evaluation == "own-head" and e.tag.startswith("supervised_"), e.label
            continue
        assert e.evaluation == "probe", e.label
        assert e.recipe == LINEAR_CARDS[_family(e.tag)], e.label
    # every family with its own card uses it: a new entry on `linear` fails above
    assert {_family(e.tag) for e in linear if e.recipe != "linear"} == set(LINEAR_CARDS)


def test_each_recipe_card_cites_the_commit_its_entries_cite():
    """A card following a script names the commit of the repository the entry's figure is read
    from (the card and the figure are the same code's)."""
    for e in load_published().entries:
        if "@" not in e.recipe or e.recipe.startswith("finetune@"):
            continue  # finetune@mae's figures are README's, read at another commit
        described = " ".join(load_card(e.recipe).description.split())
        commit = re.search(r"@([0-9a-f]{40})", e.source)
        if commit is None:  # a figure read in the paper itself: the card cites that paper
            paper = re.search(r"arXiv:(\d{4}\.\d{4,5})v\d", e.source).group(1)
            assert f"arXiv:{paper}" in described, e.label
            continue
        assert commit.group(1) in described, e.label


@pytest.mark.parametrize(
    "tag, recipe",
    sorted({(e.tag, e.recipe) for e in load_published().entries if e.dataset == "imagenet"}),
)
@pytest.mark.slow
def test_reproduce_runs_exactly_the_entrys_card(tag, recipe, monkeypatch, tmp_path):
    """What ``reproduce`` hands to the evaluation is the entry's tag, dataset and card as
    shipped: nothing overridden, no other card."""
    from ssl_eval.orchestrate import evaluate
    from ssl_eval.orchestrate import reproduce as rep

    seen = []

    def capture(cfg):
        seen.append(cfg)
        raise UserError("captured")

    monkeypatch.setattr(rep, "_need_weights", lambda tag, offline: None)
    monkeypatch.setattr(rep, "_need_data", lambda published, entry, rc: None)
    monkeypatch.setattr(evaluate, "run", capture)
    rc = rep.ReproduceConfig(tag, "imagenet", recipe, results_dir=tmp_path / "res")
    with pytest.raises(UserError, match="captured"):
        rep.reproduce(rc)
    (cfg,) = seen
    assert cfg.backbones == (tag,) and cfg.datasets == ("imagenet",)
    (card,) = cfg.protocols
    shipped = load_card(recipe)
    assert (card.name, card.version, card.source) == (recipe, shipped.version, f"shipped:{recipe}")
    assert card.params == shipped.params and card.overrides == ()


def test_reproduce_mocov3_vitb16_without_weights_or_data_says_what_and_where(tmp_path, capsys):
    """The seed table's MoCo v3 ViT-B on ImageNet: without its file, one line naming it and
    the folder; with a (fake) file but no ImageNet, one line saying what to download."""
    argv = ["reproduce", "mocov3_vitb16", "--dataset", "imagenet",
            "--results-dir", str(tmp_path / "res")]  # fmt: skip
    rc, out, err = _run(argv, capsys)
    (line,) = err.strip().splitlines()
    assert rc == 2 and out == ""
    assert "vit-b-300ep.pth.tar" in line and str(tmp_path / "weights") in line
    (tmp_path / "weights").mkdir(exist_ok=True)
    (tmp_path / "weights" / "vit-b-300ep.pth.tar").write_bytes(b"not read before the data")
    rc, out, err = _run(argv, capsys)
    (line,) = err.strip().splitlines()
    hint = load_published().datasets["imagenet"].download
    assert (
        rc == 2 and line == f"ssl-eval: error: imagenet is not here (no --data-root given): {hint}"
    )
    rc, out, err = _run([*argv, "--data-root", str(tmp_path)], capsys)
    (line,) = err.strip().splitlines()
    assert rc == 2 and f"does not load from {tmp_path}" in line and line.endswith(hint)
    assert not (tmp_path / "res" / "records").exists()  # refused before any work


def test_an_own_head_figure_is_said_to_be_no_reproduction():
    pub = load_published()
    (sup,) = [e for e in pub.entries if e.tag == "supervised_r50_v1"]
    assert sup.evaluation == "own-head" and not sup.is_probe
    rec = SimpleNamespace(value=0.7512, ci95=[0.7401, 0.7623], ci_method="bootstrap-test", unit="u")
    c = compare(sup, rec)
    assert c.inside is None and cells(c)[8] == "n/a (own head)"
    assert cells(c)[4:7] == ["75.12", "76.13", "-1.01"]
    for text in (text_table([c]), "\n".join(published_md([c])), published_html([c])):
        assert "own classifier" in text and "no reproduction gap" in text
    probe = compare(PublishedEntry("t", "d", "knn", "top1", 76.0, "src"), rec)
    assert probe.inside is True and "own classifier" not in text_table([probe])
    with pytest.raises(UserError, match="evaluation 'own' is not one of probe, own-head"):
        PublishedEntry("t", "d", "knn", "top1", 76.0, "src", evaluation="own")


def test_every_card_a_note_names_is_shipped():
    """A note pointing at another card (DINOv2's at linear_aug@dinov2) names a shipped one."""
    names = set(shipped_cards())
    for e in load_published().entries:
        for name in re.findall(r"\b(?:linear|linear_aug|knn|finetune|logreg)@[\w-]+", e.note):
            assert name in names, (e.label, name)


# facebookresearch/dino@7c446df README.md, "Evaluation: Linear classification on ImageNet": the
# eval_linear.py command given for each network's released linear weights (their flags; the
# ViT-S commands pass none: eval_linear.py's defaults --n_last_blocks 4
# --avgpool_patchtokens false), written out from the README. The README prints no command for
# its XCiTs: --arch is the name in its XCiT table (hubconf.py's), every other flag the default
DINO_README_COMMANDS = {
    "dino_vits16": "--arch vit_small --patch_size 16",
    "dino_vits8": "--arch vit_small --patch_size 8",
    "dino_vitb16": "--arch vit_base --patch_size 16 --n_last_blocks 1 --avgpool_patchtokens true",
    "dino_vitb8": "--arch vit_base --patch_size 8 --n_last_blocks 1 --avgpool_patchtokens true",
    "dino_resnet50": "--arch resnet50",
    "dino_xcit_small_12_p16": "--arch xcit_small_12_p16",
    "dino_xcit_small_12_p8": "--arch xcit_small_12_p8",
    "dino_xcit_medium_24_p16": "--arch xcit_medium_24_p16",
    "dino_xcit_medium_24_p8": "--arch xcit_medium_24_p8",
}
# eval_linear.py's branches for an --arch that is not one of its ViTs: an XCiT from torch.hub
# ("xcit" in the name), else a torchvision model; both feed the head model(inp)
NON_VIT_CARDS = {"xcit": "linear@dino-xcit", "resnet50": "linear@dino-r50"}


def test_each_dino_linear_entry_runs_the_card_of_its_readme_command():
    entries = [e for e in load_published().entries if e.tag.startswith("dino_")]
    linear = {e.tag: e.recipe for e in entries if e.recipe.startswith("linear")}
    assert set(linear) == set(DINO_README_COMMANDS)
    for tag, command in DINO_README_COMMANDS.items():
        words = command.split()
        flags = dict(zip(words[::2], words[1::2], strict=True))
        p = load_card(linear[tag]).params
        if "vit" not in flags["--arch"]:  # eval_linear.py's non-ViT branches: model(inp)
            assert (p.n_last_blocks, p.avgpool) == ((), ()), tag
            branch = "xcit" if "xcit" in flags["--arch"] else flags["--arch"]
            assert linear[tag] == NON_VIT_CARDS[branch], tag
            continue
        n = int(flags.get("--n_last_blocks", 4))
        avgpool = flags.get("--avgpool_patchtokens", "false") == "true"
        assert (p.n_last_blocks, p.avgpool) == ((n,), (avgpool,)), tag
        # the script stacks the class token and the patch mean value by value
        assert p.avgpool_layout == ("interleave" if avgpool else "concat"), tag


def _meta_model(tag: str, monkeypatch):
    """The network ``tag`` builds, from its family's registered architecture (the tag's
    variant in the family's ARCHS table), with the family's own constructor, on the meta
    device: no weights, no memory."""
    import importlib

    import torch

    from ssl_eval.backbones import list_backbones, vit
    from ssl_eval.backbones import resnet as resnet_mod
    from ssl_eval.backbones.adapters import TAGS
    from ssl_eval.backbones.families import dino as dino_family
    from ssl_eval.backbones.vit import ViTArch

    list_backbones()
    family, variant = TAGS[tag]
    for module in (vit, resnet_mod, dino_family):  # the constructors, kept on the meta device
        monkeypatch.setattr(module, "uninitialised", lambda factory: factory())
    spec = importlib.import_module(f"ssl_eval.backbones.families.{family}").ARCHS
    spec = spec.pick(variant, "the tag", tag).spec
    with torch.device("meta"):
        if isinstance(spec, ViTArch):
            return vit.create_timm(spec.timm, 224, **spec.kwargs())
        if isinstance(spec, dino_family.XCiTArch):
            return dino_family.create_xcit(spec)
        if family == "dinov2":  # (width, heads, depth); the variant is timm's own name
            return vit.create_timm(variant, 224)
        layers, width = spec  # a torchvision-layout ResNet: (blocks per stage, width)
        return resnet_mod.ResNet(layers, width)


def _accepts(card, tag: str, model) -> None:
    """The card's own refusals of a backbone, run on ``model`` (raise UserError where it
    refuses): a fine-tune card's vit_depth and pool (the classifier built as the run does),
    a linear_aug card's n_last_blocks, and the feature kind a card reads instead of the
    backbone's own (linear@dinov2's layers:4), computed on a meta image."""
    import torch

    from ssl_eval.backbones.base import FEATURE_KINDS
    from ssl_eval.protocols import finetune
    from ssl_eval.protocols._aug_grid import check_blocks

    p = card.params
    if card.type == "finetune":
        bb = SimpleNamespace(model=model, tag=tag, feature_kind="cls", embed_dim=lambda: 0)
        inp = SimpleNamespace(
            backbone=bb,
            device=torch.device("meta"),
            seed=0,
            bundle=SimpleNamespace(num_classes=1000),
        )
        with torch.device("meta"):
            finetune._model(inp, p)
    if card.type == "linear_aug":
        check_blocks(model, p)
    kind = card.protocol.features_of(p)
    if kind is not None:
        x = torch.empty(1, 3, 224, 224, device="meta")
        assert FEATURE_KINDS.get(kind)(model, x).shape[0] == 1


@pytest.mark.parametrize(
    "tag, recipe", sorted({(e.tag, e.recipe) for e in load_published().entries})
)
@pytest.mark.slow
def test_each_entrys_card_accepts_its_tags_architecture(tag, recipe, monkeypatch):
    """A published figure whose card refuses the tag can never be reproduced: finetune@mae
    is ViT-B's (vit_depth 12), linear@dino reads 4 ViT blocks, linear@dinov2 layers:4. The
    tag's network (its registered architecture on the meta device) goes through the card's
    own checks."""
    model = _meta_model(tag, monkeypatch)
    try:
        _accepts(load_card(recipe), tag, model)
    except UserError as e:
        pytest.fail(f"{tag} / {recipe}: the card refuses the tag: {e}")


@pytest.mark.parametrize(
    "tag, recipe, says",
    [
        ("mae_vitl16", "finetune@mae", "a ViT of 12 blocks, but mae_vitl16 has 24"),
        ("mae_vitb16", "finetune@mae-h", "a ViT of 32 blocks, but mae_vitb16 has 12"),
        ("dino_resnet50", "linear@dino", "n_last_blocks reads the class tokens"),
        ("dino_xcit_small_12_p16", "linear@dino", "class-attention blocks"),
        ("dino_xcit_small_12_p16", "linear@dinov2", "class-attention blocks"),
        ("dino_xcit_small_12_p16", "finetune@mae", "averages the patch tokens"),
        ("mocov3_r50", "finetune@mae", "has no blocks"),
    ],
)
def test_the_card_checks_refuse_a_tag_of_another_architecture(tag, recipe, says, monkeypatch):
    """The check above is not vacuous: each of the cards' refusals fires on the meta model."""
    with pytest.raises(UserError, match=re.escape(says)):
        _accepts(load_card(recipe), tag, _meta_model(tag, monkeypatch))


def test_imagenet_download_hint_lays_out_what_the_loader_reads(tmp_path):
    """A folder laid out exactly as the published file's ImageNet hint says (and as
    docs/reproduce.md quotes it) loads: the hint's paths are the loader's (imagenet/train/,
    imagenet/val/ under --data-root), not DIR/train/."""
    from transfer_fakes import jpeg

    from ssl_eval.data.datasets import DatasetOptions, get_dataset

    hint = load_published().datasets["imagenet"].download
    layouts = re.findall(r"DIR/(\S+)/<wnid>/\*\.JPEG", hint)
    assert len(layouts) == 2, hint  # the train and the val folders
    wnids = ["n01440764", "n01443537"]
    for k, folder in enumerate(layouts):
        for c, w in enumerate(wnids):
            jpeg(tmp_path / folder / w / f"{w}_{k}.JPEG", c, k)
    b = get_dataset("imagenet", DatasetOptions(tmp_path))
    assert b.classes == wnids and (len(b.train), len(b.test)) == (2, 2)
    doc = (Path(__file__).parents[1] / "docs" / "reproduce.md").read_text()
    for folder in layouts:
        assert f"`DIR/{folder}/<wnid>/*.JPEG`" in doc


def test_reproduce_on_data_too_small_for_the_recipe_does_not_advise_a_set(tmp_path, capsys):
    """reproduce takes no --set: a recipe's own refusal that advises one (knn's k beyond a
    small bank) says that reproduce runs the card as shipped and which command changes it."""
    from test_robustness import fake_imagenet

    fake_imagenet(tmp_path / "data")
    head = "version: 1\ndatasets:\n  imagenet:\n    download: get ImageNet\n"
    pub = _file(tmp_path, ENTRY.replace("digits", "imagenet"), head)
    argv = ["reproduce", "pixels", "--dataset", "imagenet", "--published", str(pub),
            "--data-root", str(tmp_path / "data"), "--results-dir", str(tmp_path / "r"),
            "--cache-dir", str(tmp_path / "c"), "--no-progress"]  # fmt: skip
    rc, _, err = _run(argv, capsys)
    (line,) = [ln for ln in err.splitlines() if ln.startswith("ssl-eval: error")]
    assert rc == 2 and "exceeds" in line and "as shipped" in line, line
    assert "ssl-eval run --backbone pixels --dataset imagenet --protocol knn --set" in line
