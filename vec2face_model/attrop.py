"""AttrOP (paper section 3.3, Algorithm 1): steer identity vectors by gradient descent so that the
decoded face keeps its identity, reaches a quality target and (optionally) a head pose.

The loss per sample is the official one::

    100 · (1 − cos(ArcFace(image), identity))  +  max(q_target − ‖MagFace(image)‖, 0)  +  |yaw_target − |yaw(image)||

optimised with Adam on the vectors only. Differences from the official ``gen_image`` (all fixing
documented problems, ARCHITECTURE.md section 5):

* **bounded**: every sample stops after ``max_steps`` iterations (the official loop can run forever,
  upstream issue #18); samples that never meet the criteria come back with ``success=False``;
* **per sample**: each sample is judged on its own measurements (not on batch means) and leaves
  the batch as soon as it meets the criteria, so later iterations only pay for unfinished samples;
  the loss is a sum over samples, which makes each trajectory independent of the batch;
* the returned image is the one that was measured (the official code decodes once more with a
  fresh mask, which may violate the criteria it just met);
* models are called with their weights frozen: no gradients accumulate in them, and no backward
  pass runs through the quality model while every remaining sample is above the quality target.

Models are passed in as callables, so this module knows nothing about network classes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .feature_math import cosine

# decode(vectors [b, d], sample_ids [b] long, iteration) -> images [b,3,112,112]; the pipeline derives
# each sample's mask generator from (sample id, iteration) so trajectories are batch independent.
DecodeFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
ImageFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class AttrOPConfig:
    """Targets and limits of one AttrOP run (defaults: the paper's pose images at 60° yaw)."""

    target_yaw: float | None = 60.0
    target_quality: float = 27.0
    lr: float = 0.1
    max_steps: int = 30
    id_threshold: float = 0.3  # accept when 1 − cos ≤ this
    quality_tolerance: float = 1.0  # accept when the quality shortfall ≤ this
    yaw_tolerance: float = 5.0  # accept when | target − |yaw| | ≤ this (degrees)
    id_weight: float = 100.0

    def __post_init__(self):
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be ≥ 1, got {self.max_steps}")
        if self.target_yaw is not None and not 0 <= self.target_yaw <= 90:
            raise ValueError(f"target_yaw is an absolute yaw in degrees (0..90), got {self.target_yaw}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


@dataclass
class AttrOPResult:
    vectors: torch.Tensor  # [B, d] adjusted vectors (those of the accepted iteration where successful)
    images: torch.Tensor  # [B,3,112,112] the measured image of the final iteration of each sample
    id_loss: torch.Tensor  # [B] 1 − cos(identity)
    quality: torch.Tensor  # [B] feature norm of the quality model
    yaw: torch.Tensor  # [B] measured yaw in degrees (NaN when no pose target)
    success: torch.Tensor  # [B] bool: all criteria met
    steps: torch.Tensor  # [B] iterations used
    loss_history: list[float]  # mean loss over the still-active samples, per iteration


class _FrozenWeights:
    """Context manager: parameters of the given modules get requires_grad False, restored on exit."""

    def __init__(self, callables: Sequence[object]):
        self.params = [p for c in callables if isinstance(c, torch.nn.Module) for p in c.parameters()]

    def __enter__(self):
        self.saved = [p.requires_grad for p in self.params]
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p, flag in zip(self.params, self.saved):
            p.requires_grad_(flag)


def attrop_losses(images, identity_vectors, identity_fn: ImageFn, quality_fn: ImageFn, yaw_fn: ImageFn | None, config: AttrOPConfig):
    """Per-sample (id_loss, quality, quality_loss, yaw, pose_loss) on clipped images."""
    images = images.clamp(-1, 1)
    id_loss = 1 - cosine(identity_fn(images), identity_vectors)
    quality = quality_fn(images)
    quality_loss = (config.target_quality - quality).clamp_min(0)
    if yaw_fn is not None and config.target_yaw is not None:
        yaw = yaw_fn(images)
        pose_loss = (config.target_yaw - yaw.abs()).abs()  # the sign of the yaw is not part of the target
    else:
        yaw = torch.full_like(quality, float("nan"))
        pose_loss = torch.zeros_like(quality)
    return id_loss, quality, quality_loss, yaw, pose_loss


def attrop(
    vectors: torch.Tensor,
    identity_vectors: torch.Tensor,
    decode: DecodeFn,
    identity_fn: ImageFn,
    quality_fn: ImageFn,
    yaw_fn: ImageFn | None = None,
    config: AttrOPConfig = AttrOPConfig(),
    models: Sequence[object] = (),
) -> AttrOPResult:
    """Run AttrOP on ``vectors`` [B, d] towards ``identity_vectors`` [B, d]; always terminates.

    ``models`` lists modules whose weights must stay untouched (their ``requires_grad`` is switched
    off for the run); the callables may be those modules or wrap them.
    """
    if vectors.shape != identity_vectors.shape:
        raise ValueError(f"vectors {tuple(vectors.shape)} and identity_vectors {tuple(identity_vectors.shape)} differ in shape")
    if config.target_yaw is not None and yaw_fn is None:
        raise ValueError("a yaw target needs a pose model (yaw_fn); pass target_yaw=None for identity/quality only")
    batch = vectors.shape[0]
    v = vectors.detach().clone().float().requires_grad_(True)
    optimizer = torch.optim.Adam([v], lr=config.lr)
    identity_vectors = identity_vectors.detach().float()
    sample_ids = torch.arange(batch, device=vectors.device)

    out_vectors = v.detach().clone()
    out_images: torch.Tensor | None = None
    id_out = torch.full((batch,), float("nan"))
    q_out = torch.full((batch,), float("nan"))
    yaw_out = torch.full((batch,), float("nan"))
    success = torch.zeros(batch, dtype=torch.bool)
    steps = torch.zeros(batch, dtype=torch.long)
    active = torch.ones(batch, dtype=torch.bool)
    history: list[float] = []

    with _FrozenWeights(models), torch.enable_grad():
        for iteration in range(config.max_steps):
            idx = sample_ids[active.to(sample_ids.device)]
            images = decode(v[idx], idx, iteration)
            id_loss, quality, q_loss, yaw, pose_loss = attrop_losses(
                images, identity_vectors[idx], identity_fn, quality_fn, yaw_fn, config
            )
            without_quality = config.id_weight * id_loss + pose_loss
            loss = without_quality + q_loss
            history.append(float(loss.detach().mean()))
            met = (id_loss <= config.id_threshold) & (q_loss <= config.quality_tolerance) & (pose_loss <= config.yaw_tolerance)
            last = iteration == config.max_steps - 1
            finished = (met | last).detach().cpu()

            # record the measured state of every sample that stops now
            rows = idx.cpu()[finished]
            if out_images is None:
                out_images = images.new_zeros((batch, *images.shape[1:])).detach()
            out_images[rows] = images.detach()[finished.to(images.device)].clamp(-1, 1)
            out_vectors[rows] = v.detach()[rows]
            id_out[rows] = id_loss.detach().cpu()[finished]
            q_out[rows] = quality.detach().float().cpu()[finished]
            yaw_out[rows] = yaw.detach().float().cpu()[finished]
            success[rows] = met.detach().cpu()[finished]
            steps[rows] = iteration + 1
            active[rows] = False
            if not active.any():
                break

            # step only the samples that go on; finished ones are frozen at their accepted value
            optimizer.zero_grad(set_to_none=True)
            keep = (~finished).to(loss.device)
            # When the quality hinge is flat for every sample that goes on, leaving it out skips a
            # backward pass through the quality model that would only add zeros to the gradient.
            objective = loss if bool((q_loss[keep] > 0).any()) else without_quality
            objective[keep].sum().backward()
            frozen = v.detach().clone()
            optimizer.step()
            with torch.no_grad():
                done = ~active.to(v.device)
                v[done] = frozen[done]

    return AttrOPResult(
        vectors=out_vectors,
        images=out_images,
        id_loss=id_out,
        quality=q_out,
        yaw=yaw_out,
        success=success,
        steps=steps,
        loss_history=history,
    )
