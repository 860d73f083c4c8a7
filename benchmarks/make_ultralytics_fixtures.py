"""Export small random-init ultralytics detectors to ONNX, as test fixtures of the ONNX layouts.

Ultralytics is AGPL-3.0: certood never imports it. This script installs it into a venv of its
own (never certood's ``.venv``), builds the models from their yaml files with random weights
(no download, no training: the graphs are what matter to the ``yolo`` and ``rtdetr`` layouts),
exports each with ``model.export(format="onnx")`` at ultralytics' defaults (the TorchScript
exporter, opset chosen by ultralytics, onnxslim simplification when installed), and writes

    tests/data/ultralytics/yolov8n.onnx   YOLO('yolov8n.yaml'), nc 5, imgsz 64
    tests/data/ultralytics/yolo11n.onnx   YOLO('yolo11n.yaml'), nc 5, imgsz 64
    tests/data/ultralytics/rtdetr-tiny.onnx  RTDETR(RTDETR_TINY), nc 5, imgsz 160
    tests/data/ultralytics/fixtures.json  versions, command, per-file sha256, size, shapes

``nc 5``: DigitsDet's five ID classes, so the fixtures run on the bundled data. RT-DETR-l
(32M parameters, about 130 MB in float32 whatever the image size) is far over the size a test
fixture may have, and ultralytics ships no smaller RT-DETR config (l, x, resnet50, resnet101),
so ``RTDETR_TINY`` below keeps the RT-DETR head (``RTDETRDecoder``: 300 queries, the same
``[1, 300, 4 + nc]`` output) on a small convolutional backbone. Its image size is 160 because
the decoder selects its 300 queries among the encoder's anchors (64 px gives only 84).

    .venv/bin/python benchmarks/make_ultralytics_fixtures.py [--venv DIR] [--out DIR]

Creating the venv (``pip install torch==2.14.1 torchvision==0.29.1 ultralytics onnx
onnxruntime onnxslim``) takes minutes on first use; later runs reuse it. Offline settings
follow /work/shared/FACTS.md: ``YOLO_OFFLINE=1``, ``YOLO_AUTOINSTALL=False``, a local TTF as
``Arial.ttf`` in the config dir.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VENV = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "certood" / "ultralytics-venv"
REQUIREMENTS = ["torch==2.14.1", "torchvision==0.29.1", "ultralytics", "onnx", "onnxruntime", "onnxslim"]
NUM_CLASSES = 5
SEED = 0
MAX_FILE_BYTES = 15_000_000  # per committed file
MAX_TOTAL_BYTES = 30_000_000  # all of them

# A small RT-DETR: yolov8n-sized backbone, the hybrid encoder reduced to one AIFI layer, and
# RT-DETR's decoder (hidden 64, 300 queries, 4 heads, 2 layers) producing the stock output.
RTDETR_TINY = f"""
nc: {NUM_CLASSES}
backbone:
  - [-1, 1, Conv, [16, 3, 2]]    # 0-P1/2
  - [-1, 1, Conv, [32, 3, 2]]    # 1-P2/4
  - [-1, 1, C2f, [32, True]]
  - [-1, 1, Conv, [64, 3, 2]]    # 3-P3/8
  - [-1, 1, C2f, [64, True]]
  - [-1, 1, Conv, [64, 3, 2]]    # 5-P4/16
  - [-1, 1, C2f, [64, True]]
  - [-1, 1, Conv, [64, 3, 2]]    # 7-P5/32
  - [-1, 1, C2f, [64, True]]
head:
  - [-1, 1, Conv, [64, 1, 1, None, 1, 1, False]]  # 9
  - [-1, 1, AIFI, [128, 4]]                       # 10
  - [-1, 1, Conv, [64, 1, 1]]                     # 11
  - [[4, 6, 11], 1, RTDETRDecoder, [nc, 64, 300, 4, 4, 2, 128]]
