"""AttrOP throughput: hsface's implementation vs a straightforward Algorithm 1, full-size models.

    python bench/bench_attrop.py --batch 4 --steps 3

Both run the same number of iterations on the same vectors with full-size random-weight models
(generator, two IResNet-100, SixDRepNet B1g2) at the paper's targets (yaw 60, quality 27). The
baseline is Algorithm 1 written plainly: every sample iterates together, gradients flow into all
model weights as well (as in the official ``gen_image``), and one more forward decodes the
returned image. With random weights no sample meets the criteria, so per-sample early stopping
(the largest saving with real weights, where most samples finish in a few steps) is NOT exercised
here: the ratio below is the per-iteration saving alone.
"""

from __future__ import annotations

import argparse
import time

import torch

from common import describe_machine
from vec2face_model.attrop import AttrOPConfig, attrop
from vec2face_model.feature_math import cosine
from vec2face_model.models.generator import Vec2Face
from vec2face_model.models.iresnet import iresnet100, magface_quality
from vec2face_model.models.sixdrepnet import sixdrepnet_repvgg_b1g2


def baseline_attrop(vectors, targets, generator, recognizer, quality_model, pose, config: AttrOPConfig, steps: int):
    """Algorithm 1 as the official code runs it: batch-mean losses, weight gradients, a final decode."""
    v = vectors.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([v], lr=config.lr)
    for _ in range(steps):
        images = generator(v).images.clamp(-1, 1)
        id_loss = (1 - cosine(recognizer(images), targets)).mean()
        q_loss = (config.target_quality - magface_quality(quality_model, images)).clamp_min(0).mean()
        pose_loss = (config.target_yaw - pose.predict_euler(images)[:, 1].abs()).abs().mean()
        loss = 100 * id_loss + q_loss + pose_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return generator(v).images, v.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    generator, recognizer, quality_model, pose = Vec2Face().eval(), iresnet100().eval(), iresnet100().eval(), sixdrepnet_repvgg_b1g2().eval()
    vectors = torch.randn(args.batch, 512) * 1.1
    config = AttrOPConfig(target_yaw=60.0, target_quality=27.0, max_steps=args.steps)
    print(f"machine: {describe_machine()}; batch {args.batch}, {args.steps} iterations", flush=True)

    start = time.perf_counter()
    baseline_attrop(vectors, vectors, generator, recognizer, quality_model, pose, config, args.steps)
    baseline = time.perf_counter() - start
    for model in (generator, recognizer, quality_model, pose):
        model.zero_grad(set_to_none=True)

    def decode(v, rows, iteration):
        gens = [torch.Generator().manual_seed(int(r) * 1000 + iteration) for r in rows]
        return generator(v, generator=gens).images

    start = time.perf_counter()
    result = attrop(vectors, vectors, decode, recognizer, lambda x: magface_quality(quality_model, x),
                    lambda x: pose.predict_euler(x)[:, 1], config, models=[generator, recognizer, quality_model, pose])
    ours = time.perf_counter() - start
    print(f"baseline: {args.batch / baseline:.3f} images/s ({baseline:.1f} s)")
    print(f"hsface:   {args.batch / ours:.3f} images/s ({ours:.1f} s); success {int(result.success.sum())}/{args.batch} "
          f"(baseline has no per-sample criteria)")
    print(f"speed-up at equal iterations: {baseline / ours:.2f}x")


if __name__ == "__main__":
    main()
