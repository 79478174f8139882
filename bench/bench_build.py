"""End-to-end ``hsface build``: images/s and where the wall-clock time goes.

    python bench/bench_build.py                          # random-tiny models, 8 identities x 50 images, 4 shards
    python bench/bench_build.py --full-size --identities 2 --images 10 --attrop 2
    python bench/bench_build.py --model path/to/Vec2Face # official weights

Builds the same config twice into temporary folders, once encoding and writing shards in the
calling thread and once in the writer thread (what ``hsface build`` does), and prints for each the
split into load / sample / refine / perturb / decode / AttrOP / encode / write, the share of the
wall-clock time spent in decode + AttrOP (identity refinement is AttrOP too), and the wall-clock
ratio of the two runs. The two builds
must produce identical shards (checked). ``--full-size`` uses random weights of the released
sizes (generator, IResNet-100 x 2, SixDRepNet), which makes AttrOP slow on a CPU.
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
from pathlib import Path

import torch

from builder.build import build
from builder.config import get_config
from common import calibrate_batchnorm, describe_machine
from vec2face_model.identity import IdentityPrior
from vec2face_model.models.generator import Vec2Face
from vec2face_model.models.iresnet import iresnet100
from vec2face_model.models.sixdrepnet import SixDRepNet
from vec2face_model.performance import reuse_freed_memory
from vec2face_model.pipeline_vec2face import Vec2FacePipeline
from vec2face_model.timing import format_split


def full_size_random_pipeline() -> Vec2FacePipeline:
    torch.manual_seed(0)
    return Vec2FacePipeline(
        generator=Vec2Face().eval(),
        recognizer=calibrate_batchnorm(iresnet100(), seed=1),
        quality=calibrate_batchnorm(iresnet100(), seed=2),
        pose=calibrate_batchnorm(SixDRepNet(), seed=3),
        prior=IdentityPrior.from_features(torch.randn(4096, 512) * 1.1),
        preset="random-full-size",
    )


def shard_digests(config_dir: Path) -> list[str]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(config_dir.glob("train-*.parquet"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random-tiny", help="pipeline to build with (ignored with --full-size)")
    parser.add_argument("--full-size", action="store_true", help="random weights of the released model sizes")
    parser.add_argument("--identities", type=int, default=8)
    parser.add_argument("--images", type=int, default=50, help="images per identity")
    parser.add_argument("--attrop", type=int, default=30, help="AttrOP images per identity (half at yaw 60, half at 85)")
    parser.add_argument("--attrop-steps", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=2, help="identities per shard")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-format", choices=["jpeg", "png"], default="jpeg")
    args = parser.parse_args()

    groups = tuple((n, yaw) for n, yaw in ((args.attrop - args.attrop // 2, 60.0), (args.attrop // 2, 85.0)) if n)
    config = get_config(
        "10k", num_identities=args.identities, images_per_identity=args.images, attrop_groups=groups,
        attrop_max_steps=args.attrop_steps, refine_max_steps=args.attrop_steps, identities_per_shard=args.shard_size,
        batch_size=args.batch_size, image_format=args.image_format, model=args.model,
    )
    pipe = full_size_random_pipeline() if args.full_size else Vec2FacePipeline.from_pretrained(args.model)
    if not torch.cuda.is_available():
        reuse_freed_memory()  # as `hsface build` does on CPU
    print(f"machine: {describe_machine()}")
    print(f"config: {config.num_identities} identities x {config.images_per_identity} images, {config.num_shards} shards, "
          f"AttrOP {args.attrop}/identity x {args.attrop_steps} steps, {args.image_format}, "
          f"model {'random full-size' if args.full_size else args.model}", flush=True)

    walls, digests = {}, {}
    for overlap in (False, True):
        with tempfile.TemporaryDirectory() as tmp:
            result = build(config, tmp, progress=False, pipe=pipe, overlap_io=overlap)
            digests[overlap] = shard_digests(result.config_dir)
        walls[overlap] = result.seconds
        t = result.timings
        label = "writer thread" if overlap else "same thread  "
        compute = sum(t.get(stage, 0.0) for stage in ("refine", "decode", "attrop"))  # refinement is AttrOP too
        print(f"{label}: {config.num_images / result.seconds:6.2f} images/s; decode + AttrOP (incl. refinement) = "
              f"{compute / result.seconds:.1%} of wall time", flush=True)
        print(f"    {format_split(t, result.seconds, background=('encode', 'write') if overlap else ())}")
    if digests[False] != digests[True]:
        raise SystemExit("the two builds wrote different shards: the writer thread changed the output")
    print(f"writer thread vs same thread: {walls[False] / walls[True]:.2f}x faster wall clock; shards identical")


if __name__ == "__main__":
    main()
