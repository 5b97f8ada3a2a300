"""Transfer datasets read from fake files in torchvision's exact layouts, refused in one line
when a file is missing, and their metrics (mean per-class accuracy, VOC2007 11-point mAP)
against independent formulas."""

import numpy as np
import pytest
import transfer_fakes as fakes

from ssl_eval.core.errors import UserError
from ssl_eval.core.stats import bootstrap_ci, bootstrap_stat
from ssl_eval.data.datasets import DatasetOptions, get_dataset
from ssl_eval.data.transfer import COLLECTIONS, SPECS, expand_collections
from ssl_eval.protocols._metrics import ap11, map11, mean_per_class_accuracy


@pytest.mark.parametrize("name", sorted(fakes.BUILDERS))
def test_layout_read_and_missing_file_refused(name, tmp_path):
    want = fakes.BUILDERS[name](tmp_path)
    b = get_dataset(name, DatasetOptions(tmp_path))
    assert (len(b.train), len(b.test), b.num_classes) == (
        want["train"],
        want["test"],
        want["classes"],
    )
    assert b.metric == SPECS[name].metric
    first = b.train.load(0)  # the paths point at the images, whose colour is the class
    assert first.shape == (8, 8, 3)
    # every annotation file the spec names is needed: removing it is refused in one line
    # that names it and the --download alternative
    victim = tmp_path / SPECS[name].files[-1]
    victim.rename(victim.with_name(victim.name + ".gone"))
    with pytest.raises(UserError) as e:
        get_dataset(name, DatasetOptions(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg and SPECS[name].files[-1] in msg
    assert "--download" in msg or SPECS[name].no_download in msg


def test_missing_image_refused(tmp_path):
    fakes.flowers102(tmp_path)
    (tmp_path / "flowers-102" / "jpg" / "image_00009.jpg").unlink()
    with pytest.raises(UserError, match=r"missing flowers-102/jpg/image_00009.jpg; .*--download"):
        get_dataset("flowers102", DatasetOptions(tmp_path))


def test_splits_and_labels_follow_the_official_files(tmp_path):
    fakes.flowers102(tmp_path)
    b = get_dataset("flowers102", DatasetOptions(tmp_path))
    # train = trnid + valid, test = tstid; labels 1-based in imagelabels.mat
    assert [p.name for p in b.train.paths] == [f"image_{i:05d}.jpg" for i in (1, 3, 5, 6, 2, 4)]
    assert b.train.labels.tolist() == [0, 1, 0, 1, 0, 1]
    assert b.test.labels.tolist() == [0, 0, 1, 0, 0, 1]
    fakes.caltech101(tmp_path)
    c = get_dataset("caltech101", DatasetOptions(tmp_path))
    assert c.classes == ["Faces", "accordion"]  # no BACKGROUND_Google
    assert np.bincount(c.train.labels).tolist() == [30, 30]
    assert not set(c.train.paths) & set(c.test.paths)
    fakes.voc2007(tmp_path)
    v = get_dataset("voc2007", DatasetOptions(tmp_path))
    t = v.multilabel["train"]
    from ssl_eval.data.transfer import VOC_CLASSES

    chair, car, person = (VOC_CLASSES.index(c) for c in ("chair", "car", "person"))
    assert t[0, chair] == 1  # one chair not difficult: present
    assert t[3, person] == 0 and t[3, car] == 1  # only a difficult person: ignored
    assert t[1, person] == -1
    assert v.train.labels.tolist() == [chair, car, VOC_CLASSES.index("horse"), car]


def test_collection_expands():
    assert expand_collections(["transfer", "cifar10"]) == COLLECTIONS["transfer"]
    assert {"food101", "voc2007", "cifar10", "cifar100"} <= set(COLLECTIONS["transfer"])


def _per_class_mean(hits, labels):
    """The mean over classes of each class's share of hits, a Python loop."""
    per = {}
    for h, y in zip(hits, labels, strict=True):
        per.setdefault(int(y), []).append(bool(h))
    return sum(sum(v) / len(v) for v in per.values()) / len(per)


def test_mean_per_class_against_a_direct_loop():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 200)
    hit = rng.random(200) < 0.3 + 0.1 * y
    assert mean_per_class_accuracy(hit, y) == pytest.approx(_per_class_mean(hit, y))
    assert mean_per_class_accuracy(hit, y) != pytest.approx(hit.mean())  # not plain top-1


def _devkit_ap(out, gt):
    """VOCevalcls.m (VOC2007 devkit), line by line: [so,si]=sort(-out); tp=gt(si)>0;
    fp=gt(si)<0; cumsums; rec=tp/sum(gt>0); prec=tp./(fp+tp); for t=0:0.1:1,
    p=max(prec(rec>=t)) (0 if empty); ap=ap+p/11."""
    si = sorted(range(len(out)), key=lambda i: -out[i])  # Python's sort is stable, as MATLAB's
    tp, fp, rec, prec = 0, 0, [], []
    npos = sum(1 for g in gt if g > 0)
    for i in si:
        tp += gt[i] > 0
        fp += gt[i] < 0
        rec.append(tp / npos)
        prec.append(tp / (fp + tp) if fp + tp else float("nan"))
    ap = 0.0
    for t in np.arange(0.0, 1.1, 0.1):
        ps = [p for r, p in zip(rec, prec, strict=True) if r >= t and p == p]
        ap += (max(ps) if ps else 0.0) / 11
    return ap


def test_ap11_by_hand_and_against_the_devkit_formula():
    # ranked: +, -, +, -  -> rec .5 .5 1 1, prec 1 .5 .667 .5: thresholds 0-.5 give 1, .6-1 give 2/3
    assert ap11([0.9, 0.8, 0.7, 0.1], [1, -1, 1, -1]) == pytest.approx((6 * 1 + 5 * 2 / 3) / 11)
    rng = np.random.default_rng(1)
    for _ in range(30):
        n = int(rng.integers(3, 40))
        scores = np.round(rng.normal(size=n), 1)  # ties on purpose
        gt = rng.choice([1, 0, -1], size=n, p=[0.3, 0.1, 0.6])
        gt[0] = 1
        assert ap11(scores, gt) == pytest.approx(_devkit_ap(scores.tolist(), gt.tolist()))
    scores = rng.normal(size=(25, 3))
    targets = rng.choice([1, -1], size=(25, 3))
    targets[0] = 1
    value, per = map11(scores, targets)
    assert value == pytest.approx(
        np.mean([_devkit_ap(scores[:, c].tolist(), targets[:, c].tolist()) for c in range(3)])
    )


def test_bootstrap_stat_is_the_bootstrap_of_a_mean():
    x = (np.random.default_rng(2).random(300) < 0.7).astype(float)
    assert bootstrap_stat(lambda idx: x[idx].mean(), len(x), 200, 5) == pytest.approx(
        bootstrap_ci(x, 200, 5)
    )


@pytest.mark.slow
def test_multilabel_protocol_against_a_direct_fit():
    """One LinearSVC per class at the cost with the best validation AP, refitted on train +
    val (difficult images left out), scored by the devkit's 11-point AP: written out here with
    scikit-learn directly."""
    from sklearn.svm import LinearSVC

    from ssl_eval.protocols.base import ProtocolInputs
    from ssl_eval.protocols.multilabel import MultilabelParams, run_multilabel

    rng = np.random.default_rng(3)
    n, nt, d, k = 60, 30, 8, 3
    centres = rng.normal(size=(k, d))
    t = np.where(rng.random((n + nt, k)) < 0.4, 1, -1).astype(np.int8)
    t[:, 0][::7] = 0  # some difficult-only images
    x = (t.clip(0, 1) @ centres + rng.normal(scale=1.5, size=(n + nt, d))).astype(np.float32)
    t[:3] = 1  # positives in train minus val ...
    t[50:52] = 1  # ... and in val
    tr, va = np.arange(50), np.arange(50, 60)
    p = MultilabelParams(costs=(0.01, 1.0))
    out = run_multilabel(
        ProtocolInputs(
            x[:n], t[:n, 0], x[n:], t[n:, 0], tr, va, k, train_targets=t[:n], test_targets=t[n:]
        ),
        p,
    )

    def norm(a):
        a = a.astype(np.float64)
        return a / (np.linalg.norm(a, axis=1) + 1e-5)[:, None]

    xs, xt = norm(x[:n]), norm(x[n:])
    aps = []
    for c in range(k):

        def fit(rows, cost, c=c):
            keep = rows[t[rows, c] != 0]
            m = LinearSVC(
                C=cost, class_weight={1: 2.0, -1: 1.0}, tol=1e-4, max_iter=2000, random_state=0
            )
            return m.fit(xs[keep], t[keep, c])

        val = [
            _devkit_ap(fit(tr, cost).decision_function(xs[va]).tolist(), t[va, c].tolist())
            for cost in p.costs
        ]
        best = p.costs[int(np.argmax(val))]
        assert out.details["selected_cost"][c] == best
        aps.append(
            _devkit_ap(fit(np.arange(n), best).decision_function(xt).tolist(), t[n:, c].tolist())
        )
    assert out.metrics["map11"] == pytest.approx(np.mean(aps))
    assert out.resampled["map11"](np.arange(nt)) == pytest.approx(np.mean(aps))


@pytest.mark.slow
def test_cli_transfer_end_to_end(tmp_path, capsys):
    """`ssl-eval run` on two fake transfer datasets: k-NN on Flowers-102 recorded in top-1 and
    its declared mean per-class accuracy (with a bootstrap interval), the SVMs on VOC2007 in
    11-point mAP; a protocol that cannot read a dataset's labels is n/a, and a run with no
    protocol for a dataset is refused in one line."""
    from ssl_eval.cli import main
    from ssl_eval.core.stats import unpack_bits
    from ssl_eval.records.store import load_records

    fakes.flowers102(tmp_path / "data")
    fakes.voc2007_every_class(tmp_path / "data")
    common = [
        "--backbone",
        "pixels",
        "--data-root",
        str(tmp_path / "data"),
        "--no-progress",
        "--results-dir",
        str(tmp_path / "results"),
    ]
    rc = main(
        [
            "run",
            *common,
            "--dataset",
            "flowers102,voc2007",
            "--protocol",
            "knn,multilabel",
            "--set",
            "costs=[1.0]",
            "--set",
            "ks=[1,3]",
            "--val-fraction",
            "0.34",
        ]
    )
    assert rc == 0
    recs = load_records(tmp_path / "results")
    got = {(r.dataset["name"], r.protocol["name"], r.metric): r for r in recs}
    assert ("voc2007", "knn", "top1") not in got and (
        "flowers102",
        "multilabel",
        "map11",
    ) not in got
    top1, mpc = got["flowers102", "knn", "top1"], got["flowers102", "knn", "mean_per_class"]
    hits = unpack_bits(top1.details["per_sample_correct"], top1.details["n_test"])
    y = np.array([0, 0, 1, 0, 0, 1])  # the fake's test labels; the last image is missed
    assert hits.tolist() == [1, 1, 1, 1, 1, 0] and mpc.value == pytest.approx(0.75)
    assert mpc.value == pytest.approx(_per_class_mean(hits, y)) and top1.value == pytest.approx(
        5 / 6
    )
    assert mpc.ci_method == "bootstrap-test" and mpc.ci95[0] <= mpc.value <= mpc.ci95[1]
    voc = got["voc2007", "multilabel", "map11"]
    assert voc.ci95 is not None and 0 < voc.value <= 1 and voc.dataset["sizes"]["test"] == 40
    # the transfer table: each dataset in its metric, the average of the two cells
    md = (tmp_path / "results" / "leaderboard.md").read_text()
    row = next(
        ln
        for ln in md.splitlines()
        if ln.startswith("| pixels |") and "voc2007" not in ln and ln.count("|") == 5
    )
    assert f"{100 * voc.value:.2f}" in row and f"{100 * mpc.value:.2f}" in row
    assert f"{50 * (voc.value + mpc.value):.2f} ±" in row.rsplit("|", 2)[1]
    assert "voc2007: 11-point mAP; flowers102: mean per-class accuracy" in md
    assert main(["run", *common, "--dataset", "voc2007", "--protocol", "knn"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "voc2007 is multi-label" in err and "--protocol multilabel" in err


def test_transfer_average_says_what_it_covers():
    from ssl_eval.report.leaderboard import Cell
    from ssl_eval.report.transfer import TransferTable, transfer_html, transfer_md

    def cell(v, h):
        return Cell(v, v - h, v + h, "bootstrap", 1, [])

    cells = {("a", "dtd"): cell(60.0, 3.0), ("a", "food101"): cell(80.0, 4.0)}
    cells[("b", "dtd")] = cell(70.0, 2.0)
    t = TransferTable(
        "linear",
        ["food101", "dtd"],
        ["a", "b"],
        cells,
        {"food101": "food101 / linear", "dtd": "dtd / linear"},
    )
    mean, half, got = t.average("a")
    assert (mean, got) == (70.0, ["food101", "dtd"]) and half == pytest.approx(5.0 / 2)
    lines = transfer_md([t])
    a_row = next(ln for ln in lines if ln.startswith("| a |"))
    b_row = next(ln for ln in lines if ln.startswith("| b |"))
    assert a_row.endswith("| 70.00 ± 2.50 |") and "†" not in a_row
    assert "| – |" in b_row and "70.00 ± 2.00 † (1/2: dtd)" in b_row
    html = transfer_html([t])
    assert "<td>70.00 ± 2.50</td>" in html and "<td>70.00 ± 2.00 † (1/2: dtd)</td>" in html
