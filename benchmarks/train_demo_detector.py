"""Train the bundled demo detector (digits_fasterrcnn) on DigitsDet train, on CPU.

    .venv/bin/python benchmarks/train_demo_detector.py            # ~30-40 min on 2 cores

Writes ``certood/assets/digits_fasterrcnn.safetensors`` and
``certood/assets/digits_fasterrcnn.json`` (command, seed, schedule, timings and the
pycocotools mAP on DigitsDet test). Deterministic given the seed up to thread scheduling.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from certood.data.coco import CocoDataset
from certood.data.digitsdet import ensure_digitsdet, split_paths
from certood.detectors.torchvision_frcnn import ASSETS, TorchvisionFasterRCNN, digits_fasterrcnn, file_sha256


def targets_for(record, category_to_label: dict[int, int]) -> dict[str, torch.Tensor]:
    labels = torch.tensor([category_to_label[int(c)] for c in record.gt_categories], dtype=torch.long)
    return {"boxes": record.gt_boxes, "labels": labels}


def evaluate(detector: TorchvisionFasterRCNN, dataset: CocoDataset, label_to_category: dict[int, int]) -> dict:
    from certood.metrics import coco_map  # imported late: training does not need it

    detections = []
    start = time.perf_counter()
    for record, image in dataset.iter_images():
        [d] = detector.detect([image])
        for box, score, label in zip(d.boxes.tolist(), d.scores.tolist(), d.labels.tolist()):
            detections.append({"image_id": record.image_id, "category_id": label_to_category[label],
                               "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "score": score})
    per_image = (time.perf_counter() - start) / max(1, len(dataset.records))
    return {**coco_map(dataset.coco, detections), "seconds_per_image": round(per_image, 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ASSETS / "digits_fasterrcnn.safetensors")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    root = ensure_digitsdet()
    train = CocoDataset.load(*split_paths(root, "train"))
    test = CocoDataset.load(*split_paths(root, "test"))
    category_to_label = {c: i + 1 for i, c in enumerate(train.category_ids)}
    label_to_category = {v: k for k, v in category_to_label.items()}
    samples = [(image, targets_for(record, category_to_label)) for record, image in train.iter_images()]

    # Training-only sampling sizes (the weights are the same shape): a canvas holds at most
    # four objects, so 128 sampled RoIs and 600 proposals per image keep plenty of positives
    # at about half the cost per step of torchvision's defaults (512 and 2000).
    model = digits_fasterrcnn(num_classes=len(category_to_label) + 1, box_batch_size_per_image=128,
                              rpn_pre_nms_top_n_train=1000, rpn_post_nms_top_n_train=600)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=1e-4)
    steps_per_epoch = len(samples) // args.batch_size
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch, pct_start=0.15)
    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    history = []
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(samples), generator=generator).tolist()
        running = 0.0
        for step in range(steps_per_epoch):
            batch = [samples[i] for i in order[step * args.batch_size:(step + 1) * args.batch_size]]
            losses = model([b[0] for b in batch], [b[1] for b in batch])
            loss = sum(losses.values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            running += float(loss.detach())
            if step % 50 == 0:
                print(f"epoch {epoch} step {step}/{steps_per_epoch} loss {float(loss):.3f} "
                      f"{time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)
        history.append(round(running / steps_per_epoch, 4))
    train_seconds = time.perf_counter() - start

    model.eval()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(args.out))
    detector = TorchvisionFasterRCNN(model)
    metrics = evaluate(detector, test, label_to_category)
    record = {
        "command": "python benchmarks/train_demo_detector.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seed": args.seed, "epochs": args.epochs, "batch_size": args.batch_size, "max_lr": args.lr,
        "train_images": len(samples), "train_seconds": round(train_seconds, 1),
        "epoch_mean_loss": history, "test": metrics,
        "parameters": sum(p.numel() for p in model.parameters()),
        "sha256": file_sha256(args.out),
        "torch": torch.__version__, "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
    }
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
