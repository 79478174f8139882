"""Throughput of τ-bounded identity sampling (vec2face_model.identity_sampling.sample_identities) against the
fp32 GEMM peak of the same device, measured in the same run.

The unavoidable work of sampling ``n`` identities is one dot product per pair of accepted vectors:
``n²/2`` pairs × ``d`` multiply-adds, i.e. ``n²·d`` FLOP at 2 FLOP per multiply-add (the convention
of the GEMM peak too). Rejected candidates add work on top, so at low acceptance the achieved rate
on this "useful" count falls below the GEMM rate actually sustained.

    python bench/bench_sampling.py --n 10000 100000
    python bench/bench_sampling.py --n 10000 --repeats 3
    python bench/bench_sampling.py --n 300000 --device cuda --block-size 8192
"""

from __future__ import annotations

import argparse
import time

import torch

from vec2face_model import identity_sampling
from vec2face_model.identity import IdentityPrior, sample_identities


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_flops(device: torch.device, m: int, k: int, n: int, repeats: int) -> float:
    """Best fp32 FLOP/s of ``[m, k] @ [k, n]`` over ``repeats`` timed calls (after one warm-up)."""
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(m, k, device=device, generator=generator)
    b = torch.randn(k, n, device=device, generator=generator)
    torch.mm(a, b)  # warm-up (library initialisation, clocks)
    synchronize(device)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        best = max(best, 2.0 * m * k * n / (time.perf_counter() - start))
    return best


def synthetic_prior(dim: int, num_features: int, device: torch.device) -> IdentityPrior:
    """A prior on ArcFace-like scale: anisotropic Gaussian features (norm ≈ 29) with a small common offset."""
    generator = torch.Generator().manual_seed(1234)
    features = torch.randn(num_features, dim, generator=generator) * torch.linspace(0.3, 2.0, dim) + 0.2
    return IdentityPrior.from_features(features).to(device)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[10_000, 100_000, 300_000], help="identity counts to time")
    parser.add_argument("--tau", type=float, default=0.3)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--block-size", type=int, default=4096)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--fit-features", type=int, default=20_000, help="synthetic features the prior is fitted on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per n; the fastest is reported (shared machines are noisy)")
    args = parser.parse_args(argv)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        # The cosine checks must be true fp32; TF32 would move them by ~1e-3.
        torch.backends.cuda.matmul.allow_tf32 = False
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; dim {args.dim}; tau {args.tau}; block {args.block_size}")

    gemm_repeats = 3 if device.type == "cpu" else 10
    square = 8192 if device.type == "cuda" else 4096
    # The sampler's own GEMM: a segment of ≤ 1024 unit candidates against a chunk of the kept set.
    chunk = (identity_sampling._SCORE_BLOCK_ELEMENTS_CPU if device.type == "cpu" else identity_sampling._SCORE_BLOCK_ELEMENTS_ACCELERATOR) // 1024

    def measure_peak(label: str) -> float:
        square_peak = gemm_flops(device, square, square, square, gemm_repeats)
        shaped_peak = gemm_flops(device, 1024, args.dim, chunk, gemm_repeats)
        print(
            f"fp32 GEMM ({label}): {square}³ {square_peak / 1e9:,.1f} GFLOP/s, "
            f"[1024,{args.dim}]x[{args.dim},{chunk}] {shaped_peak / 1e9:,.1f} GFLOP/s"
        )
        return max(square_peak, shaped_peak)

    peak_before = measure_peak("before")
    prior = synthetic_prior(args.dim, args.fit_features, device)
    sample_identities(prior, min(2 * args.block_size, 10_000), tau=args.tau, seed=args.seed, block_size=args.block_size)  # warm-up
    rows = []
    for n in args.n:
        seconds = float("inf")
        for _ in range(args.repeats):
            synchronize(device)
            start = time.perf_counter()
            result = sample_identities(prior, n, tau=args.tau, seed=args.seed, block_size=args.block_size)
            synchronize(device)
            seconds = min(seconds, time.perf_counter() - start)
        rows.append((n, seconds, result.num_drawn, result.acceptance_rate))
        print(f"n={n}: {seconds:.2f} s", flush=True)
        del result
    # Measured again afterwards: on a shared machine the load can change during the run.
    peak = max(peak_before, measure_peak("after"))
    print(f"peak = {peak / 1e9:,.1f} GFLOP/s (best of both measurements)")

    print(f"{'n':>8} {'seconds':>9} {'drawn':>9} {'accept':>7} {'useful GFLOP':>13} {'GFLOP/s':>9} {'of peak':>8}")
    for n, seconds, num_drawn, acceptance in rows:
        useful_flop = float(n) * n * args.dim  # n²/2 pairs × d multiply-adds × 2 FLOP
        rate = useful_flop / seconds
        print(
            f"{n:>8} {seconds:>9.2f} {num_drawn:>9} {acceptance:>7.4f} "
            f"{useful_flop / 1e9:>13,.0f} {rate / 1e9:>9,.1f} {rate / peak:>8.1%}"
        )

if __name__ == "__main__":
    main()
