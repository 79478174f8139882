"""Throughput of the FR training recipe on synthetic data (not a test).

Two numbers:

* data loading, images/s per core: JPEG decode + the recipe's augmentation (flip, RandAugment,
  random erasing), one process, one thread — what each DataLoader worker delivers;
* training, images/s: backbone forward/backward + ArcFace head + SGD step on random tensors (no data
  loading), one process, fp16 autocast on GPU, float32 on CPU.

Usage::

    python bench/bench_train_fr.py                                   # CPU defaults (small, quick)
    python bench/bench_train_fr.py --backbone se_iresnet50 --batch-size 128 --classes 10000 --steps 30
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run by path from any directory: import this checkout's recipes package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _jpeg_cells(count: int, seed: int = 0) -> list[dict]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    cells = []
    for _ in range(count):
        # Smooth content compresses like a face crop; pure noise would make decoding unrealistically slow.
        pixels = np.kron(rng.integers(0, 256, (14, 14, 3)), np.ones((8, 8, 1))).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
        cells.append({"bytes": buffer.getvalue(), "path": None})
    return cells


def bench_data(images: int) -> dict:
    from recipes.fr_data import FaceAugment, decode_face

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one loader worker = one core
    cells = _jpeg_cells(64)
    stages = {
        "decode": None,
        "decode+flip": FaceAugment(hflip=True, randaugment_ops=0, erasing_prob=0),
        "decode+flip+randaugment": FaceAugment(hflip=True, randaugment_ops=2, erasing_prob=0),
        "decode+flip+randaugment+erasing (recipe)": FaceAugment(),
    }
    results = {}
    for name, augment in stages.items():
        start = time.perf_counter()
        for i in range(images):
            image = decode_face(cells[i % len(cells)])
            if augment is not None:
                augment(image, seed=i)
        results[name] = images / (time.perf_counter() - start)
    torch.set_num_threads(threads)
    return results


def bench_train(backbone_name: str, batch_size: int, classes: int, steps: int, warmup: int, kwargs: dict) -> dict:
    from recipes.backbones import build_backbone
    from recipes.margin_head import ShardedMarginHead
    from recipes.train_fr import parameter_groups

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    backbone = build_backbone(backbone_name, 512, kwargs).to(device).train()
    head = ShardedMarginHead(512, classes).to(device)
    optimizer = torch.optim.SGD(parameter_groups(backbone, head, 5e-4), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler(enabled=device.type == "cuda")
    images = torch.rand(batch_size, 3, 112, 112, device=device) * 2 - 1
    labels = torch.randint(0, classes, (batch_size,), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            embeddings = backbone(images)
        loss = head(embeddings, labels).loss
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(backbone.parameters(), 5.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {"device": str(device), "threads": torch.get_num_threads(), "backbone": backbone_name, "batch_size": batch_size,
            "classes": classes, "images_per_s": steps * batch_size / elapsed, "s_per_step": elapsed / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-images", type=int, default=500)
    parser.add_argument("--backbone", default="iresnet18")
    parser.add_argument("--backbone-kwargs", default="{}", help='JSON, e.g. \'{"layers": [1, 1, 1, 1]}\'')
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    data = bench_data(args.data_images)
    for name, rate in data.items():
        print(f"data  {name:45s} {rate:8.1f} images/s per core")
    train = bench_train(args.backbone, args.batch_size, args.classes, args.steps, args.warmup, json.loads(args.backbone_kwargs))
    print(f"train {train['backbone']} batch {train['batch_size']} on {train['device']} ({train['threads']} threads): "
          f"{train['images_per_s']:.1f} images/s ({train['s_per_step']:.2f} s/step)")


if __name__ == "__main__":
    main()
