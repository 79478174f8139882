"""Vec2FacePipeline: identity vectors in, faces out — the paper's sections 3.2–3.3 as one call.

    pipe = Vec2FacePipeline.from_pretrained("path/to/official/Vec2Face")   # or a converted folder
    out = pipe(num_identities=10, images_per_identity=50, seed=0)
    out.images[0].save("face.png")

``__call__`` reads like the paper's algorithm: sample well-separated identities from the prior
(cosine ≤ tau), optionally refine them (AttrOP, quality only), perturb each into its images
(sigma mix, cosine ≥ 0.5 to the identity), decode, and steer the scheduled pose images with
AttrOP. Every image is a function of (seed, identity index, image index) only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.distributed_utils import is_torch_dist_rank_zero
from huggingface_hub import ModelCard
from PIL import Image
from tqdm.auto import tqdm

from . import seeding
from .attrop import AttrOPConfig, attrop
from .conventions import from_pil, tensor_to_uint8, to_pil
from .feature_math import cosine, l2_normalize, rescale_to_norm
from .errors import HubUnreachableError, InvalidInputError, MissingInputError, looks_like_a_path
from .identity import IdentityPrior, PerturbedVectors, perturb, sample_identities, validate_identity_vectors
from .models.generator import Vec2Face
from .models.iresnet import IResNet, magface_quality
from .models.sixdrepnet import SixDRepNet
from .pipeline_hub import (  # noqa: F401 - OFFICIAL_* are part of this module's interface
    OFFICIAL_FILES,
    OFFICIAL_PRIOR_FEATURES,
    OFFICIAL_REPO_ID,
    REMOTE_CODE_MODULE,
    check_component_weights,
    is_hub_unreachable,
    is_placeholder_card,
    offline_advice,
    raise_for_unreadable_weights,
    remote_code,
)
from .pipeline_hub import model_card as build_model_card
from .performance import inference_view, warn_if_slow_precision
from .timing import StageTimer


# Random-weight pipelines built in memory by name (tests, benches, docs); not HSFace dataset configs.
PIPELINE_PRESETS = ("random-tiny",)

# Reduced precision runs matrix products under autocast; attention logits stay float32 (as the
# official model keeps them), so bf16 changes images by rounding only (see bench/bench_decode.py).
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class AttrOPSchedule:
    """Which images of each identity AttrOP steers, and towards what.

    ``groups`` lists ``(count, target_yaw)`` entries, optionally ``(count, target_yaw, target_pitch)``
    or ``(count, target_yaw, target_pitch, target_roll)`` (a None target is not steered); they take
    the *last* images of every identity, in order (the HSFace recipe: 20 images at yaw 60 and 10 at
    yaw 85 out of 50). All use the same quality target and limits from ``config`` (its pose targets
    are replaced per group).
    """

    groups: tuple[tuple, ...] = ((20, 60.0), (10, 85.0))
    config: AttrOPConfig = field(default_factory=AttrOPConfig)

    def pose_targets(self, images_per_identity: int) -> list[tuple[float | None, float | None, float | None] | None]:
        """Per image index: its (yaw, pitch, roll) targets, or None for a plain image."""
        targets: list[tuple | None] = []
        for group in self.groups:
            if not 2 <= len(group) <= 4:
                raise InvalidInputError(f"an AttrOP group is (count, yaw[, pitch[, roll]]), got {group!r}")
            count, *pose = group
            pose = tuple(None if t is None else float(t) for t in (*pose, None, None)[:3])
            if all(t is None for t in pose):
                raise InvalidInputError(f"the AttrOP group {group!r} sets no pose target")
            AttrOPConfig(target_yaw=pose[0], target_pitch=pose[1], target_roll=pose[2])  # range checks
            targets += [pose] * int(count)
        if len(targets) > images_per_identity:
            raise InvalidInputError(f"AttrOP schedule needs {len(targets)} images per identity, only {images_per_identity} requested")
        return [None] * (images_per_identity - len(targets)) + targets


@dataclass
class Vec2FacePipelineOutput(BaseOutput):
    """Images plus per-image metadata (all arrays have one entry per image, identity-major order).

    labels: global identity index; image_index: index within the identity; sigma: perturbation
    level; cos_to_identity: cosine of the image's vector to its identity vector; attrop_target_yaw:
    NaN for plain images; yaw / quality: measured by the pose / quality models where AttrOP ran
    (NaN elsewhere); attrop_success: AttrOP met its criteria (False for plain images).
    timings: seconds spent per stage of the call (sample, refine, perturb, decode, attrop).
    attrop_target_pitch / attrop_target_roll: NaN where not steered in that angle; pitch / roll:
    measured like yaw.
    """

    images: list | np.ndarray | torch.Tensor
    labels: np.ndarray
    image_index: np.ndarray
    sigma: np.ndarray
    cos_to_identity: np.ndarray
    attrop_target_yaw: np.ndarray
    attrop_success: np.ndarray
    yaw: np.ndarray
    quality: np.ndarray
    identity_vectors: torch.Tensor
    vectors: torch.Tensor
    timings: dict[str, float] | None = None
    attrop_target_pitch: np.ndarray | None = None
    attrop_target_roll: np.ndarray | None = None
    pitch: np.ndarray | None = None
    roll: np.ndarray | None = None


class Vec2FacePipeline(DiffusionPipeline):
    """Components: ``generator`` (Vec2Face), ``recognizer`` (ArcFace IResNet), ``quality`` (MagFace
    IResNet), ``pose`` (SixDRepNet), ``prior`` (IdentityPrior). Only the generator is required for
    decoding given vectors; sampling needs the prior, AttrOP the other three.
    """

    _optional_components = ["recognizer", "quality", "pose", "prior"]

    def __init__(
        self,
        generator: Vec2Face,
        recognizer: IResNet | None = None,
        quality: IResNet | None = None,
        pose: SixDRepNet | None = None,
        prior: IdentityPrior | None = None,
        preset: str | None = None,
    ):
        super().__init__()
        self.register_modules(generator=generator, recognizer=recognizer, quality=quality, pose=pose, prior=prior)
        # Outputs of a random-weight preset are not faces; the label travels with the pipeline.
        self.register_to_config(preset=preset)

    # ------------------------------------------------------------------------------------------
    # the algorithm
    # ------------------------------------------------------------------------------------------

    def __call__(
        self,
        identity_vectors: torch.Tensor | np.ndarray | None = None,
        num_identities: int | None = None,
        images_per_identity: int = 50,
        *,
        tau: float = 0.3,
        sigmas: tuple[float, ...] = (0.3, 0.5, 0.7),
        fractions: tuple[float, ...] = (0.4, 0.4, 0.2),
        min_similarity: float = 0.5,
        attrop_schedule: AttrOPSchedule | None = None,
        refine_identities: AttrOPConfig | None = None,
        seed: int = 0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        identity_offset: int = 0,
        output_type: str = "pil",
        return_dict: bool = True,
        batch_size: int = 32,
        progress: bool = True,
        on_images: Callable[[int], None] | None = None,
        precision: str = "fp32",
        **deprecated_kwargs,
    ) -> Vec2FacePipelineOutput | tuple:
        """Generate ``images_per_identity`` faces for each identity.

        Identities are ``identity_vectors`` ([N, 512] or one 512-d vector, global indices
        ``identity_offset + i``) or ``num_identities`` fresh samples from the prior with pairwise
        cosine ≤ ``tau``. ``refine_identities`` runs the official identity-refinement AttrOP pass
        (quality only) first. ``on_images(n)`` is called as images are finished (for a caller's
        progress bar). ``precision`` "bf16"/"fp16" runs the networks under autocast (opt-in:
        changes pixels by rounding). ``attrop_schedule`` steers pose (the old keyword ``attrop=``
        still works with a DeprecationWarning; it shadowed the :func:`attrop` function).

        Randomness: every draw is keyed by (seed, identity index, image index), never by batch
        position. ``generator`` is diffusers' way to pass it: one int64 is drawn from a
        ``torch.Generator`` and used as ``seed`` (so a freshly seeded generator reproduces a call
        and a reused one gives new images, as in diffusers); a list holds one generator per
        identity, and identity ``i`` uses the seed drawn from ``generator[i]`` (sampling, when
        ``num_identities`` is given, uses the first). ``return_dict=False`` returns
        ``output.to_tuple()`` (images first). Progress bars follow ``set_progress_bar_config``;
        ``progress=False`` turns them off.
        """
        attrop_schedule = _take_deprecated_attrop(attrop_schedule, deprecated_kwargs)
        if output_type not in ("pil", "np", "pt"):
            raise InvalidInputError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        if precision not in PRECISIONS:
            raise InvalidInputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        warn_if_slow_precision(precision, self.device)  # bf16 without native kernels: many times slower
        _check_count("images_per_identity", images_per_identity)
        _check_count("batch_size", batch_size)
        if isinstance(identity_offset, bool) or not isinstance(identity_offset, (int, np.integer)) or identity_offset < 0:
            raise InvalidInputError(f"identity_offset must be a non-negative integer, got {identity_offset!r}")
        if identity_vectors is None:
            if num_identities is None:
                raise InvalidInputError("pass identity_vectors ([N, 512]) or num_identities (how many to sample)")
            _check_count("num_identities", num_identities)
            count_ids = num_identities
        else:
            identity_vectors = validate_identity_vectors(identity_vectors, self.generator.config.rep_dim)
            count_ids = len(identity_vectors)
        per_image = attrop_schedule.pose_targets(images_per_identity) if attrop_schedule is not None else [None] * images_per_identity
        seeds = _identity_seeds(generator, seed, count_ids)
        autocast = torch.autocast(self.device.type, dtype=PRECISIONS[precision] or torch.bfloat16, enabled=precision != "fp32")
        clock = StageTimer(self.device)
        # 1. identities (section 3.2)
        if identity_vectors is None:
            with clock.stage("sample"):
                identity_vectors = self.sample_identities(num_identities, tau=tau, seed=int(seeds[0]), progress=progress).vectors
        identities = identity_vectors.float().to(self.device)
        # 2. optional refinement: AttrOP towards quality only, the identity being its own target
        if refine_identities is not None:
            with clock.stage("refine"):
                identities = self.refine(identities, refine_identities, seed=seeds, identity_offset=identity_offset,
                                         batch_size=batch_size, progress=progress)
        # 3. perturbation into per-image vectors
        with clock.stage("perturb"):
            perturbed = _perturb_with_seeds(
                identities, images_per_identity, seeds, sigmas=sigmas, fractions=fractions,
                min_similarity=min_similarity, identity_offset=identity_offset,
            )
        vectors = perturbed.vectors.to(self.device)
        labels = perturbed.identity_index.cpu()
        image_index = perturbed.image_index.cpu()
        row_seeds = seeds[labels - identity_offset]
        count = len(vectors)
        # the AttrOP group of every image (-1: plain), and its (yaw, pitch, roll) targets (NaN: none)
        groups = list(dict.fromkeys(t for t in per_image if t is not None))
        group = torch.tensor([-1 if t is None else groups.index(t) for t in per_image])[image_index]
        targets = torch.tensor([(math.nan,) * 3 if t is None else tuple(math.nan if a is None else a for a in t) for t in per_image])[image_index]
        # uint8 as soon as a batch is done unless tensors were asked for: 4x less memory per image
        images = _ImageStore(count, as_uint8=output_type != "pt")
        angles = torch.full((count, 3), float("nan"))  # measured (yaw, pitch, roll)
        quality = torch.full((count,), float("nan"))
        success = torch.zeros(count, dtype=torch.bool)

        def finished(rows: torch.Tensor) -> None:
            bar.update(len(rows))
            if on_images is not None:
                on_images(len(rows))

        with autocast, self._progress(count, "Vec2Face", "img", progress) as bar:
            # 4. plain decoding
            with clock.stage("decode"):
                for rows in _batches(torch.nonzero(group == -1).flatten(), batch_size):
                    images.put(rows, self.decode(vectors[rows], labels[rows], image_index[rows], seed=row_seeds[rows]))
                    finished(rows)
            # 5. AttrOP for the scheduled pose images (section 3.3)
            with clock.stage("attrop"):
                for g, (target_yaw, target_pitch, target_roll) in enumerate(groups):
                    config = dataclasses.replace(attrop_schedule.config, target_yaw=target_yaw, target_pitch=target_pitch, target_roll=target_roll)
                    for rows in _batches(torch.nonzero(group == g).flatten(), batch_size):
                        result = self.steer(vectors[rows], identities[labels[rows] - identity_offset], labels[rows], image_index[rows], config, seed=row_seeds[rows])
                        vectors[rows] = result.vectors.to(vectors.dtype)
                        images.put(rows, result.images)
                        angles[rows] = torch.stack([result.yaw, result.pitch, result.roll], dim=1)
                        quality[rows], success[rows] = result.quality, result.success
                        finished(rows)

        cos = cosine(vectors, identities[labels - identity_offset]).cpu()
        output = Vec2FacePipelineOutput(
            images=images.result(output_type),
            labels=labels.numpy(),
            image_index=image_index.numpy(),
            sigma=perturbed.sigma.cpu().numpy(),
            cos_to_identity=cos.numpy(),
            attrop_target_yaw=targets[:, 0].numpy(),
            attrop_success=success.numpy(),
            yaw=angles[:, 0].numpy(),
            quality=quality.numpy(),
            identity_vectors=identities.cpu(),
            vectors=vectors.detach().cpu(),
            timings=clock.as_dict(),
            attrop_target_pitch=targets[:, 1].numpy(),
            attrop_target_roll=targets[:, 2].numpy(),
            pitch=angles[:, 1].numpy(),
            roll=angles[:, 2].numpy(),
        )
        return output if return_dict else output.to_tuple()

    def _progress(self, total: int, desc: str, unit: str, enabled: bool = True):
        """A tqdm bar configured like diffusers' ``progress_bar`` (``set_progress_bar_config`` wins over
        the defaults given here); ``enabled=False`` turns it off whatever the config says."""
        config = {"desc": desc, "unit": unit, "disable": not is_torch_dist_rank_zero(), **getattr(self, "_progress_bar_config", {})}
        if not enabled:
            config["disable"] = True
        return tqdm(total=total, **config)

    def sample_identities(self, num_identities: int, *, tau: float = 0.3, seed: int = 0, exclude=None, exclude_tau: float = 0.4, progress: bool = False):
        """Identity vectors from the prior with pairwise cosine ≤ tau (see :func:`identity.sample_identities`).

        ``progress=True`` shows a bar configured by ``set_progress_bar_config``.
        """
        _check_count("num_identities", num_identities)
        if self.prior is None:
            raise ValueError(
                "this pipeline has no identity prior: fit one on real identity features "
                "(Vec2FacePipeline.from_official(folder, prior_features=features) or "
                "pipe.prior = IdentityPrior.from_features(features)) or pass identity_vectors"
            )
        bar = {"desc": "sampling identities", "unit": "id", **getattr(self, "_progress_bar_config", {})} if progress else False
        return sample_identities(self.prior, num_identities, tau=tau, seed=seed, exclude=exclude, exclude_tau=exclude_tau, progress=bar)

    def decode(self, vectors: torch.Tensor, labels: torch.Tensor, image_index: torch.Tensor, *, seed: int | torch.Tensor, stream: int = seeding.STREAM_MASK, iteration: int | None = None, network: Vec2Face | None = None) -> torch.Tensor:
        """Vectors -> images [B,3,112,112] (unclipped), each with its own keyed mask generator.

        ``seed`` is one int for the batch or one per row. ``network`` replaces the generator on the
        gradient path (AttrOP passes its inference view).
        """
        seeds = torch.as_tensor(seed, dtype=torch.long).expand(len(labels)).tolist()
        keys = [(s, stream, int(i), int(j)) + (() if iteration is None else (iteration,)) for s, i, j in zip(seeds, labels, image_index)]
        drop, masked = self.generator.draw_masks(len(keys), [seeding.keyed_generator(*k) for k in keys])
        if torch.is_grad_enabled() and vectors.requires_grad:
            return (self.generator if network is None else network)(vectors, token_drop_mask=drop, token_all_mask=masked).images
        generator = getattr(self, "_compiled_generator", None)
        generator = self.generator if generator is None else generator
        with torch.inference_mode():
            return generator(vectors.to(self.generator.dtype), token_drop_mask=drop, token_all_mask=masked).images.float()

    def compile_generator(self, **compile_options) -> None:
        """Decode plain images through ``torch.compile(generator, **compile_options)``.

        Opt-in: fused kernels change pixels by float rounding (about 1e-4), and every new batch
        size compiles first (about a minute for the full-size model on a CPU; a C++ compiler is
        needed there). AttrOP keeps the eager generator, whose gradients are the reference ones.
        """
        self._compiled_generator = torch.compile(self.generator, **compile_options)

    def steer(self, vectors, identity_vectors, labels, image_index, config: AttrOPConfig, *, seed: int | torch.Tensor, stream: int = seeding.STREAM_ATTROP_MASK):
        """AttrOP on a batch of vectors, with per-(identity, image, iteration) masks (``seed``: one int or one per row)."""
        seed = torch.as_tensor(seed, dtype=torch.long).expand(len(labels))
        missing = [name for name in ("recognizer", "quality") if getattr(self, name) is None]
        if config.has_pose_target and self.pose is None:
            missing.append("pose")
        if missing:
            raise ValueError(f"AttrOP needs the {', '.join(missing)} component(s); load a pipeline that has them")

        # frozen copies laid out for many forward + input-backward passes (BatchNorm folded, channels-last)
        generator, recognizer, quality = (inference_view(m) for m in (self.generator, self.recognizer, self.quality))
        pose = inference_view(self.pose) if self.pose is not None else None

        def decode(v, rows, iteration):
            rows = rows.cpu()
            return self.decode(v, labels[rows], image_index[rows], seed=seed[rows], stream=stream, iteration=iteration, network=generator)

        pose_fn = pose.predict_euler if pose is not None else None  # [B, 3] (pitch, yaw, roll)
        return attrop(
            vectors, identity_vectors, decode,
            identity_fn=recognizer,
            quality_fn=lambda images: magface_quality(quality, images),
            yaw_fn=pose_fn,
            config=config,
            models=[m for m in (self.generator, self.recognizer, self.quality, self.pose) if m is not None],
        )

    def refine(self, identities: torch.Tensor, config: AttrOPConfig, *, seed: int | torch.Tensor, identity_offset: int = 0,
               batch_size: int = 32, progress: bool = True) -> torch.Tensor:
        """The official identity-refinement step: AttrOP towards quality only, each identity its own target.

        ``seed``: one int, or one per identity. The bar advances by identity as each batch finishes.
        """
        config = dataclasses.replace(config, target_yaw=None, target_pitch=None, target_roll=None)
        labels = torch.arange(len(identities)) + identity_offset
        seeds = torch.as_tensor(seed, dtype=torch.long).expand(len(identities))
        refined = identities.clone()
        with self._progress(len(identities), "refining identities", "id", progress) as bar:
            for rows in _batches(torch.arange(len(identities)), batch_size):
                result = self.steer(identities[rows], identities[rows], labels[rows], torch.zeros(len(rows), dtype=torch.long), config,
                                    seed=seeds[rows], stream=seeding.STREAM_REFINE_MASK)
                refined[rows] = result.vectors.to(refined.dtype)
                bar.update(len(rows))
        return refined

    # ------------------------------------------------------------------------------------------
    # reference-image mode
    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def identity_features(self, images) -> torch.Tensor:
        """ArcFace features of aligned 112x112 faces (PIL images, uint8 arrays or canonical tensors)."""
        if self.recognizer is None:
            raise ValueError("reference-image mode needs the recognizer component")
        if not isinstance(images, torch.Tensor):
            images = from_pil(images) if hasattr(images[0], "convert") else torch.as_tensor(np.asarray(images))
        return self.recognizer(images.to(self.device, self.recognizer.dtype)).float()

    def variations(self, images, images_per_identity: int = 8, sigma: float = 0.2, seed: int = 0, output_type: str = "pil", batch_size: int = 32, align: bool = True):
        """New images of the people in ``images`` (the official reference mode: one sigma level).

        ``align=True`` detects each photo's face and warps it to the ArcFace crop first
        (:func:`vec2face_model.align.align_face`); pass ``align=False`` for crops already aligned.
        """
        if align:
            from .align import align_face

            images = [align_face(image) for image in images]
        features = self.identity_features(images)
        return self(features, images_per_identity=images_per_identity, sigmas=(sigma,), fractions=(1.0,),
                    min_similarity=0.0, seed=seed, output_type=output_type, batch_size=batch_size, progress=False)

    def interpolate(self, a: torch.Tensor, b: torch.Tensor, steps: int = 8, seed: int = 0, output_type: str = "pil"):
        """Faces along the straight line from vector ``a`` to ``b`` (norm interpolated too), one mask for all steps."""
        _check_count("steps", steps)
        rep_dim = self.generator.config.rep_dim
        a, b = (validate_identity_vectors(v, rep_dim, name=name, single=True) for v, name in ((a, "a"), (b, "b")))
        t = torch.linspace(0, 1, steps).unsqueeze(1)
        norms = (1 - t) * a.norm() + t * b.norm()
        vectors = rescale_to_norm((1 - t) * l2_normalize(a) + t * l2_normalize(b), norms.squeeze(1)).to(self.device)
        same = torch.zeros(steps, dtype=torch.long)
        images = self.decode(vectors, same, same, seed=seed)
        return self._format(images.cpu(), output_type)

    @staticmethod
    def _format(images: torch.Tensor, output_type: str):
        if output_type == "pt":
            return images
        return to_pil(images) if output_type == "pil" else tensor_to_uint8(images)

    # ------------------------------------------------------------------------------------------
    # loading
    # ------------------------------------------------------------------------------------------

    @classmethod
    def from_official(cls, folder: str | os.PathLike, prior_features=None, **generator_overrides) -> "Vec2FacePipeline":
        """Build from a folder in the official Hub layout (``weights/*.pth``), converting on load.

        The official release has no identity prior: it is fitted on ``prior_features`` ([N, 512]
        array or .npy path) if given, else on ``center_feature_examples.npy`` when the folder has
        it; otherwise the pipeline has no prior (sampling then raises and says how to add one).
        """
        folder = Path(folder)
        files = {name: folder / rel for name, rel in OFFICIAL_FILES.items()}
        if not files["generator"].exists():
            raise MissingInputError(f"{folder}: no {OFFICIAL_FILES['generator']}; expected the official Vec2Face layout "
                                    f"(a folder downloaded from {OFFICIAL_REPO_ID})")
        generator = Vec2Face.from_official(files["generator"], **generator_overrides)
        recognizer = IResNet.from_official(files["recognizer"]).eval() if files["recognizer"].exists() else None
        quality = IResNet.from_official(files["quality"]).eval() if files["quality"].exists() else None
        pose = SixDRepNet.from_official(files["pose"]).eval() if files["pose"].exists() else None
        if prior_features is None:
            found = sorted(folder.rglob(OFFICIAL_PRIOR_FEATURES))
            prior_features = found[0] if found else None
        if isinstance(prior_features, (str, os.PathLike)):
            prior_features = np.load(prior_features)
        prior = IdentityPrior.from_features(prior_features) if prior_features is not None else None
        return cls(generator=generator, recognizer=recognizer, quality=quality, pose=pose, prior=prior)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, prior_features=None, **kwargs) -> "Vec2FacePipeline":
        """A local folder (diffusers format or official layout), a preset name, or a Hub repo id.

        For the official layout, ``kwargs`` are generator config overrides (head counts of a
        non-released generator size); otherwise they go to diffusers. The official repo id fetches
        only the four weight files and the prior features (the repo also holds a 42 GB training
        LMDB). An unreachable Hub raises :class:`HubUnreachableError` saying which files to fetch
        elsewhere; an unreadable or foreign weight file raises ``WeightsLoadError`` naming it.
        """
        name = str(pretrained_model_name_or_path)
        if name in PIPELINE_PRESETS:
            return cls.from_preset(name)
        path = Path(name).expanduser()
        if path.is_dir():
            if (path / OFFICIAL_FILES["generator"]).exists():
                return cls.from_official(path, prior_features=prior_features, **kwargs)
            return cls._from_diffusers_folder(path, **kwargs)
        if path.exists() or name.count("/") != 1 or looks_like_a_path(name):
            raise MissingInputError(f"{name}: no such folder, and not a preset ({', '.join(PIPELINE_PRESETS)}) or a Hub repo "
                                    f"id (owner/name)")
        try:
            if name == OFFICIAL_REPO_ID:
                from huggingface_hub import snapshot_download

                local = snapshot_download(name, allow_patterns=[*OFFICIAL_FILES.values(), f"*{OFFICIAL_PRIOR_FEATURES}"])
                return cls.from_official(local, prior_features=prior_features)
            folder = cls.download(name, **kwargs)
        except Exception as err:
            if not is_hub_unreachable(err):
                raise
            raise HubUnreachableError(offline_advice(name, err)) from err
        return cls._from_diffusers_folder(Path(folder), **kwargs)

    @classmethod
    def _from_diffusers_folder(cls, folder: Path, **kwargs) -> "Vec2FacePipeline":
        """diffusers' loader, plus what it does not check: every weight file readable and complete,
        and holding exactly the keys of its component (diffusers would randomly initialise the rest)."""
        try:
            pipe = super().from_pretrained(folder, **kwargs)
        except (OSError, ValueError) as err:
            raise_for_unreadable_weights(folder, err)
            raise
        check_component_weights(folder, pipe)
        return pipe

    @classmethod
    def _dict_from_json_file(cls, json_file):
        # model_index.json names the class as [module file, class] so that the plain
        # DiffusionPipeline.from_pretrained can find it; loading through this class needs no
        # remote code, so the list form is read as this class's own name (see pipeline_card).
        config = super()._dict_from_json_file(json_file)
        class_name = config.get("_class_name")
        if isinstance(class_name, (list, tuple)) and len(class_name) == 2 and class_name[1] == cls.__name__:
            config["_class_name"] = cls.__name__
        return config

    def to_json_string(self) -> str:
        """``model_index.json`` with ``_class_name = ["pipeline", <class>]``, diffusers' form for a
        pipeline whose code ships in the repository (the ``pipeline.py`` written by ``save_pretrained``)."""
        config = json.loads(super().to_json_string())
        config["_class_name"] = [REMOTE_CODE_MODULE, type(self).__name__]
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """diffusers' ``save_pretrained`` plus ``pipeline.py``, the shim through which
        ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` finds this class."""
        shim = Path(save_directory) / f"{REMOTE_CODE_MODULE}.py"
        if shim.exists() and not shim.read_text().startswith(remote_code(type(self)).split("\n")[0]):
            raise InvalidInputError(f"{shim} exists and was not written by hsface; save into another folder")
        shim.parent.mkdir(parents=True, exist_ok=True)
        shim.write_text(remote_code(type(self)))
        super().save_pretrained(save_directory, *args, **kwargs)

    def model_card(self, repo_id: str) -> ModelCard:
        """The model card ``push_to_hub`` uploads: license, base model, usage, limitations."""
        components = {}
        for name in ("generator", "recognizer", "quality", "pose", "prior"):
            module = getattr(self, name)
            if module is not None:
                count = sum(p.numel() for p in module.parameters()) + sum(b.numel() for b in module.buffers())
                components[name] = f"{type(module).__name__}, {count / 1e6:.1f}M values"
        return build_model_card(repo_id, preset=self.config.preset, components=components, has_prior=self.prior is not None)

    def _upload_folder(self, working_dir, repo_id: str, *args, **kwargs):
        # Called by diffusers' push_to_hub (and save_pretrained(push_to_hub=True)) with the saved
        # folder; diffusers put the repo's existing card there, or a generic placeholder: the
        # placeholder is replaced by this pipeline's card, a card someone wrote is kept.
        readme = Path(working_dir) / "README.md"
        if not readme.exists() or is_placeholder_card(ModelCard.load(readme)):
            self.model_card(repo_id).save(readme)
        return super()._upload_folder(working_dir, repo_id, *args, **kwargs)

    @classmethod
    def from_preset(cls, name: str = "random-tiny", seed: int = 0) -> "Vec2FacePipeline":
        """A complete small pipeline with RANDOM weights, built offline in seconds, for tests and smoke runs.

        Its images are not faces; datasets built with it are labelled ``random-tiny``.
        """
        if name not in PIPELINE_PRESETS:
            raise InvalidInputError(f"unknown preset {name!r}; available: {', '.join(PIPELINE_PRESETS)}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            generator = Vec2Face(**TINY_GENERATOR).eval()
            recognizer = IResNet(**TINY_IRESNET).eval()
            quality = IResNet(**TINY_IRESNET).eval()
            pose = SixDRepNet(**TINY_SIXDREPNET).eval()
            # ArcFace-like scale: 512-d features with norms around 20-30
            features = torch.randn(2048, 512) * 1.1
        return cls(generator=generator, recognizer=recognizer, quality=quality, pose=pose,
                   prior=IdentityPrior.from_features(features), preset=name)


class _ImageStore:
    """Collects a call's images by row: float [N,3,112,112] for "pt", else uint8 [N,112,112,3]."""

    def __init__(self, count: int, as_uint8: bool):
        self.as_uint8 = as_uint8
        self.data = torch.empty((count, 112, 112, 3), dtype=torch.uint8) if as_uint8 else torch.empty(count, 3, 112, 112)

    def put(self, rows: torch.Tensor, images: torch.Tensor) -> None:
        self.data[rows] = torch.from_numpy(tensor_to_uint8(images)) if self.as_uint8 else images.detach().cpu().float()

    def result(self, output_type: str):
        if output_type == "pt":
            return self.data
        array = self.data.numpy()
        return [Image.fromarray(a) for a in array] if output_type == "pil" else array


TINY_GENERATOR = dict(embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4,
                      image_decoder_channels=32, z_channels=32)
TINY_IRESNET = dict(layers=[1, 1, 1, 1], num_features=512)
TINY_SIXDREPNET = dict(num_blocks=[1, 1, 1, 1], width_multipliers=[0.25, 0.25, 0.25, 0.25])



def _check_count(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")


def _batches(rows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """``rows`` in consecutive batches; none at all for no rows (``split`` would yield one empty batch)."""
    return list(rows.split(batch_size)) if len(rows) else []


def _seed_from_generator(generator: torch.Generator) -> int:
    """One non-negative int64 drawn from ``generator`` (advancing it, as a diffusers pipeline would)."""
    if not isinstance(generator, torch.Generator):
        raise InvalidInputError(f"generator must be a torch.Generator or a list of them, got {type(generator).__name__}")
    return int(torch.randint(0, 2**63 - 1, (1,), generator=generator, device=generator.device))


def _identity_seeds(generator, seed: int, num_identities: int) -> torch.Tensor:
    """The seed of each identity [N] (long): ``seed``, one drawn from ``generator``, or one per listed generator."""
    if generator is None:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise InvalidInputError(f"seed must be a non-negative integer, got {seed!r}")
        return torch.full((num_identities,), int(seed), dtype=torch.long)
    if isinstance(generator, (list, tuple)):
        if len(generator) != num_identities:
            raise InvalidInputError(
                f"got {len(generator)} generators for {num_identities} identities: pass one torch.Generator, "
                "or a list with one per identity"
            )
        return torch.tensor([_seed_from_generator(g) for g in generator], dtype=torch.long)
    return torch.full((num_identities,), _seed_from_generator(generator), dtype=torch.long)


def _perturb_with_seeds(identities: torch.Tensor, images_per_identity: int, seeds: torch.Tensor, *, identity_offset: int, **options) -> PerturbedVectors:
    """:func:`identity.perturb` where identity ``i`` uses ``seeds[i]``: one call when all seeds agree, else
    one per identity (each row depends only on its identity's seed and global index either way)."""
    if bool((seeds == seeds[0]).all()):
        return perturb(identities, images_per_identity, seed=int(seeds[0]), identity_offset=identity_offset, **options)
    parts = [perturb(identities[i : i + 1], images_per_identity, seed=int(s), identity_offset=identity_offset + i, **options)
             for i, s in enumerate(seeds.tolist())]
    return PerturbedVectors(*(torch.cat([getattr(p, f) for p in parts]) for f in PerturbedVectors.__dataclass_fields__))


def _take_deprecated_attrop(attrop_schedule: AttrOPSchedule | None, deprecated_kwargs: dict) -> AttrOPSchedule | None:
    """``attrop_schedule``, or the schedule passed under its old keyword ``attrop=`` (with a warning)."""
    if "attrop" in deprecated_kwargs:
        warnings.warn(
            "Vec2FacePipeline(attrop=...) is deprecated; use attrop_schedule=... (same AttrOPSchedule)",
            DeprecationWarning, stacklevel=3,
        )
        legacy = deprecated_kwargs.pop("attrop")
        if attrop_schedule is not None and legacy is not None:
            raise InvalidInputError("pass the AttrOP schedule once: attrop_schedule=... (attrop=... is its deprecated name)")
        attrop_schedule = legacy if attrop_schedule is None else attrop_schedule
    if deprecated_kwargs:
        raise TypeError(f"Vec2FacePipeline.__call__() got unexpected keyword arguments: {', '.join(sorted(deprecated_kwargs))}")
    return attrop_schedule


def __getattr__(name: str):
    # "PRESETS" also names HSFace dataset configs and recipe settings; the old name stays for a while
    if name == "PRESETS":
        warnings.warn(
            "vec2face_model.pipeline_vec2face.PRESETS is deprecated; use PIPELINE_PRESETS", DeprecationWarning, stacklevel=2
        )
        return PIPELINE_PRESETS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
