"""Where an AttrOP iteration spends its time, network by network, and what each candidate saves.

    python bench/bench_attrop_parts.py --batch 4 --repeats 3 [--profile]

Full-size random models (see ``common.py``). For every network, forward + backward to the input
image (weights frozen, as AttrOP runs them) in each variant; variants interleave and the best of
``--repeats`` counts. ``--profile`` also prints torch.profiler's top operators of one hsface AttrOP
iteration.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from common import calibrate_batchnorm, describe_machine
from vec2face_model.models.generator import Vec2Face
from vec2face_model.models.iresnet import fold_batchnorm, iresnet100
from vec2face_model.models.sixdrepnet import sixdrepnet_repvgg_b1g2


class _Relayout(torch.nn.Module):
    def __init__(self, inner, layout):
        super().__init__()
        self.inner, self.layout = inner, layout

    def forward(self, z):
        return self.inner(z.contiguous(memory_format=self.layout))


def forward_backward(fn, x):
    x = x.detach().requires_grad_(True)
    fn(x).float().square().sum().backward()
    return x.grad


def best_of(variants: dict, repeats: int) -> dict:
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default="generator,recognizer,pose")
    args = parser.parse_args()
    print(f"machine: {describe_machine()}; batch {args.batch}", flush=True)
    torch.manual_seed(0)
    images = torch.rand(args.batch, 3, 112, 112) * 2 - 1
    cl = lambda x: x.contiguous(memory_format=torch.channels_last)  # noqa: E731
    report = {}
    if "recognizer" in args.only:
        net = calibrate_batchnorm(iresnet100()).requires_grad_(False)
        folded = fold_batchnorm(net)
        folded_cl = fold_batchnorm(net).to(memory_format=torch.channels_last)
        net_cl = copy.deepcopy(net).to(memory_format=torch.channels_last)
        report["IResNet-100"] = best_of({
            "plain": lambda: forward_backward(net, images),
            "channels_last input": lambda: forward_backward(net, cl(images)),
            "channels_last weights + input": lambda: forward_backward(net_cl, cl(images)),
            "BN folded": lambda: forward_backward(folded, images),
            "BN folded + channels_last": lambda: forward_backward(folded_cl, cl(images)),
            "forward only": lambda: net(images),
        }, args.repeats)
        del net, folded, folded_cl, net_cl
    if "pose" in args.only:
        pose = calibrate_batchnorm(sixdrepnet_repvgg_b1g2()).requires_grad_(False)
        pose_cl = copy.deepcopy(pose).to(memory_format=torch.channels_last)
        report["SixDRepNet"] = best_of({
            "plain": lambda: forward_backward(pose.predict_euler, images),
            "channels_last input": lambda: forward_backward(pose.predict_euler, cl(images)),
            "channels_last weights + input": lambda: forward_backward(pose_cl.predict_euler, cl(images)),
            "forward only": lambda: pose.predict_euler(images),
        }, args.repeats)
        del pose, pose_cl
    if "generator" in args.only:
        gen = Vec2Face().eval().requires_grad_(False)
        drop, masked = gen.draw_masks(args.batch, torch.Generator().manual_seed(0))
        vectors = torch.randn(args.batch, 512)
        decode = lambda v: gen(v, token_drop_mask=drop, token_all_mask=masked).images  # noqa: E731
        decoder_cl = copy.deepcopy(gen.im_decoder).to(memory_format=torch.channels_last)
        decoder_nchw = gen.im_decoder

        def decode_with(decoder, layout):
            def run(v):
                gen.im_decoder = _Relayout(decoder, layout)
                try:
                    return decode(v)
                finally:
                    gen.im_decoder = decoder_nchw
            return run

        report["generator"] = best_of({
            "plain": lambda: forward_backward(decode, vectors),
            "latents made NCHW-contiguous": lambda: forward_backward(decode_with(decoder_nchw, torch.contiguous_format), vectors),
            "decoder weights channels_last": lambda: forward_backward(decode_with(decoder_cl, torch.channels_last), vectors),
            "forward only": lambda: decode(vectors),
        }, args.repeats)
    for network, times in report.items():
        base = times["plain"]
        for name, seconds in times.items():
            print(f"{network:12s} {name:28s} {seconds:7.3f} s  {base / seconds:5.2f}x of plain", flush=True)


if __name__ == "__main__":
    main()
