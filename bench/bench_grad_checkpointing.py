"""Peak memory and step time of a full-size Vec2Face training step with and without gradient checkpointing.

    python bench/bench_grad_checkpointing.py --batch-size 2 --rounds 2
    python bench/bench_grad_checkpointing.py --device cuda --batch-size 16

Each measurement runs in a fresh subprocess (peak figures cannot be reset within one process on
CPU), variants interleaved round after round so machine noise hits both alike. A step is what
``recipes/train_vec2face.py`` differentiates through the generator: forward with training masks,
image + token losses, backward (random weights, train mode, dropout on).

Memory: on CUDA ``torch.cuda.max_memory_allocated`` during the steps; on CPU the process's peak
resident set (``getrusage``) minus its resident set just before the first step, when the model and
zero-filled gradients already exist, i.e. what the step itself adds (activations, temporaries).
Prints per variant the smallest peak and step time over rounds and the ratios to ``plain``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("plain", "checkpointing")


def _resident_bytes() -> int:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(variant: str, batch_size: int, device: str, steps: int) -> dict:
    """One child process: build the model, run ``steps`` training steps, report peak memory and time."""
    import torch

    from vec2face_model.models.generator import TRAINING_MASK_RATIO, Vec2Face, draw_token_masks

    torch.manual_seed(0)
    model = Vec2Face().to(device).train()
    if variant == "checkpointing":
        model.enable_gradient_checkpointing()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    vectors = torch.randn(batch_size, 512, device=device) * 20
    drop, masked = draw_token_masks(batch_size, TRAINING_MASK_RATIO, torch.Generator().manual_seed(1), device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _resident_bytes()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        out = model(vectors, token_drop_mask=drop, token_all_mask=masked)
        loss = out.images.square().mean() + (out.tokens - out.gt_tokens).square().mean()
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        del out, loss
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    return {"variant": variant, "step_peak_bytes": peak - base, "total_peak_bytes": peak, "step_seconds": min(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="training steps per process (time: the fastest)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.batch_size, args.device, args.steps)))
        return

    import torch

    from common import describe_machine

    print(f"machine: {describe_machine()}; device {args.device}; full-size generator, batch {args.batch_size}")
    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for round_index in range(args.rounds):
        for variant in VARIANTS:
            command = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--batch-size", str(args.batch_size),
                       "--device", args.device, "--steps", str(args.steps)]
            line = subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            results[variant].append(json.loads(line))
            r = results[variant][-1]
            print(f"round {round_index} {variant:>13}: step adds {r['step_peak_bytes'] / 2**20:8.0f} MiB "
                  f"(process peak {r['total_peak_bytes'] / 2**20:6.0f} MiB), step {r['step_seconds']:.2f} s", flush=True)
    best = {v: {k: min(r[k] for r in rs) for k in ("step_peak_bytes", "total_peak_bytes", "step_seconds")} for v, rs in results.items()}
    plain, ckpt = best["plain"], best["checkpointing"]
    print(f"\nbest of {args.rounds} (torch {torch.__version__}):")
    for v in VARIANTS:
        b = best[v]
        print(f"  {v:>13}: step adds {b['step_peak_bytes'] / 2**20:.0f} MiB, process peak {b['total_peak_bytes'] / 2**20:.0f} MiB, "
              f"step {b['step_seconds']:.2f} s")
    print(f"  checkpointing / plain: step memory x{ckpt['step_peak_bytes'] / plain['step_peak_bytes']:.3f}, "
          f"process peak x{ckpt['total_peak_bytes'] / plain['total_peak_bytes']:.3f}, step time x{ckpt['step_seconds'] / plain['step_seconds']:.2f}")


if __name__ == "__main__":
    main()
