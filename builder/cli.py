"""``hsface`` command line: build | push | convert | analyze. Flags map onto config fields and nothing else.

Parsing imports nothing heavy: each command imports torch, datasets and the models when it runs, so
``hsface --help`` and argument errors answer at once. Errors: the library's own (``HSFaceError``)
print as one line ``hsface <command>: error: ...`` with exit code 2, like argument errors; any other
exception is a bug and keeps its traceback. ``--debug`` shows the traceback for every error.

More subcommands plug in through :data:`SUBCOMMAND_MODULES`: modules with an
``add_parser(subparsers)`` function that registers a parser whose ``run`` default is a callable
``run(args) -> int`` (see :func:`builder.analyze.add_parser`); keep their top-level imports light.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from pathlib import Path

# The names of builder.config.HSFACE_CONFIGS, spelled out so that parsing does not import the models
# (a test checks that they match).
PRESET_NAMES = ("10k", "20k", "100k", "200k", "300k", "tiny")
PRECISION_NAMES = ("fp32", "bf16", "fp16")
SUBCOMMAND_MODULES = ("builder.analyze", "builder.demo")


def _positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def _preset(text: str) -> str:
    if text not in PRESET_NAMES:
        raise argparse.ArgumentTypeError(f"unknown HSFace config {text!r}; available: {', '.join(PRESET_NAMES)}")
    return text


# --- commands ---------------------------------------------------------------------------------


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

    options = dict(private=args.private, revision=args.revision, create_pr=args.create_pr)
    plan = push_dataset(args.dir, args.repo_id, dry_run=True, **options)  # checks the folder and options, no network
    url = f"https://huggingface.co/datasets/{args.repo_id}"
    if args.dry_run:
        print(plan.summary())
        print(f"dry run: nothing was uploaded; without --dry-run these files go to {url}")
        return 0
    print(f"uploading {len(plan.files)} files ({plan.total_size}) to {url}")
    info = push_dataset(args.dir, args.repo_id, progress=not args.no_progress, commit_message=args.message, **options)
    print(f"pushed {args.dir} to {getattr(info, 'pr_url', None) or url}")
    print(f"Next: from datasets import load_dataset; ds = load_dataset({args.repo_id!r}, '<config>', split='train')")
    return 0


def _convert(args) -> int:
    from vec2face_model.pipeline_vec2face import Vec2FacePipeline

    heads = {k: v for k, v in (("num_heads", args.num_heads), ("decoder_num_heads", args.decoder_num_heads)) if v}
    pipe = Vec2FacePipeline.from_official(args.official_dir, prior_features=args.prior_features, **heads)
    pipe.save_pretrained(args.out_dir)
    missing = [name for name in ("recognizer", "quality", "pose", "prior") if getattr(pipe, name) is None]
    print(f"wrote {args.out_dir}" + (f" (without: {', '.join(missing)})" if missing else ""))
    return 0


# --- parser -----------------------------------------------------------------------------------


def _add_build(sub) -> None:
    b = sub.add_parser("build", help="generate an HSFace config as parquet shards + dataset card (resumable)",
                       description="Generate an HSFace config into OUT/<config>/ (resumable: rerun the same command "
                                   "to finish an interrupted build). Flags left out keep the config's values.")
    b.add_argument("config", type=_preset, metavar="CONFIG", help=f"HSFace config, one of: {', '.join(PRESET_NAMES)}")
    b.add_argument("--out", default="hsface", help="output folder (default: ./hsface, the repository's dataset package)")
    b.add_argument("--model", help="pipeline: preset 'random-tiny', a local folder, or a Hub repo id (default: official weights)")
    b.add_argument("--seed", type=_non_negative_int, help="seed of identity sampling and every image (default 0); "
                                                          "another seed is another dataset")
    b.add_argument("--shard-size", type=_positive_int, help="identities per parquet shard (the config's; 200 in the paper configs); recorded, "
                                                            "a resume must use the same value")
    b.add_argument("--batch-size", type=_positive_int, help="images per forward pass (the config's; 32 in the paper configs); recorded, since "
                                                            "refinement and AttrOP results depend on it: a resume must "
                                                            "use the same value")
    b.add_argument("--image-format", choices=["jpeg", "png"], help="image encoding: jpeg (quality 95, default) or png (lossless, ~5x larger)")
    b.add_argument("--precision", choices=PRECISION_NAMES, help="autocast precision (default fp32, the official numerics)")
    b.add_argument("--compile", action="store_true", help="decode through torch.compile (faster; pixels differ by rounding)")
    b.add_argument("--encode-threads", type=_positive_int, help="threads encoding images (default 1; up to 8 for PNG with a GPU)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(run=_build)


def _add_push(sub) -> None:
    u = sub.add_parser("push", help="upload a built folder to a Hub dataset repository (resumable)",
                       description="Upload the card, shards and everything the card links (sample grids, analysis "
                                   "plots and report) with huggingface_hub's multi-commit upload; hidden build "
                                   "bookkeeping (.manifest/, .incomplete/) stays local. An interrupted push resumes "
                                   "when the same command is run again.")
    u.add_argument("dir", help="the --out folder of `hsface build`")
    u.add_argument("repo_id", help="dataset repository, e.g. <user>/hsface (created if missing)")
    u.add_argument("--private", action="store_true", help="create the repository private (no effect on an existing one)")
    u.add_argument("--revision", help="branch to commit to (created from main if missing; default: main)")
    u.add_argument("--create-pr", action="store_true", help="open a pull request against main instead of committing to it")
    u.add_argument("--dry-run", action="store_true", help="list what would be uploaded (files, count, total size); no network")
    u.add_argument("--message", default="Upload HSFace (hsface push)", help="commit message")
    u.add_argument("--no-progress", action="store_true", help="no progress display")
    u.set_defaults(run=_push)


def _add_convert(sub) -> None:
    c = sub.add_parser("convert", help="official weights/*.pth folder -> diffusers-format Vec2FacePipeline folder")
    c.add_argument("official_dir", help="folder holding the official weights/ (as downloaded from BooBooWu/Vec2Face)")
    c.add_argument("out_dir", help="where to write the Vec2FacePipeline folder (save_pretrained layout)")
    c.add_argument("--prior-features", help=".npy [N,512] identity features to fit the identity prior on")
    c.add_argument("--num-heads", type=_positive_int, help="encoder heads (only for generators other than the released one: 12)")
    c.add_argument("--decoder-num-heads", type=_positive_int, help="decoder heads (released: 16)")
    c.set_defaults(run=_convert)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hsface", description="Vec2Face / HSFace toolkit")
    p.add_argument("--debug", action="store_true", help="show the full traceback of every error")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_build(sub)
    _add_push(sub)
    _add_convert(sub)
    for module in SUBCOMMAND_MODULES:
        importlib.import_module(module).add_parser(sub)
    for command in sub.choices.values():  # `hsface build ... --debug` works too
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback of every error")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except Exception as err:
        from vec2face_model.errors import HSFaceError

        if not isinstance(err, HSFaceError):
            raise  # a bug: keep the traceback
        if args.debug:
            traceback.print_exc()
        print(f"hsface {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
