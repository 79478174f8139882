"""Decode throughput of the full-size Vec2Face generator (random weights) against the GEMM peak.

    python bench/bench_decode.py --batch-sizes 1 8 32
    python bench/bench_decode.py --batch-sizes 8 --variants fp32 fp32+reuse fp32+reuse+compile

Variants (each timed in turn, round after round, so that machine noise hits all of them alike):

* ``fp32``: plain inference (``torch.inference_mode``), glibc's default allocator settings;
* ``fp32+reuse``: the same with ``vec2face_model.performance.reuse_freed_memory()`` (bit-identical);
* ``fp32+reuse+compile``: ``torch.compile`` of the generator (pixels differ by rounding);
* ``bf16``: CPU/GPU autocast with float32 attention logits (skipped where bf16 GEMMs are slower).

Prints images/s (median over rounds), achieved GFLOP/s (49.22 GFLOP per image with the inference
masks, from the manifest's FLOP count) as a fraction of the best fp32 GEMM rate measured during the
run, speed ratios to ``fp32`` and the largest pixel difference to ``fp32``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import describe_machine, gemm_peak_gflops, timed
from vec2face_model.models.generator import Vec2Face
from vec2face_model.performance import reuse_freed_memory

GFLOP_PER_IMAGE = 49.22  # shared/reference/manifests/README.md (inference mask settings)
VARIANTS = ("fp32", "fp32+reuse", "fp32+reuse+compile", "bf16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=5, help="timed runs per variant (interleaved)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS,
                        help="default: fp32 and fp32+reuse on CPU, fp32 and compile on GPU, plus bf16 where its GEMM is faster")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = Vec2Face().eval().to(args.device)
    print(f"machine: {describe_machine()}")
    peaks = [gemm_peak_gflops(torch.float32, device=args.device)]
    bf16_peak = gemm_peak_gflops(torch.bfloat16, size=512 if args.device == "cpu" else 4096, device=args.device)
    print(f"GEMM: fp32 {peaks[0]:.1f} GFLOP/s, bf16 {bf16_peak:.1f} GFLOP/s", flush=True)
    variants = args.variants or (["fp32", "fp32+reuse"] if args.device == "cpu" else ["fp32", "fp32+reuse+compile"])
    if args.variants is None and bf16_peak > peaks[0]:
        variants.append("bf16")
    elif "bf16" not in variants:
        print(f"bf16 GEMM runs at {bf16_peak / peaks[0]:.2f}x fp32 here (no native bf16 kernels): bf16 decode skipped")
    compiled = torch.compile(model) if any("compile" in v for v in variants) else None

    for batch in args.batch_sizes:
        vectors = torch.randn(batch, 512, device=args.device) * 1.1
        drop, masked = model.draw_masks(batch, torch.Generator().manual_seed(1))

        def run(variant: str) -> torch.Tensor:
            reuse_freed_memory("reuse" in variant)
            net = compiled if "compile" in variant else model
            with torch.inference_mode(), torch.autocast(args.device, dtype=torch.bfloat16, enabled=variant == "bf16"):
                return net(vectors, token_drop_mask=drop, token_all_mask=masked).images.float()

        images = {}
        for variant in variants:
            start = time.perf_counter()
            images[variant] = run(variant)  # warm-up (compiles a compiled variant for this batch size)
            if "compile" in variant:
                print(f"batch {batch:3d} {variant}: first call (compilation) {time.perf_counter() - start:.0f} s", flush=True)
        rates: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(args.rounds):
            for variant in variants:
                run(variant)  # settle the allocator setting before timing
                rates[variant].append(batch / timed(lambda: run(variant), repeats=1, warmup=0))
        peaks.append(gemm_peak_gflops(torch.float32, device=args.device))
        peak = max(peaks)
        base = statistics.median(rates["fp32"]) if "fp32" in rates else None
        for variant in variants:
            ips = statistics.median(rates[variant])
            gflops = ips * GFLOP_PER_IMAGE
            line = f"batch {batch:3d} {variant:>18}: {ips:6.2f} images/s  {gflops:6.1f} GFLOP/s = {gflops / peak:.2f} of fp32 GEMM peak"
            if base and variant != "fp32":
                diff = (images[variant] - images["fp32"]).abs().max().item()
                line += f"; {ips / base:.2f}x fp32; max |pixel diff| {diff:.1e}"
            print(line, flush=True)
    reuse_freed_memory(False)
    print(f"fp32 GEMM peak: best of {len(peaks)} measurements {max(peaks):.0f} GFLOP/s (range {min(peaks):.0f}-{max(peaks):.0f})")


if __name__ == "__main__":
    main()
