"""Shared helpers for the benchmark scripts: timing and the machine's matrix-multiply peak.

Benchmarks report ratios measured in one run (this machine is noisy): every script measures the
GEMM peak itself, before and after its timed work, and divides by the higher of the two.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def timed(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gemm_peak_gflops(dtype: torch.dtype = torch.float32, size: int = 2048, device: str = "cpu", repeats: int = 5) -> float:
    """Achieved GFLOP/s of a square matrix product (2·n³ FLOP), the practical peak of this machine."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    seconds = timed(lambda: a @ b, repeats=repeats, warmup=2)
    return 2 * size**3 / seconds / 1e9


def describe_machine() -> str:
    import platform

    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {torch.get_num_threads()} torch threads, {gpu}, torch {torch.__version__}"


def calibrate_batchnorm(model: torch.nn.Module, batch: int = 16, seed: int = 0) -> torch.nn.Module:
    """Give a random-weight network finite outputs: BatchNorm running statistics from one pass over
    random images (a random IResNet-100 with unit running variances overflows to inf/NaN)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: one pass sets the statistics exactly
    images = torch.rand(batch, 3, 112, 112, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    model.train()
    with torch.no_grad():
        model(images)
    return model.eval()


def full_size_random_pipeline(seed: int = 0):
    """A Vec2FacePipeline with the released architectures and random weights (generator, ArcFace-
    and MagFace-R100, SixDRepNet B1g2), BatchNorm statistics calibrated; about 1.3 GB of weights."""
    from vec2face_model import IdentityPrior, Vec2FacePipeline
    from vec2face_model.models.generator import Vec2Face
    from vec2face_model.models.iresnet import iresnet100
    from vec2face_model.models.sixdrepnet import sixdrepnet_repvgg_b1g2

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = Vec2Face().eval()
        recognizer, quality, pose = (calibrate_batchnorm(m, seed=seed + i) for i, m in enumerate((iresnet100(), iresnet100(), sixdrepnet_repvgg_b1g2())))
        prior = IdentityPrior.from_features(torch.randn(2048, 512) * 1.1)  # ArcFace-like norms, as the tiny preset
    return Vec2FacePipeline(generator=generator, recognizer=recognizer, quality=quality, pose=pose, prior=prior)
