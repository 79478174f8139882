"""Decode throughput of the full-size Vec2Face generator (random weights), fp32 and bf16 autocast.

    python bench/bench_decode.py --batch-sizes 1 8 32

Prints images/s per batch size and precision, achieved GFLOP/s (49.22 GFLOP per image with the
inference masks, from the manifest's FLOP count) as a fraction of the GEMM peak measured in the
same run, the bf16/fp32 speed ratio and the largest bf16-vs-fp32 pixel difference.
"""

from __future__ import annotations

import argparse

import torch

from common import describe_machine, gemm_peak_gflops, timed
from vec2face_model.models.generator import Vec2Face

GFLOP_PER_IMAGE = 49.22  # shared/reference/manifests/README.md (inference mask settings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], help="default: fp32, plus bf16 where its GEMM is faster")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = Vec2Face().eval().to(args.device)
    print(f"machine: {describe_machine()}")
    peak = {"fp32": gemm_peak_gflops(torch.float32, device=args.device), "bf16": gemm_peak_gflops(torch.bfloat16, size=512, device=args.device)}
    print(f"GEMM peak: fp32 {peak['fp32']:.1f} GFLOP/s, bf16 {peak['bf16']:.1f} GFLOP/s", flush=True)
    precisions = args.precisions or (["fp32", "bf16"] if peak["bf16"] > peak["fp32"] else ["fp32"])
    if "bf16" not in precisions:
        print(f"bf16 GEMM runs at {peak['bf16'] / peak['fp32']:.2f}x fp32 here (no native bf16 kernels): bf16 decode skipped")

    results = {}
    for batch in args.batch_sizes:
        vectors = torch.randn(batch, 512, device=args.device) * 1.1
        masks = model.draw_masks(batch, torch.Generator().manual_seed(1))
        outputs = {}
        for precision in precisions:
            dtype = torch.bfloat16 if precision == "bf16" else None

            def run():
                with torch.inference_mode(), torch.autocast(args.device, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                    outputs[precision] = model(vectors, token_drop_mask=masks[0], token_all_mask=masks[1]).images.float()

            seconds = timed(run, repeats=args.repeats)
            results[(batch, precision)] = batch / seconds
        for precision in precisions:
            ips = results[(batch, precision)]
            gflops = ips * GFLOP_PER_IMAGE
            print(f"batch {batch:3d} {precision}: {ips:6.2f} images/s  {gflops:7.1f} GFLOP/s  "
                  f"= {gflops / peak['fp32']:.2f} of fp32 peak, {gflops / peak[precision]:.2f} of {precision} peak", flush=True)
        if len(precisions) == 2:
            diff = (outputs["bf16"] - outputs["fp32"]).abs().max().item()
            print(f"batch {batch:3d} bf16/fp32 speed: {results[(batch, 'bf16')] / results[(batch, 'fp32')]:.2f}x; "
                  f"max |image diff| {diff:.4f} (images span about [-1, 1])")
    after = gemm_peak_gflops(torch.float32, device=args.device)
    print(f"fp32 GEMM peak after the run: {after:.0f} GFLOP/s (before: {peak['fp32']:.0f}); ratios above use the first")


if __name__ == "__main__":
    main()
