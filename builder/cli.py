"""``hsface`` command line: build | push | convert | analyze. Flags map onto config fields and nothing else."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _build(args) -> int:
    import torch

    from vec2face_model.performance import reuse_freed_memory
    from vec2face_model.timing import format_split

    from .build import build
    from .config import get_config

    config = get_config(args.config, model=args.model, seed=args.seed, identities_per_shard=args.shard_size,
                        batch_size=args.batch_size, image_format=args.image_format, precision=args.precision,
                        torch_compile=args.compile or None)
    if not torch.cuda.is_available():
        reuse_freed_memory()  # same images, faster CPU decoding (see its docstring and bench/bench_decode.py)
    result = build(config, args.out, progress=not args.no_progress, encode_threads=args.encode_threads)
    if result.num_rows:  # main process only
        print(f"{result.config_dir}: {result.num_rows} images in {config.num_shards} shard(s) "
              f"({len(result.shards_written)} shard(s) with {result.images_written} images written now by all "
              f"processes, {len(result.shards_skipped)} already finished)")
        # encode and write run in a writer thread, overlapping the rest; "wait for writer" is what showed
        print(f"time: {format_split(result.timings, result.seconds)}")
        print(f"Next: from datasets import load_dataset; ds = load_dataset({str(Path(args.out))!r}, {config.name!r}, split='train')")
    return 0


def _push(args) -> int:
    from .hub import push_dataset

    info = push_dataset(args.dir, args.repo_id, private=args.private)
    print(f"pushed {args.dir} to https://huggingface.co/datasets/{args.repo_id} ({getattr(info, 'oid', '')})")
    return 0


def _convert(args) -> int:
    from vec2face_model.pipeline_vec2face import Vec2FacePipeline

    heads = {k: v for k, v in (("num_heads", args.num_heads), ("decoder_num_heads", args.decoder_num_heads)) if v}
    pipe = Vec2FacePipeline.from_official(args.official_dir, prior_features=args.prior_features, **heads)
    pipe.save_pretrained(args.out_dir)
    missing = [name for name in ("recognizer", "quality", "pose", "prior") if getattr(pipe, name) is None]
    print(f"wrote {args.out_dir}" + (f" (without: {', '.join(missing)})" if missing else ""))
    return 0


def parser() -> argparse.ArgumentParser:
    from .config import PRESETS

    p = argparse.ArgumentParser(prog="hsface", description="Vec2Face / HSFace toolkit")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="generate an HSFace config as parquet shards + dataset card (resumable)")
    b.add_argument("config", help=f"one of: {', '.join(PRESETS)}")
    b.add_argument("--out", default="hsface", help="output folder (default: ./hsface, the repository's dataset package)")
    b.add_argument("--model", help="pipeline: preset 'random-tiny', a local folder, or a Hub repo id (default: official weights)")
    b.add_argument("--seed", type=int)
    b.add_argument("--shard-size", type=int, help="identities per shard")
    b.add_argument("--batch-size", type=int)
    b.add_argument("--image-format", choices=["jpeg", "png"])
    b.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="autocast precision (default fp32, the official numerics)")
    b.add_argument("--compile", action="store_true", help="decode through torch.compile (faster; pixels differ by rounding)")
    b.add_argument("--encode-threads", type=int, help="threads encoding images (default 1; up to 8 for PNG with a GPU)")
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(run=_build)

    u = sub.add_parser("push", help="upload a built folder to a Hub dataset repository")
    u.add_argument("dir")
    u.add_argument("repo_id")
    u.add_argument("--private", action="store_true")
    u.set_defaults(run=_push)

    c = sub.add_parser("convert", help="official weights/*.pth folder -> diffusers-format Vec2FacePipeline folder")
    c.add_argument("official_dir")
    c.add_argument("out_dir")
    c.add_argument("--prior-features", help=".npy [N,512] identity features to fit the identity prior on")
    c.add_argument("--num-heads", type=int, help="encoder heads (only for generators other than the released one: 12)")
    c.add_argument("--decoder-num-heads", type=int, help="decoder heads (released: 16)")
    c.set_defaults(run=_convert)

    from .analyze import add_parser as add_analyze

    add_analyze(sub)
    from .demo import add_parser as add_demo; add_demo(sub)  # noqa: E702 (one line: cli.py is being rewritten elsewhere)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, OSError, RuntimeError) as err:
        print(f"hsface {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
