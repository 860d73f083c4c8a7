"""The check's figures and HTML report: files exist, PNGs decode, the HTML parses and embeds
every figure, examples rank the worst boxes first, and a failing figure costs only itself."""
from __future__ import annotations

import base64
import io
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image

from certood import plots
from certood.extract import DatasetDetections


def _dets(name: str, n_images: int, per_image: int, seed: int) -> DatasetDetections:
    g = torch.Generator().manual_seed(seed)
    n = n_images * per_image
    xy = torch.rand(n, 2, generator=g) * 40
    boxes = torch.cat([xy, xy + 8 + torch.rand(n, 2, generator=g) * 16], dim=1)
    return DatasetDetections(name, torch.arange(n_images).repeat_interleave(per_image), boxes,
                             torch.ones(n, dtype=torch.long), torch.full((n,), 0.9), {}, n_images, 0.1)


@pytest.fixture()
def per_set():
    g = torch.Generator().manual_seed(0)
    out = {}
    for i, (name, shift) in enumerate((("id_test", 0.0), ("ood/near", 1.0), ("ood/far", 2.5))):
        dets = _dets(name, 4, 5, i)
        values = {"energy": torch.randn(20, generator=g) + shift, "maha": torch.randn(20, generator=g) * 3 + shift}
        out[name] = {"dets": dets, "values": values,
                     "flags": (values["energy"] > 1.0) | (values["maha"] > 3.0)}
    return out


@pytest.fixture()
def metrics():
    scores = {"energy": {"auroc": 0.71, "aupr_in": 0.7, "aupr_out": 0.6, "fpr95": 0.8, "fpr95_first": 0.8,
                         "n_id": 20, "n_ood": 20}}
    return {"spec": "spec.yaml", "spec_fingerprint": "ab" * 32, "detector_sha256": "cd" * 32,
            "protocol": "box-level <test>", "id_test": {"map": 0.5, "map50": 0.7, "map75": 0.4,
                                                        "n_images": 4, "n_boxes": 20},
            "ood": {"near": {"scores": scores, "rule": {"id_tpr": 0.9, "ood_flag_rate": 0.5}},
                    "far": {"scores": scores}},
            "monitor": {"rule": "energy > t.energy or maha > t.maha", "detector_threshold": 0.5,
                        "thresholds": {"energy": 1.0, "maha": 3.0}, "tpr": 0.95},
            "issues": []}


@pytest.fixture()
def image_paths(tmp_path):
    paths = {}
    for name in ("id_test", "ood/near", "ood/far"):
        folder = tmp_path / "images" / name.replace("/", "_")
        folder.mkdir(parents=True)
        for image_id in range(4):
            path = folder / f"{image_id}.png"
            Image.fromarray(np.full((64, 64, 3), 40 * image_id, dtype=np.uint8)).save(path)
            paths.setdefault(name, {})[image_id] = path
    return lambda name: paths[name]


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


def _parse(text: str) -> _Images:
    parser = _Images()
    parser.feed(text)
    parser.close()
    return parser


def test_every_figure_is_written_decodes_and_is_embedded_in_the_html(tmp_path, per_set, metrics, image_paths):
    metrics["certificates"] = {"id_test": {"counts": {"certified_id": 12, "undecided": 8}},
                               "near": {"certified_rate": 0.25, "undecided_rate": 0.75, "n_boxes": 20}}
    written = plots.write_visual_report(tmp_path, metrics, per_set, image_paths=image_paths)
    files = sorted(p.file for p in written)
    assert files == sorted(["plots/roc_near.png", "plots/roc_far.png", "plots/hist_energy.png",
                            "plots/hist_maha.png", "plots/certificates.png", "plots/examples_energy.png",
                            "plots/examples_maha.png"])
    assert metrics["plots"] == [p.to_dict() for p in written] and metrics["issues"] == []
    for f in files:
        with Image.open(tmp_path / f) as im:
            im.verify()
    text = (tmp_path / "report.html").read_text()
    parsed = _parse(text)
    assert len(parsed.sources) == len(files)
    for src in parsed.sources:
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)
        with Image.open(io.BytesIO(base64.b64decode(src[len(prefix):]))) as im:
            im.load()
            assert im.size[0] > 100 and im.size[1] > 100
    assert "src=\"plots/" not in text and "http" not in text.split("<body>")[1]  # self-contained
    assert "box-level &lt;test&gt;" in text  # text is escaped
    assert "0.710" in text and "certified_id" in text and "12" in text


