"""Speed settings and checks: what the caller decides, and what a reduced precision really gains.

``reuse_freed_memory`` is a malloc setting and changes no result. The options that change pixels
by rounding (``precision``, ``compile_generator``) live on the pipeline; this module tells whether
a precision has fast kernels on a device (:func:`has_fast_kernels`), warns when it has not
(:func:`warn_if_slow_precision`: bf16 on an AVX2-only CPU runs matrix products ~100x slower than
fp32) and measures the speed-up on the actual pipeline (:func:`measure_precision_speedup`, whose
dict ``hsface build`` can record). Measured effects: ``bench/`` and the README's performance section.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import functools
import itertools
import sys
import time
import warnings
import weakref

import torch

# CPU flags (Linux /proc/cpuinfo names) that mean native kernels for a reduced precision.
NATIVE_CPU_FLAGS = {"bf16": ("avx512_bf16", "amx_bf16"), "fp16": ("avx512_fp16", "amx_fp16")}
REDUCED_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class SlowPrecisionWarning(UserWarning):
    """A reduced precision was asked for on a device without fast kernels for it."""

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_GLIBC_DEFAULTS = {_M_TRIM_THRESHOLD: 128 * 1024, _M_MMAP_THRESHOLD: 128 * 1024, _M_MMAP_MAX: 65536}
_REUSE = {_M_TRIM_THRESHOLD: 2**31 - 1, _M_MMAP_MAX: 0}  # never trim; no mmap-backed blocks


def reuse_freed_memory(enabled: bool = True) -> bool:
    """Keep freed memory in the process for reuse instead of handing it back to the OS (glibc only).

    A CPU decode allocates and frees tens of 12-50 MB activations per batch; by default glibc
    serves each from fresh ``mmap`` pages and returns them on free, so every batch pays page faults
    on ~1 GB (decoding runs 1.06x / 1.16x / 1.25x faster without that at batch 1 / 8 / 32 on the
    project's 2-core machine). With this on, the peak footprint of a batch stays mapped and is
    reused: resident memory no longer shrinks between batches. ``enabled=False`` restores glibc's
    default values. Returns False (and does nothing) where the C library is not glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    settings = _REUSE if enabled else _GLIBC_DEFAULTS
    ok = all(mallopt(param, value) == 1 for param, value in settings.items())
    if not enabled and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
    return ok


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux names them (empty where /proc/cpuinfo is unavailable)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def has_fast_kernels(precision: str, device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` runs ``precision`` ("fp32", "bf16", "fp16") natively, i.e. not far slower
    than fp32. CUDA: bf16 from compute capability 8.0 (no emulation), fp16 everywhere. CPU: the
    instruction-set flags in :data:`NATIVE_CPU_FLAGS` (on other CPUs oneDNN emulates them or falls
    back to reference loops). :func:`matmul_speedup` measures instead of asking."""
    if precision == "fp32":
        return True
    if precision not in REDUCED_DTYPES:
        raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
    device = torch.device(device)
    if device.type == "cuda":
        return precision == "fp16" or torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return any(flag in cpu_flags() for flag in NATIVE_CPU_FLAGS[precision])
    return True  # other accelerators: no reliable query, trust the user


def matmul_speedup(precision: str, device: torch.device | str = "cpu", size: int = 512, repeats: int = 5) -> float:
    """fp32 time / ``precision`` time of a ``size``² matrix product on ``device`` (best of
    ``repeats``): a probe of a few milliseconds where the kernels exist, ~1 s where they do not."""
    device = torch.device(device)
    a = torch.randn(size, size, device=device)

    def best(dtype: torch.dtype) -> float:
        x = a.to(dtype)
        x @ x  # warm-up (kernel selection)
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            x @ x
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        return min(times)

    return best(torch.float32) / best(REDUCED_DTYPES[precision])


def warn_if_slow_precision(precision: str, device: torch.device | str = "cpu") -> bool:
    """Warn (:class:`SlowPrecisionWarning`) when ``precision`` has no fast kernels on ``device``;
    returns whether it has them. Cheap (no probe), so a pipeline can call it on every run."""
    fast = has_fast_kernels(precision, device)
    if not fast:
        warnings.warn(
            f"precision={precision!r} has no native kernels on this {torch.device(device).type} "
            f"(CPU flags {' / '.join(NATIVE_CPU_FLAGS.get(precision, ()))} missing, or a GPU below compute "
            "capability 8.0): it can run many times slower than fp32. Use precision='fp32' here, or check with "
            "vec2face_model.performance.measure_precision_speedup(pipe, precision).",
            SlowPrecisionWarning,
            stacklevel=2,
        )
    return fast


def measure_precision_speedup(pipe, precision: str, batch_size: int = 8, repeats: int = 2, seed: int = 0) -> dict:
    """Plain-decode speed of ``pipe`` in ``precision`` against fp32, on random identity vectors.

    Interleaves the two (best of ``repeats`` each, after one warm-up batch) so a busy machine slows
    both alike. Returns a JSON-ready dict for ``generation.json``'s ``execution`` block:
    ``{"precision", "device", "batch_size", "native_kernels", "fp32_images_per_s",
    "images_per_s", "speedup"}`` (``speedup`` = precision images/s over fp32 images/s).
    """
    if precision not in REDUCED_DTYPES and precision != "fp32":
        raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
    device = pipe.device
    generator = torch.Generator().manual_seed(seed)
    vectors = torch.randn(batch_size, pipe.generator.config.rep_dim, generator=generator).to(device)
    labels = torch.arange(batch_size)
    index = torch.zeros(batch_size, dtype=torch.long)
    dtype = REDUCED_DTYPES.get(precision)

    def decode_seconds(run_dtype) -> float:
        with torch.autocast(device.type, dtype=run_dtype or torch.bfloat16, enabled=run_dtype is not None):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            pipe.decode(vectors, labels, index, seed=seed)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter() - start

    decode_seconds(None), decode_seconds(dtype)  # warm-up: kernel selection, allocator
    fp32_times, reduced_times = [], []
    for _ in range(repeats):
        fp32_times.append(decode_seconds(None))
        reduced_times.append(decode_seconds(dtype))
    fp32_rate, rate = batch_size / min(fp32_times), batch_size / min(reduced_times)
    return {
        "precision": precision,
        "device": str(device),
        "batch_size": batch_size,
        "native_kernels": has_fast_kernels(precision, device),
        "fp32_images_per_s": round(fp32_rate, 4),
        "images_per_s": round(rate, 4),
        "speedup": round(rate / fp32_rate, 3),
    }


# -- inference views for AttrOP ---------------------------------------------------------------------

# module -> (fingerprint of its weights, view); weak keys: a view dies with its module
_VIEWS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, torch.nn.Module]]" = weakref.WeakKeyDictionary()


def _weights_fingerprint(module: torch.nn.Module) -> tuple:
    # storage and in-place version of every tensor: loading, moving or editing weights changes it
    return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in itertools.chain(module.parameters(), module.buffers()))


def _channels_last_copy(module: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(module).requires_grad_(False).to(memory_format=torch.channels_last)


def _build_view(module: torch.nn.Module) -> torch.nn.Module:
    from .models.generator import Vec2Face
    from .models.iresnet import IResNet, fold_batchnorm
    from .models.sixdrepnet import SixDRepNet

    if isinstance(module, IResNet):
        return fold_batchnorm(module).to(memory_format=torch.channels_last)
    if isinstance(module, SixDRepNet):
        return _channels_last_copy(module)
    if isinstance(module, Vec2Face):
        # The conv decoder receives channels-last latents (a permute of [B,7,7,C]); with weights in
        # the same layout oneDNN stops reordering them on every call. The transformer is shared.
        view = copy.copy(module)
        view._modules = dict(module._modules)
        view._modules["im_decoder"] = _channels_last_copy(module.im_decoder)
        return view
    return module


def inference_view(module: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of an eval-mode network, laid out for many forward + input-backward passes
    (AttrOP): IResNet with BatchNorm folded into its convolutions and channels-last weights,
    SixDRepNet with channels-last weights, the generator with a channels-last conv decoder (its
    transformer shared, not copied). Other modules, and modules in training mode, come back as
    they are.

    Same function up to float rounding; the registered module is not touched (its
    ``state_dict()``, and so the build provenance hash, stay the same). Cached per module and
    rebuilt when its weights change. Costs one extra copy of the converted weights in memory.
    """
    if module.training:
        return module
    fingerprint = _weights_fingerprint(module)
    cached = _VIEWS.get(module)
    if cached is not None and cached[0] == fingerprint:
        return cached[1]
    view = _build_view(module)
    _VIEWS[module] = (fingerprint, view)
    return view
