"""One-call speed check of hsface on one GPU (under 5 minutes), or a CPU smoke run of the same code.

    python bench/gpu_check.py                    # full-size random-weight models on cuda
    python bench/gpu_check.py --model ./pipe     # a saved Vec2FacePipeline folder (real weights)
    python bench/gpu_check.py --smoke            # random-tiny models on CPU, well under a minute

Prints, and writes as JSON to ``--json`` when given:

* decode images/s in fp32, bf16 and through ``torch.compile`` at batch 64 and 256;
* AttrOP at the paper's settings (yaw 60, quality 27, at most 30 iterations, per-sample early
  stopping): images/s, mean iterations, success rate; and the cost of one image-iteration;
* an end-to-end ``builder.build.build`` of a few hundred identities (paper recipe, AttrOP capped at
  ``--build-steps`` iterations to fit the time budget) with its images/s and per-stage split;
* peak GPU memory; extrapolated hours for HSFace10K and HSFace300K from the measured rates.

Random weights never meet the AttrOP criteria, so with them every AttrOP image runs all its
iterations: the extrapolation then is an upper bound (``--mean-attrop-steps`` sets the assumed
mean; pass the mean that a real-weight build reports to get a realistic figure).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import describe_machine, full_size_random_pipeline  # noqa: E402
from vec2face_model import AttrOPConfig, Vec2FacePipeline  # noqa: E402
from vec2face_model.performance import REDUCED_DTYPES, has_fast_kernels  # noqa: E402

PAPER_IMAGES_PER_IDENTITY, PAPER_ATTROP_IMAGES, PAPER_MAX_STEPS = 50, 30, 30


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def decode_rate(pipe, batch: int, precision: str, repeats: int) -> float:
    """Plain-decode images/s (best of ``repeats`` after a warm-up batch)."""
    device = pipe.device
    vectors = torch.randn(batch, 512, generator=torch.Generator().manual_seed(batch)).to(device)
    labels, index = torch.arange(batch), torch.zeros(batch, dtype=torch.long)
    dtype = REDUCED_DTYPES.get(precision)
    best = float("inf")
    with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        for attempt in range(repeats + 1):
            synchronize(device)
            start = time.perf_counter()
            pipe.decode(vectors, labels, index, seed=0)
            synchronize(device)
            if attempt:  # the first call is the warm-up
                best = min(best, time.perf_counter() - start)
    return batch / best


def check_decode(pipe, batches, repeats: int, compile_: bool) -> dict:
    out = {}
    for batch in batches:
        reset_peak(pipe.device)
        row = {"fp32": decode_rate(pipe, batch, "fp32", repeats)}
        if has_fast_kernels("bf16", pipe.device) or pipe.device.type == "cpu":
            row["bf16"] = decode_rate(pipe, batch, "bf16", repeats)
        if compile_:
            start = time.perf_counter()
            pipe.compile_generator()
            decode_rate(pipe, batch, "fp32", 0)  # compiles for this batch size
            row["compile_seconds"] = time.perf_counter() - start
            row["compile"] = decode_rate(pipe, batch, "fp32", repeats)
            del pipe._compiled_generator
        row["peak_gib"] = peak_gib(pipe.device)
        out[f"batch_{batch}"] = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}
        print(f"decode batch {batch}: " + ", ".join(f"{k} {v}" for k, v in out[f"batch_{batch}"].items()), flush=True)
    return out


def check_attrop(pipe, batch: int, max_steps: int) -> dict:
    device = pipe.device
    identities = pipe.sample_identities(batch, seed=0).vectors.to(device)
    labels, index = torch.arange(batch), torch.zeros(batch, dtype=torch.long)
    config = AttrOPConfig(target_yaw=60.0, target_quality=27.0, max_steps=max_steps)
    reset_peak(device)
    synchronize(device)
    start = time.perf_counter()
    result = pipe.steer(identities, identities, labels, index, config, seed=0)
    synchronize(device)
    seconds = time.perf_counter() - start
    iterations = int(result.steps.sum())
    out = {
        "batch": batch, "max_steps": max_steps, "seconds": round(seconds, 3),
        "images_per_s": round(batch / seconds, 3), "mean_steps": round(iterations / batch, 2),
        "success_rate": round(float(result.success.float().mean()), 3),
        "image_iterations_per_s": round(iterations / seconds, 3), "peak_gib": peak_gib(device),
    }
    print("attrop: " + ", ".join(f"{k} {v}" for k, v in out.items()), flush=True)
    return out


def check_build(pipe, num_identities: int, steps: int, smoke: bool) -> dict:
    from builder.build import build
    from builder.config import get_config

    base = get_config("tiny") if smoke else get_config("10k")
    config = base.replace(name="speedcheck", num_identities=num_identities, attrop_max_steps=steps, refine_max_steps=steps,
                          identities_per_shard=max(1, num_identities // 2))
    reset_peak(pipe.device)
    with tempfile.TemporaryDirectory() as out_dir:
        result = build(config, out_dir, progress=False, pipe=pipe)
    attrop_images = num_identities * sum(count for count, _ in config.attrop_groups)
    plain_images = result.num_rows - attrop_images
    out = {
        "identities": num_identities, "images": result.num_rows, "attrop_images": attrop_images, "attrop_max_steps": steps,
        "seconds": round(result.seconds, 3), "images_per_s": round(result.num_rows / result.seconds, 3),
        "stages_seconds": {k: round(v, 3) for k, v in result.timings.items()}, "peak_gib": peak_gib(pipe.device),
        # rates that the extrapolation scales up (random weights: AttrOP and refinement run all `steps` iterations)
        "plain_images_per_s": round(plain_images / max(result.timings.get("decode", 0.0), 1e-9), 3),
        "attrop_image_iterations_per_s": round(attrop_images * steps / max(result.timings.get("attrop", 0.0), 1e-9), 3),
    }
    print("build: " + ", ".join(f"{k} {v}" for k, v in out.items()), flush=True)
    return out


def extrapolate_hours(build: dict, num_identities: int, mean_steps: float) -> float:
    """Hours for a paper-recipe build of ``num_identities`` x 50 images at the build's rates (plain
    decoding, and AttrOP for 30 pose images plus one refinement run per identity). Identity sampling
    is left out: it grows with n² and a few hundred identities say nothing about it
    (``bench/bench_sampling.py`` measures it)."""
    plain = num_identities * (PAPER_IMAGES_PER_IDENTITY - PAPER_ATTROP_IMAGES) / build["plain_images_per_s"]
    steered = num_identities * (PAPER_ATTROP_IMAGES + 1) * mean_steps / build["attrop_image_iterations_per_s"]
    return round((plain + steered) / 3600, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="random-tiny models on CPU, tiny sizes (for tests)")
    parser.add_argument("--model", help="a saved Vec2FacePipeline folder (default: full-size random weights)")
    parser.add_argument("--build-identities", type=int, default=200)
    parser.add_argument("--build-steps", type=int, default=2, help="AttrOP/refinement iteration cap in the build")
    parser.add_argument("--attrop-batch", type=int, default=64)
    parser.add_argument("--mean-attrop-steps", type=float, default=PAPER_MAX_STEPS,
                        help="mean AttrOP iterations per image assumed by the extrapolation (default: the cap, an upper bound)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    started = time.perf_counter()
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if args.smoke:
        pipe = Vec2FacePipeline.from_preset("random-tiny", seed=0)
        batches, repeats, attrop_batch, attrop_steps, build_ids, build_steps = (8, 16), 1, 4, 2, 4, 2
    else:
        pipe = Vec2FacePipeline.from_pretrained(args.model) if args.model else full_size_random_pipeline()
        batches, repeats, attrop_batch, attrop_steps = (64, 256), 3, args.attrop_batch, PAPER_MAX_STEPS
        build_ids, build_steps = args.build_identities, args.build_steps
    pipe.to(device)
    print(f"machine: {describe_machine()}; device {device}; weights: {'random-tiny' if args.smoke else args.model or 'full-size random'}", flush=True)

    results = {"device": str(device), "machine": describe_machine(), "smoke": args.smoke,
               "bf16_native": has_fast_kernels("bf16", device)}
    results["decode"] = check_decode(pipe, batches, repeats, compile_=device.type == "cuda" and not args.no_compile)
    results["attrop"] = check_attrop(pipe, attrop_batch, attrop_steps)
    results["build"] = check_build(pipe, build_ids, build_steps, args.smoke)
    results["peak_gib"] = peak_gib(device) if device.type != "cuda" else round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    results["mean_attrop_steps_assumed"] = args.mean_attrop_steps
    results["hours"] = {name: extrapolate_hours(results["build"], n, args.mean_attrop_steps) for name, n in (("HSFace10K", 10_000), ("HSFace300K", 300_000))}
    results["seconds"] = round(time.perf_counter() - started, 1)
    print(f"extrapolated hours at {args.mean_attrop_steps} AttrOP iterations per image (identity sampling not included): {results['hours']}")
    print("RESULT " + json.dumps(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