def test_examples_rank_worst_false_alarms_then_worst_misses_by_each_scores_id_rank(per_set):
    chosen = plots.select_examples(per_set, "maha", k=3)
    alarms = [e for e in chosen if e.kind == "false alarm"]
    misses = [e for e in chosen if e.kind == "miss"]
    assert chosen == alarms + misses and len(alarms) == 3 and len(misses) == 3
    assert {e.dataset for e in alarms} == {"id_test"} and all(e.dataset.startswith("ood/") for e in misses)
    ref = per_set["id_test"]["values"]["maha"].double().numpy()

    def p_value(e):  # share of ID test boxes at or above, +1 smoothed
        x = float(per_set[e.dataset]["values"]["maha"][e.row])
        return (1 + int((ref >= x).sum())) / (len(ref) + 1)

    assert all(e.margin == pytest.approx(p_value(e), rel=1e-12) for e in chosen)
    assert alarms[0].margin == pytest.approx(2 / 21)  # the largest ID value: itself at or above, +1
    ood_maha = {n: per_set[n]["values"]["maha"] for n in ("ood/near", "ood/far")}
    lowest = min((float(v.min()), n) for n, v in ood_maha.items())
    first = misses[0]
    assert (float(per_set[first.dataset]["values"]["maha"][first.row]), first.dataset) == lowest
    assert [e.margin for e in alarms] == sorted(e.margin for e in alarms)
    assert [e.margin for e in misses] == sorted((e.margin for e in misses), reverse=True)
    assert len({(e.dataset, e.image_id) for e in chosen}) == len(chosen)  # one per image


def test_a_saturating_score_does_not_pick_every_scores_examples(per_set):
    """Mahalanobis on OOD near 1e4 while energy stays ID-like: the old combined margin (the
    largest excess in ID standard deviations) ranked every box by maha; each score's grid now
    shows the boxes that score finds most ID-like."""
    for name in ("ood/near", "ood/far"):
        per_set[name]["values"]["maha"] = torch.linspace(1e3, 4e4, 20)
        per_set[name]["values"]["energy"] = torch.linspace(-3.0, 3.0, 20).flip(0)
    by_energy = [e for e in plots.select_examples(per_set, "energy") if e.kind == "miss"]
    by_maha = [e for e in plots.select_examples(per_set, "maha") if e.kind == "miss"]
    assert {e.row for e in by_energy} >= {19} and by_energy[0].row == 19  # lowest energy: the last row
    assert by_maha[0].row == 0  # lowest maha: the first row
    assert all(e.margin == pytest.approx(1 / 21) for e in by_maha)  # above every ID box: p = 1/(n+1)
    assert by_energy[0].margin > 0.5  # energy finds it ID-like


def test_histogram_axis_follows_the_data():
    rng = np.random.default_rng(0)
    maha = np.r_[rng.gamma(4.0, 60.0, 500), 4e4]  # median ~ 230, a spike at 40,000
    assert plots.histogram_axis(maha) == ("log", 0.0)
    assert plots.histogram_axis(rng.normal(size=500))[0] == "linear"
    signed = np.r_[rng.normal(size=500), -3e3, 5e3]
    axis, linthresh = plots.histogram_axis(signed)
    assert axis == "symlog" and linthresh == pytest.approx(float(np.median(np.abs(signed))))
    assert plots.histogram_axis(np.r_[np.ones(10), 50.0], threshold=1e4) == ("log", 0.0)  # the threshold counts
    fig = plots.histogram_figure("maha", maha, {"far": maha * 3}, threshold=900.0)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and "log x axis" in ax.get_xlabel()
    edges = sorted({round(float(p.get_x()), 6) for p in ax.patches if p.get_width() > 0})
    assert np.allclose(np.diff(np.log(edges[:5])), np.log(edges[1] / edges[0]), rtol=1e-4)  # equal on log
    fig = plots.histogram_figure("energy", signed, {}, threshold=1.0)
    assert fig.axes[0].get_xscale() == "symlog" and "symlog x axis" in fig.axes[0].get_xlabel()
    assert plots.histogram_figure("e", rng.normal(size=50), {}, 0.5).axes[0].get_xscale() == "linear"


