"""benchmarks/ood_table.py on tiny COCO files shaped like the public detection-OOD benchmark
(VOC in COCO format as ID, COCO and OpenImages OOD subsets), with a random-init detector
saved as a .pth state dict: the public code path runs end to end."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from certood.detectors.torchvision_frcnn import digits_fasterrcnn
from certood.scores import SCORE_CLASSES

REPO = Path(__file__).resolve().parent.parent
VOC = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
       "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]


def _load_table_module():
    spec = importlib.util.spec_from_file_location("ood_table", REPO / "benchmarks" / "ood_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _coco_set(root: Path, name: str, n: int, categories: list[dict], object_cats: list[int], seed: int) -> tuple:
    """n RGB 64x64 images, each with 1-2 large bright blobs labelled from ``object_cats``."""
    rng = np.random.default_rng(seed)
    (root / name).mkdir(parents=True)
    images, anns = [], []
    for i in range(1, n + 1):
        img = rng.integers(0, 40, (64, 64, 3)).astype(np.uint8)
        for k in range(int(rng.integers(1, 3))):
            x0, y0 = int(rng.integers(0, 16)) + 24 * k, int(rng.integers(0, 16))
            w, h = int(rng.integers(24, 40)), int(rng.integers(24, 44))
            w, h = min(w, 64 - x0), min(h, 64 - y0)
            img[y0:y0 + h, x0:x0 + w] = rng.integers(150, 255, 3)
            anns.append({"id": len(anns) + 1, "image_id": 1000 + i, "category_id": int(rng.choice(object_cats)),
                         "bbox": [x0, y0, w, h], "area": w * h, "iscrowd": 0})
        Image.fromarray(img).save(root / name / f"{i:04d}.jpg")
        images.append({"id": 1000 + i, "file_name": f"{i:04d}.jpg", "width": 64, "height": 64})
    ann = root / f"{name}.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    return ann, root / name


@pytest.fixture(scope="module")
def public_like(tmp_path_factory):
    root = tmp_path_factory.mktemp("public")
    voc = [{"id": i + 1, "name": n} for i, n in enumerate(VOC)]
    coco_ood = [{"id": 100 + i, "name": n} for i, n in enumerate(["giraffe", "zebra", "kite"])]
    sets = {
        "fit": _coco_set(root, "voc_train", 24, voc, list(range(1, 21)), 0),
        "id": _coco_set(root, "voc_test", 6, voc, list(range(1, 21)), 1),
        "coco": _coco_set(root, "coco_ood", 5, coco_ood, [100, 101, 102], 2),
        "openimages": _coco_set(root, "openimages_ood", 5, coco_ood, [100, 101], 3),
        "mixedset": _coco_set(root, "mixed", 5, voc + coco_ood, [1, 5, 100, 101], 4),
    }
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = digits_fasterrcnn(num_classes=21)
    weights = root / "ckpt.pth"
    torch.save(model.state_dict(), weights)
    return root, sets, weights


def test_public_benchmark_code_path_runs(public_like, tmp_path):
    root, sets, weights = public_like
    table = _load_table_module()
    out = tmp_path / "voc_table"
    argv = ["--fit-annotations", str(sets["fit"][0]), "--fit-images", str(sets["fit"][1]),
            "--id-annotations", str(sets["id"][0]), "--id-images", str(sets["id"][1]),
            "--ood", f"coco={sets['coco'][0]}:{sets['coco'][1]}",
            "--ood", f"openimages={sets['openimages'][0]}:{sets['openimages'][1]}",
            "--ood", f"mixedset={sets['mixedset'][0]}:{sets['mixedset'][1]}", "--gt-matched", "mixedset",
            "--arch", "digits_fasterrcnn", "--weights", str(weights), "--num-classes", "21",
            "--min-size", "64", "--max-size", "64", "--score-thresh", "0.0", "--detector-score", "0.0",
            "--n-boot", "20", "--timing-repeats", "1", "--threads", "1", "--residual-dim", "8",
            "--out", str(out)]
    assert table.main(argv) == 0
    record = json.loads(out.with_suffix(".json").read_text())
    markdown = out.with_suffix(".md").read_text()
    assert record["command"].endswith(" ".join(argv))
    assert record["command"] in markdown
    rows = set(SCORE_CLASSES) | set(table.VARIANTS)
    assert set(record["scores"]) == rows
    assert record["sets"]["mixedset"]["protocol"] == "gt_matched" and record["sets"]["coco"]["protocol"] == "box"
    assert set(record["sets"]["mixedset"]["counts"]) == {"id_matched", "ood_matched", "unmatched"}
    for name in ("coco", "openimages"):
        per_score = record["results"][name]
        assert set(per_score) == rows
        for m in per_score.values():
            for metric in ("auroc", "aupr_in", "fpr95"):
                lo, hi = m[f"{metric}_ci"]
                assert 0 <= lo <= hi <= 1 and np.isfinite(m[metric])
        assert f"## {name} (box:" in markdown
    cost = record["cost"]
    assert set(cost["multi_pass"]) == {"odin", "gradnorm", "mc_dropout", "jitter_kl", "fusion"}
    assert cost["single_pass_sum_ratio"] == pytest.approx(sum(cost["ratio"][k] for k in cost["single_pass_scores"]))
    assert "pvalue_fusion" in cost["single_pass_scores"] and "odin" not in cost["single_pass_scores"]
    assert record["scores"]["particul"]["params"]["channels"] == 64  # read off the detector
    assert set(record["fusion"]["coco"]) == {"auroc", "fpr95", "components"}
    assert record["scores"][record["fusion"]["coco"]["auroc"]["best_other"]]["kind"] not in table.OWN_KINDS
    assert set(record["worst_set"]) == rows and "## Every score ranked by its worst OOD set" in markdown


def test_public_benchmark_needs_fit_data(public_like):
    _, sets, weights = public_like
    table = _load_table_module()
    with pytest.raises(SystemExit, match="--fit-annotations/--fit-images"):
        table.main(["--id-annotations", str(sets["id"][0]), "--id-images", str(sets["id"][1]),
                    "--ood", f"coco={sets['coco'][0]}:{sets['coco'][1]}", "--weights", str(weights)])
    with pytest.raises(SystemExit, match="NAME=ANNOTATIONS:IMAGES"):
        table.main(["--fit-annotations", str(sets["fit"][0]), "--fit-images", str(sets["fit"][1]),
                    "--id-annotations", str(sets["id"][0]), "--id-images", str(sets["id"][1]),
                    "--ood", "coco", "--weights", str(weights)])


def test_costs_charge_the_jitter_passes_to_jitter_kl_and_a_fusion_its_components():
    table = _load_table_module()
    table.FUSION_OF = ["energy", "residual", "jitter_kl"]  # a fusion that reads the jitter tap
    part = {"dets": [0] * 10, "n_images": 4, "detector_seconds": 2.0, "optional_seconds": 0.2,
            "score_seconds": {"energy": 0.01, "residual": 0.03, "jitter_kl": 0.005, "fusion": 0.002, "odin": 0.5}}
    c = table.costs({"a": part})
    assert c["detector_seconds"] == 2.0  # the forward pass alone: the jitter passes are not in it
    assert c["ratio"]["jitter_kl"] == pytest.approx(0.205 / 2.0)
    assert c["ratio"]["fusion"] == pytest.approx((0.002 + 0.01 + 0.03 + 0.205) / 2.0)
    assert set(c["single_pass_scores"]) == {"energy", "residual"}


def test_digitsdet_mode_adds_the_users_ood_sets_to_near_far_mixed(tmp_path):
    table = _load_table_module()
    args = table.parse_args(["--ood", f"textures={tmp_path / 'tex.json'}:{tmp_path / 'tex'}",
                             "--ood", f"glyphs={tmp_path / 'g.json'}:{tmp_path / 'g'}", "--gt-matched", "glyphs"])
    ood = table.data_block(args)["ood"]
    assert list(ood) == ["near", "far", "mixed", "textures", "glyphs"]
    assert ood["near"] == {"digitsdet": "ood-near"} and ood["mixed"]["protocol"] == "gt_matched"
    assert ood["textures"] == {"annotations": str((tmp_path / "tex.json").resolve()),
                               "images": str((tmp_path / "tex").resolve())}
    assert ood["glyphs"]["protocol"] == "gt_matched"
    with pytest.raises(SystemExit, match="DigitsDet's own sets"):
        table.data_block(table.parse_args(["--ood", f"near={tmp_path / 'n.json'}:{tmp_path}"]))
    with pytest.raises(SystemExit, match="given twice"):
        table.data_block(table.parse_args(["--ood", f"a={tmp_path / 'n.json'}:{tmp_path}",
                                           "--ood", f"a={tmp_path / 'm.json'}:{tmp_path}"]))
    with pytest.raises(SystemExit, match="--gt-matched"):
        table.data_block(table.parse_args(["--gt-matched", "textures"]))


def test_worst_set_ranks_scores_by_their_minimum_auroc_over_the_sets():
    table = _load_table_module()
    results = {"near": {"a": {"auroc": 0.90}, "b": {"auroc": 0.80}, "c": {"auroc": 0.99}},
               "far": {"a": {"auroc": 0.70}, "b": {"auroc": 0.85}, "c": {"auroc": 0.60}},
               "tex": {"a": {"auroc": 0.95}, "b": {"auroc": 0.81}, "c": {"auroc": 0.99}}}
    worst = table.worst_set(results)
    assert [k for k in sorted(worst, key=lambda k: worst[k]["rank"])] == ["b", "a", "c"]
    assert worst["b"] == {"worst": 0.80, "worst_set": "near", "rank": 1}
    assert worst["c"]["worst_set"] == "far"


def test_the_fusion_is_compared_with_the_best_published_score_not_certoods_own():
    """jitter_kl and residual (certood's own) beat every published score here; the comparison
    must still pick the best published one (energy), and list the components apart."""
    table = _load_table_module()
    rng = np.random.default_rng(0)
    id_base, ood_base = rng.normal(0, 1, 200), rng.normal(1, 1, 150)
    values = {"fusion": (id_base, ood_base + 1.0), "jitter_kl": (id_base, ood_base + 0.8),
              "residual": (id_base, ood_base + 0.6), "energy": (id_base, ood_base + 0.2),
              "vim": (id_base, ood_base - 0.3)}
    id_g, ood_g = np.arange(200) // 2, 1000 + np.arange(150) // 2

    def get(score):
        i, o = values[score]
        return i, o, id_g, ood_g

    results = {"tex": {k: table.ci_entry(i, o, id_g, ood_g, 50) for k, (i, o) in values.items()}}
    kinds = {k: k for k in values}
    out = table.compare_fusion(results, {"tex": get}, 50, kinds)["tex"]
    assert out["auroc"]["best_other"] == "energy" and out["fpr95"]["best_other"] == "energy"
    assert out["auroc"]["paired_better"] and out["auroc"]["paired_diff_ci"][0] > 0
    assert set(out["components"]) == set(table.FUSION_OF) & set(values)
    assert not table.is_published("jitter_kl", kinds) and table.is_published("energy", kinds)
    verdict = table.fusion_verdict({"tex": out}, table.worst_set(results))
    assert verdict["paired_auroc_every_set"] and verdict["worst_set_rank"] == 1
