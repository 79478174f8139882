"""Image encoding for shards: images/s of JPEG (q95) and PNG on one thread vs a thread pool.

    python bench/bench_encode.py --threads 2 4

Decides ``hsface build``'s default ``--encode-threads``: threads pay off where the encoder runs
outside the GIL long enough to cover the hand-over (PNG's zlib), not for small fast JPEGs.
Random pixels are the worst case for PNG's compression; faces compress better and encode faster.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np

from vec2face_model.image_io import encode_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--threads", type=int, nargs="+", default=[2])
    args = parser.parse_args()

    images = np.random.default_rng(0).integers(0, 256, (args.images, 112, 112, 3), dtype=np.uint8)
    for image_format in ("jpeg", "png"):
        encode = partial(encode_image, image_format=image_format)
        start = time.perf_counter()
        list(map(encode, images))
        single = time.perf_counter() - start
        line = f"{image_format:>4}: 1 thread {args.images / single:,.0f} images/s"
        for threads in args.threads:
            with ThreadPoolExecutor(threads) as pool:
                start = time.perf_counter()
                list(pool.map(encode, images))
                pooled = time.perf_counter() - start
            line += f"; {threads} threads {args.images / pooled:,.0f} images/s ({single / pooled:.2f}x)"
        print(line, flush=True)


if __name__ == "__main__":
    main()
