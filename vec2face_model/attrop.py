"""AttrOP (paper section 3.3, Algorithm 1): steer identity vectors by gradient descent so that the
decoded face keeps its identity, reaches a quality target and (optionally) a head pose.

The loss per sample is the official one::

    100 · (1 − cos(ArcFace(image), identity))  +  max(q_target − ‖MagFace(image)‖, 0)  +  |yaw_target − |yaw(image)||

Beyond the paper, the pose term may also hold ``|pitch_target − pitch|`` and ``|roll_target − |roll||``
(SixDRepNet predicts all three angles); each term is present only when its target is set, so the
default (yaw only) is the official loss, float for float.

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

from .errors import InvalidInputError
from .feature_math import cosine

# decode(vectors [b, d], sample_ids [b] long, iteration) -> images [b,3,112,112]; the pipeline derives
# each sample's mask generator from (sample id, iteration) so trajectories are batch independent.
DecodeFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
ImageFn = Callable[[torch.Tensor], torch.Tensor]
# pose_fn(images) -> [b, 3] (pitch, yaw, roll) in degrees, or [b] yaw alone (then only a yaw target)
PoseFn = Callable[[torch.Tensor], torch.Tensor]


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
    # Pose beyond yaw (not in the paper): pitch is signed (looking up and looking down are different
    # faces), roll is absolute like yaw (a tilt to either side is the mirror image of the other).
    target_pitch: float | None = None
    target_roll: float | None = None
    pitch_tolerance: float = 5.0  # accept when | target − pitch | ≤ this (degrees)
    roll_tolerance: float = 5.0  # accept when | target − |roll| | ≤ this (degrees)

    def __post_init__(self):
        if self.max_steps < 1:
            raise InvalidInputError(f"max_steps must be ≥ 1, got {self.max_steps}")
        if self.target_yaw is not None and not 0 <= self.target_yaw <= 90:
            raise InvalidInputError(f"target_yaw is an absolute yaw in degrees (0..90), got {self.target_yaw}")
        if self.target_pitch is not None and not -90 <= self.target_pitch <= 90:
            raise InvalidInputError(f"target_pitch is a signed pitch in degrees (-90..90), got {self.target_pitch}")
        if self.target_roll is not None and not 0 <= self.target_roll <= 90:
            raise InvalidInputError(f"target_roll is an absolute roll in degrees (0..90), got {self.target_roll}")
        if self.lr <= 0:
            raise InvalidInputError(f"lr must be positive, got {self.lr}")

    @property
    def has_pose_target(self) -> bool:
        return any(t is not None for t in (self.target_yaw, self.target_pitch, self.target_roll))

    def pose_error(self, angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, met) per sample from measured ``angles`` [b, 3] (pitch, yaw, roll): the sum of the
        set targets' absolute errors, and whether each error is within its tolerance."""
        terms = []
        if self.target_yaw is not None:  # the sign of the yaw is not part of the target
            terms.append(((self.target_yaw - angles[:, 1].abs()).abs(), self.yaw_tolerance))
        if self.target_pitch is not None:
            terms.append(((self.target_pitch - angles[:, 0]).abs(), self.pitch_tolerance))
        if self.target_roll is not None:
            terms.append(((self.target_roll - angles[:, 2].abs()).abs(), self.roll_tolerance))
        loss, met = terms[0][0], terms[0][0] <= terms[0][1]
        for error, tolerance in terms[1:]:
            loss, met = loss + error, met & (error <= tolerance)
        return loss, met


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
    pitch: torch.Tensor | None = None  # [B] measured pitch in degrees (NaN when no pose target or a yaw-only pose_fn)
    roll: torch.Tensor | None = None  # [B] measured roll in degrees (likewise)


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


def _as_angles(pose: torch.Tensor, config: AttrOPConfig) -> torch.Tensor:
    """[b, 3] (pitch, yaw, roll) from a pose function's output ([b, 3], or [b] yaw alone)."""
    if pose.dim() == 2:
        return pose
    if config.target_pitch is not None or config.target_roll is not None:
        raise InvalidInputError("pitch and roll targets need a pose model that returns [B, 3] (pitch, yaw, roll) angles; "
                                "this one returns the yaw alone")
    nan = torch.full_like(pose, float("nan"))
    return torch.stack([nan, pose, nan], dim=1)