def test_a_failing_figure_is_an_issue_and_the_others_are_written(tmp_path, per_set, metrics, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no ink")

    monkeypatch.setattr(plots, "roc_figure", broken)
    written = plots.write_visual_report(tmp_path, metrics, per_set)  # no images: grey panels
    assert not (tmp_path / "plots" / "roc_near.png").exists()
    assert (tmp_path / "plots" / "hist_energy.png").is_file() and (tmp_path / "plots" / "examples_maha.png").is_file()
    failed = [m for m in metrics["issues"] if "no ink" in m]
    assert len(failed) == 2 and all(m.startswith("plots: plots/roc_") for m in failed)
    html = (tmp_path / "report.html").read_text()
    assert len(_parse(html).sources) == len(written) == 4 and "no ink" in html


def test_unreadable_example_images_are_reported(tmp_path, per_set, metrics):
    missing = {i: tmp_path / f"absent{i}.png" for i in range(4)}
    plots.write_visual_report(tmp_path, metrics, per_set, image_paths=lambda name: missing)
    assert (tmp_path / "plots" / "examples_energy.png").is_file()
    assert any("absent" in m and "not found" in m for m in metrics["issues"])


def test_verdict_counts_accept_counts_verdict_keys_and_rates():
    assert plots.verdict_counts({"counts": {"certified_ood": 3, "undecided": 1}}) == \
        {"certified_ood": 3, "undecided": 1}
    assert plots.verdict_counts({"certified_id": 4, "certified_ood": 1, "n_boxes": 5}) == \
        {"certified_ood": 1, "certified_id": 4}
    assert plots.verdict_counts({"certified_rate": 0.5, "undecided_rate": 0.5, "n_boxes": 10}) == \
        {"certified": 5, "undecided": 5}
    assert plots.verdict_counts({"n_boxes": 3}) is None and plots.verdict_counts("x") is None


def test_markdown_references_the_figures(per_set, metrics, tmp_path):
    from certood.report import report_markdown

    plots.write_visual_report(tmp_path, metrics, per_set)
    text = report_markdown(metrics)
    for p in metrics["plots"]:
        assert f"]({p['file']})" in text and (tmp_path / p["file"]).is_file()


def test_a_gt_matched_sets_roc_is_drawn_within_the_set(per_set, metrics, monkeypatch):
    """A set carrying ``id_values`` (gt_matched: its own ID-matched boxes) is drawn against
    them, as its AUROC is computed; a box-protocol set against the ID test boxes."""
    mixed = dict(per_set["ood/far"])
    mixed["id_values"] = {k: v[:7] - 5.0 for k, v in per_set["id_test"]["values"].items()}
    per_set["ood/mixed"] = mixed
    drawn = {}
    monkeypatch.setattr(plots, "roc_figure", lambda s, i, o, a: drawn.setdefault(s, i))
    jobs = plots._figure_jobs(metrics, per_set, None, [])
    for plot, make in jobs:
        if plot.file.startswith("plots/roc_"):
            make()
    titles = {plot.file: plot.title for plot, _ in jobs}
    assert titles["plots/roc_mixed.png"] == "ROC: ID-matched vs OOD-matched boxes of mixed"
    assert titles["plots/roc_near.png"] == "ROC: ID test vs OOD near"
    assert torch.equal(drawn["mixed"]["energy"], mixed["id_values"]["energy"])
    assert torch.equal(drawn["near"]["energy"], per_set["id_test"]["values"]["energy"])


def test_figures_are_capped_and_what_is_left_out_is_named(tmp_path, monkeypatch):
    """10,000 scores drew 10,000 histograms (a check ran for hours): at most MAX_HISTOGRAMS
    histograms, MAX_ROC_FIGURES ROC figures of at most MAX_ROC_CURVES curves are drawn."""
    g = torch.Generator().manual_seed(1)
    n_scores, n_sets = 40, 20
    names = [f"s{i}" for i in range(n_scores)]
    per_set = {}
    for i, name in enumerate(["id_test"] + [f"ood/o{j}" for j in range(n_sets)]):
        values = {k: torch.randn(10, generator=g) for k in names}
        per_set[name] = {"dets": _dets(name, 2, 5, i), "values": values, "flags": values["s0"] > 1.0}
    metrics = {"monitor": {"thresholds": {k: 1.0 for k in names}}, "issues": []}
    drawn = {"roc": [], "hist": []}
    monkeypatch.setattr(plots, "roc_figure", lambda s, i, o, a: drawn["roc"].append((s, list(i))))
    monkeypatch.setattr(plots, "histogram_figure", lambda n, i, o, t: drawn["hist"].append(n))
    monkeypatch.setattr(plots, "examples_figure", lambda panels: drawn.setdefault("examples", []).append(panels))
    for _, make in plots._figure_jobs(metrics, per_set, None, metrics["issues"]):
        make()
    assert drawn["hist"] == names[:plots.MAX_HISTOGRAMS]
    assert [s for s, _ in drawn["roc"]] == [f"o{j}" for j in range(plots.MAX_ROC_FIGURES)]
    assert all(curves == names[:plots.MAX_ROC_CURVES] for _, curves in drawn["roc"])
    assert metrics["issues"] == [
        f"plots: ROC figures (OOD sets) drawn for the first 16 of {n_sets}; not drawn: o16, o17, o18, o19",
        f"plots: ROC curves (scores) drawn for the first 16 of {n_scores}; not drawn: s16, s17, s18, s19, s20 "
        f"and 19 more",
        f"plots: score histograms drawn for the first 16 of {n_scores}; not drawn: s16, s17, s18, s19, s20 "
        f"and 19 more",
        f"plots: example grids (scores) drawn for the first 8 of {n_scores}; not drawn: s8, s9, s10, s11, s12 "
        f"and 27 more",
    ]
    assert len(drawn["examples"]) == plots.MAX_EXAMPLE_GRIDS


def test_plot_helpers_doctests():
    import doctest

    assert doctest.testmod(plots).failed == 0
