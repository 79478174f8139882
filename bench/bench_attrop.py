"""AttrOP throughput: hsface against a faithful re-implementation of the official loop, full-size models.

    python bench/bench_attrop.py --batch 4 --steps 3 --repeats 3          # fp32, equal iteration counts
    python bench/bench_attrop.py --batch 4 --steps 3 --repeats 3 --bf16   # adds hsface under bf16 autocast

Every variant runs the same vectors through the released architectures with random weights
(``common.full_size_random_pipeline``), exactly ``--steps`` optimiser steps at the paper's targets
(yaw 60, quality 27), which random networks never meet: the ratio is the per-iteration saving at
equal iteration counts. Variants interleave, and each one's best of ``--repeats`` counts.

* official: ``official_attrop.official_gen_image`` (weight gradients, ``retain_graph``, batch-mean
  losses, the extra final decode), with glibc's default malloc settings as the official code has;
* hsface: ``Vec2FacePipeline.steer`` as ``hsface build`` runs it (inference views of the networks,
  ``reuse_freed_memory`` on);
* candidates: hsface on the registered networks (without ``performance.inference_view``), to show
  what the views give; and hsface with glibc's malloc defaults, to show what that setting gives.
"""

from __future__ import annotations

import argparse
import time

import torch

from common import describe_machine, full_size_random_pipeline
from official_attrop import official_gen_image
from vec2face_model.attrop import AttrOPConfig, attrop
from vec2face_model.models.iresnet import magface_quality
from vec2face_model.performance import reuse_freed_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bf16", action="store_true", help="also run hsface under bf16 autocast")
    parser.add_argument("--skip", default="", help="variant names to leave out, separated by semicolons")
    args = parser.parse_args()

    pipe = full_size_random_pipeline()
    networks = [pipe.generator, pipe.recognizer, pipe.quality, pipe.pose]
    vectors = torch.randn(args.batch, 512, generator=torch.Generator().manual_seed(1)) * 1.1
    labels, index = torch.arange(args.batch), torch.zeros(args.batch, dtype=torch.long)
    config = AttrOPConfig(target_yaw=60.0, target_quality=27.0, max_steps=args.steps)
    print(f"machine: {describe_machine()}; batch {args.batch}, {args.steps} iterations, best of {args.repeats}", flush=True)

    def official():
        reuse_freed_memory(False)
        _, _, passes = official_gen_image(vectors, pipe.generator, pipe.quality, pipe.recognizer, pipe.pose, max_passes=args.steps)
        assert passes == args.steps
        for model in networks:  # the official code keeps them; drop them so later variants start clean
            model.zero_grad(set_to_none=True)
            model.requires_grad_(False)

    def hsface(reuse=True, dtype=None):
        def run():
            reuse_freed_memory(reuse)
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                result = pipe.steer(vectors, vectors, labels, index, config, seed=0)
            assert int(result.steps.max()) == args.steps
        return run

    def registered_modules():
        reuse_freed_memory(True)

        def decode(v, rows, iteration):
            return pipe.decode(v, labels[rows], index[rows], seed=0, iteration=iteration)

        attrop(vectors, vectors, decode, pipe.recognizer, lambda x: magface_quality(pipe.quality, x),
               lambda x: pipe.pose.predict_euler(x)[:, 1], config, models=networks)

    variants = {
        "official": official,
        "hsface": hsface(),
        "hsface on registered modules (no views)": registered_modules,
        "hsface with glibc malloc defaults": hsface(reuse=False),
    }
    if args.bf16:
        variants["hsface bf16"] = hsface(dtype=torch.bfloat16)
    variants = {k: v for k, v in variants.items() if k not in args.skip.split(";")}
    times = {name: [] for name in variants}
    for repeat in range(args.repeats):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
            print(f"  repeat {repeat + 1}: {name} {times[name][-1]:.1f} s", flush=True)
    reference = min(times["official"]) if "official" in times else None
    for name, t in times.items():
        best = min(t)
        ratio = f"  {reference / best:.2f}x official" if reference else ""
        print(f"{name:40s} {args.batch * args.steps / best:.3f} image-iterations/s (best {best:.1f} s){ratio}")


if __name__ == "__main__":
    main()