"""

MODELS = [  # name, ultralytics class, config (package yaml name or text), imgsz
    ("yolov8n", "YOLO", "yolov8n.yaml", 64),
    ("yolo11n", "YOLO", "yolo11n.yaml", 64),
    ("rtdetr-tiny", "RTDETR", RTDETR_TINY, 160),
]

# Runs inside the ultralytics venv; reads a JSON job from argv[1], prints a JSON record.
EXPORT = r'''
import json, sys, warnings
from pathlib import Path
job = json.loads(Path(sys.argv[1]).read_text())
import torch, ultralytics, onnx, onnxruntime
from ultralytics import RTDETR, YOLO
from ultralytics.utils.checks import check_yaml
warnings.simplefilter("ignore")
try:
    import onnxslim
    slim = onnxslim.__version__
except ImportError:
    slim = None
records = {}
work = Path(job["work"])
for name, cls, config, imgsz in job["models"]:
    if config.endswith(".yaml"):  # the package yaml, with the class count set
        text = Path(check_yaml(config.replace("n.yaml", ".yaml"))).read_text()
        text = text.replace("nc: 80", f"nc: {job['nc']}", 1)
    else:
        text = config
    path = work / f"{name}.yaml"  # the file name carries the scale ('n') ultralytics reads
    path.write_text(text)
    torch.manual_seed(job["seed"])
    model = {"YOLO": YOLO, "RTDETR": RTDETR}[cls](str(path))
    out = model.export(format="onnx", imgsz=imgsz, device="cpu")
    graph = onnx.load(out)
    shapes = lambda vs: {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim] for v in vs}
    records[name] = {"config": config if config.endswith(".yaml") else f"{name}.yaml (see RTDETR_TINY)",
                     "class": cls, "imgsz": imgsz, "nc": job["nc"], "seed": job["seed"],
                     "parameters": sum(p.numel() for p in model.model.parameters()),
                     "opset": max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")),
                     "inputs": shapes(graph.graph.input), "outputs": shapes(graph.graph.output),
                     "file": str(Path(out).resolve())}
print(json.dumps({"versions": {"ultralytics": ultralytics.__version__, "torch": torch.__version__,
                               "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                               "onnxslim": slim, "python": sys.version.split()[0]},
                  "models": records}))
'''


def ensure_venv(venv: Path) -> Path:
    """The venv's python, creating the venv and installing ultralytics there if needed."""
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", "import ultralytics, onnx, onnxruntime"],
                                          capture_output=True).returncode == 0:
        return python
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", *REQUIREMENTS], check=True)
    return python


def offline_env(config_dir: Path) -> dict:
    """Environment for ultralytics with no network: offline, no auto-install, a local font."""
    import matplotlib

    font_dir = config_dir / "Ultralytics"
    font_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf", font_dir / "Arial.ttf")
    return {**os.environ, "YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "False", "YOLO_CONFIG_DIR": str(config_dir),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}


def file_sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="venv for ultralytics (created if absent)")
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "data" / "ultralytics")
    args = parser.parse_args(argv)
    python = ensure_venv(args.venv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="certood-ultralytics-") as tmp:
        work = Path(tmp)
        job = work / "job.json"
        job.write_text(json.dumps({"work": str(work), "nc": NUM_CLASSES, "seed": SEED, "models": MODELS}))
        (work / "export.py").write_text(EXPORT)
        done = subprocess.run([str(python), str(work / "export.py"), str(job)], cwd=work, env=offline_env(work / "cfg"),
                              capture_output=True, text=True)
        if done.returncode != 0:
            sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
            return 3
        record = json.loads(done.stdout.strip().splitlines()[-1])
        total = 0
        for name, entry in record["models"].items():
            target = args.out / f"{name}.onnx"
            shutil.copy(entry.pop("file"), target)
            size = target.stat().st_size
            total += size
            if size > MAX_FILE_BYTES:
                raise SystemExit(f"{target}: {size} bytes, over the {MAX_FILE_BYTES} a fixture may have")
            entry.update({"bytes": size, "sha256": file_sha256(target)})
        if total > MAX_TOTAL_BYTES:
            raise SystemExit(f"fixtures: {total} bytes in all, over {MAX_TOTAL_BYTES}")
    record["command"] = "python benchmarks/make_ultralytics_fixtures.py"
    record["export_call"] = "model.export(format='onnx', imgsz=IMGSZ, device='cpu') (ultralytics defaults otherwise)"
    record["requirements"] = REQUIREMENTS
    record["rtdetr_tiny_yaml"] = RTDETR_TINY.strip()
    (args.out / "fixtures.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    print(json.dumps({name: {k: e[k] for k in ("bytes", "outputs")} for name, e in record["models"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