def attrop_losses(images, identity_vectors, identity_fn: ImageFn, quality_fn: ImageFn, pose_fn: PoseFn | None, config: AttrOPConfig):
    """Per-sample (id_loss, quality, quality_loss, angles [b, 3], pose_loss, pose_met) on clipped images."""
    images = images.clamp(-1, 1)
    id_loss = 1 - cosine(identity_fn(images), identity_vectors)
    quality = quality_fn(images)
    quality_loss = (config.target_quality - quality).clamp_min(0)
    if pose_fn is not None and config.has_pose_target:
        angles = _as_angles(pose_fn(images), config)
        pose_loss, pose_met = config.pose_error(angles)
    else:
        angles = torch.full((len(quality), 3), float("nan"), device=quality.device)
        pose_loss = torch.zeros_like(quality)
        pose_met = torch.ones_like(quality, dtype=torch.bool)
    return id_loss, quality, quality_loss, angles, pose_loss, pose_met


def attrop(
    vectors: torch.Tensor,
    identity_vectors: torch.Tensor,
    decode: DecodeFn,
    identity_fn: ImageFn,
    quality_fn: ImageFn,
    yaw_fn: PoseFn | None = None,
    config: AttrOPConfig = AttrOPConfig(),
    models: Sequence[object] = (),
) -> AttrOPResult:
    """Run AttrOP on ``vectors`` [B, d] towards ``identity_vectors`` [B, d]; always terminates.

    ``yaw_fn`` is the pose model: images -> [B] yaw, or [B, 3] (pitch, yaw, roll), which pitch and
    roll targets need. ``models`` lists modules whose weights must stay untouched (their
    ``requires_grad`` is switched off for the run); the callables may be those modules or wrap them.
    """
    if vectors.shape != identity_vectors.shape:
        raise InvalidInputError(f"vectors {tuple(vectors.shape)} and identity_vectors {tuple(identity_vectors.shape)} differ in shape")
    if config.has_pose_target and yaw_fn is None:
        raise InvalidInputError("a pose target needs a pose model (yaw_fn); pass target_yaw=None for identity/quality only")
    batch = vectors.shape[0]
    v = vectors.detach().clone().float().requires_grad_(True)
    optimizer = torch.optim.Adam([v], lr=config.lr)
    identity_vectors = identity_vectors.detach().float()
    sample_ids = torch.arange(batch, device=vectors.device)

    out_vectors = v.detach().clone()
    out_images: torch.Tensor | None = None
    id_out = torch.full((batch,), float("nan"))
    q_out = torch.full((batch,), float("nan"))
    angles_out = torch.full((batch, 3), float("nan"))
    success = torch.zeros(batch, dtype=torch.bool)
    steps = torch.zeros(batch, dtype=torch.long)
    active = torch.ones(batch, dtype=torch.bool)
    history: list[float] = []

    with _FrozenWeights(models), torch.enable_grad():
        for iteration in range(config.max_steps):
            idx = sample_ids[active.to(sample_ids.device)]
            images = decode(v[idx], idx, iteration)
            id_loss, quality, q_loss, angles, pose_loss, pose_met = attrop_losses(
                images, identity_vectors[idx], identity_fn, quality_fn, yaw_fn, config
            )
            without_quality = config.id_weight * id_loss + pose_loss
            loss = without_quality + q_loss
            history.append(float(loss.detach().mean()))
            met = (id_loss <= config.id_threshold) & (q_loss <= config.quality_tolerance) & pose_met
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
            angles_out[rows] = angles.detach().float().cpu()[finished]
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
        yaw=angles_out[:, 1].clone(),
        success=success,
        steps=steps,
        loss_history=history,
        pitch=angles_out[:, 0].clone(),
        roll=angles_out[:, 2].clone(),
    )
