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

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from PIL import Image
from tqdm.auto import tqdm

from . import seeding
from .attrop import AttrOPConfig, attrop
from .conventions import from_pil, tensor_to_uint8, to_pil
from .feature_math import cosine, l2_normalize, rescale_to_norm
from .identity import IdentityPrior, perturb, sample_identities
from .models.generator import Vec2Face
from .models.iresnet import IResNet, magface_quality
from .models.sixdrepnet import SixDRepNet
from .performance import inference_view, warn_if_slow_precision
from .timing import StageTimer

OFFICIAL_REPO_ID = "BooBooWu/Vec2Face"
OFFICIAL_FILES = {
    "generator": "weights/vec2face_generator.pth",
    "recognizer": "weights/arcface-r100-glint360k.pth",
    "quality": "weights/magface-r100-glint360k.pth",
    "pose": "weights/6DRepNet_300W_LP_AFLW2000.pth",
}
OFFICIAL_PRIOR_FEATURES = "center_feature_examples.npy"

PRESETS = ("random-tiny",)

# Reduced precision runs matrix products under autocast; attention logits stay float32 (as the
# official model keeps them), so bf16 changes images by rounding only (see bench/bench_decode.py).
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class AttrOPSchedule:
    """Which images of each identity AttrOP steers, and towards what.

    ``groups`` lists (count, target_yaw) pairs; they take the *last* images of every identity, in
    order (the HSFace recipe: 20 images at yaw 60 and 10 at yaw 85 out of 50). All use the same
    quality target and limits from ``config`` (its ``target_yaw`` is replaced per group).
    """

    groups: tuple[tuple[int, float], ...] = ((20, 60.0), (10, 85.0))
    config: AttrOPConfig = field(default_factory=AttrOPConfig)

    def target_yaws(self, images_per_identity: int) -> list[float | None]:
        """Per image index: the yaw target, or None for a plain image."""
        total = sum(count for count, _ in self.groups)
        if total > images_per_identity:
            raise ValueError(f"AttrOP schedule needs {total} images per identity, only {images_per_identity} requested")
        targets: list[float | None] = [None] * (images_per_identity - total)
        for count, yaw in self.groups:
            targets += [float(yaw)] * count
        return targets


@dataclass
class Vec2FacePipelineOutput(BaseOutput):
    """Images plus per-image metadata (all arrays have one entry per image, identity-major order).

    labels: global identity index; image_index: index within the identity; sigma: perturbation
    level; cos_to_identity: cosine of the image's vector to its identity vector; attrop_target_yaw:
    NaN for plain images; yaw / quality: measured by the pose / quality models where AttrOP ran
    (NaN elsewhere); attrop_success: AttrOP met its criteria (False for plain images).
    timings: seconds spent per stage of the call (sample, refine, perturb, decode, attrop).
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
        attrop: AttrOPSchedule | None = None,
        refine_identities: AttrOPConfig | None = None,
        seed: int = 0,
        identity_offset: int = 0,
        output_type: str = "pil",
        batch_size: int = 32,
        progress: bool = True,
        on_images: Callable[[int], None] | None = None,
        precision: str = "fp32",
    ) -> Vec2FacePipelineOutput:
        """Generate ``images_per_identity`` faces for each identity.

        Identities are ``identity_vectors`` ([N, 512], global indices ``identity_offset + i``) or
        ``num_identities`` fresh samples from the prior with pairwise cosine ≤ ``tau``.
        ``refine_identities`` runs the official identity-refinement AttrOP pass (quality only) first.
        ``on_images(n)`` is called as images are finished (for a caller's progress bar).
        ``precision`` "bf16"/"fp16" runs the networks under autocast (opt-in: changes pixels by rounding).
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        warn_if_slow_precision(precision, self.device)  # bf16 without native kernels: many times slower
        autocast = torch.autocast(self.device.type, dtype=PRECISIONS[precision] or torch.bfloat16, enabled=precision != "fp32")
        clock = StageTimer(self.device)
        # 1. identities (section 3.2)
        if identity_vectors is None:
            if num_identities is None:
                raise ValueError("pass identity_vectors or num_identities")
            with clock.stage("sample"):
                identity_vectors = self.sample_identities(num_identities, tau=tau, seed=seed).vectors
        identities = torch.as_tensor(np.asarray(identity_vectors) if isinstance(identity_vectors, np.ndarray) else identity_vectors)
        identities = identities.float().to(self.device)
        # 2. optional refinement: AttrOP towards quality only, the identity being its own target
        if refine_identities is not None:
            with clock.stage("refine"):
                identities = self.refine(identities, refine_identities, seed=seed, identity_offset=identity_offset, batch_size=batch_size)
        # 3. perturbation into per-image vectors
        with clock.stage("perturb"):
            perturbed = perturb(
                identities, images_per_identity, sigmas=sigmas, fractions=fractions,
                min_similarity=min_similarity, seed=seed, identity_offset=identity_offset,
            )
        vectors = perturbed.vectors.to(self.device)
        labels = perturbed.identity_index.cpu()
        image_index = perturbed.image_index.cpu()
        count = len(vectors)
        target_yaw = torch.full((count,), float("nan"))
        if attrop is not None:
            per_image = attrop.target_yaws(images_per_identity)
            target_yaw = torch.tensor([float("nan") if y is None else y for y in per_image]).repeat(len(identities))
        # uint8 as soon as a batch is done unless tensors were asked for: 4x less memory per image
        images = _ImageStore(count, as_uint8=output_type != "pt")
        yaw = torch.full((count,), float("nan"))
        quality = torch.full((count,), float("nan"))
        success = torch.zeros(count, dtype=torch.bool)

        def finished(rows: torch.Tensor) -> None:
            bar.update(len(rows))
            if on_images is not None:
                on_images(len(rows))

        with autocast, tqdm(total=count, disable=not progress, desc="Vec2Face", unit="img") as bar:
            # 4. plain decoding
            with clock.stage("decode"):
                for rows in torch.nonzero(target_yaw.isnan()).flatten().split(batch_size):
                    images.put(rows, self.decode(vectors[rows], labels[rows], image_index[rows], seed=seed))
                    finished(rows)
            # 5. AttrOP for the scheduled pose images (section 3.3)
            with clock.stage("attrop"):
                for target in target_yaw[~target_yaw.isnan()].unique().tolist():
                    config = AttrOPConfig(**{**attrop.config.__dict__, "target_yaw": target})
                    for rows in torch.nonzero(target_yaw == target).flatten().split(batch_size):
                        result = self.steer(vectors[rows], identities[labels[rows] - identity_offset], labels[rows], image_index[rows], config, seed=seed)
                        vectors[rows] = result.vectors.to(vectors.dtype)
                        images.put(rows, result.images)
                        yaw[rows], quality[rows], success[rows] = result.yaw, result.quality, result.success
                        finished(rows)

        cos = cosine(vectors, identities[labels - identity_offset]).cpu()
        return Vec2FacePipelineOutput(
            images=images.result(output_type),
            labels=labels.numpy(),
            image_index=image_index.numpy(),
            sigma=perturbed.sigma.cpu().numpy(),
            cos_to_identity=cos.numpy(),
            attrop_target_yaw=target_yaw.numpy(),
            attrop_success=success.numpy(),
            yaw=yaw.numpy(),
            quality=quality.numpy(),
            identity_vectors=identities.cpu(),
            vectors=vectors.detach().cpu(),
            timings=clock.as_dict(),
        )

    def sample_identities(self, num_identities: int, *, tau: float = 0.3, seed: int = 0, exclude=None, exclude_tau: float = 0.4, progress: bool = False):
        """Identity vectors from the prior with pairwise cosine ≤ tau (see :func:`identity.sample_identities`)."""
        if self.prior is None:
            raise ValueError(
                "this pipeline has no identity prior: fit one on real identity features "
                "(Vec2FacePipeline.from_official(folder, prior_features=features) or "
                "pipe.prior = IdentityPrior.from_features(features)) or pass identity_vectors"
            )
        return sample_identities(self.prior, num_identities, tau=tau, seed=seed, exclude=exclude, exclude_tau=exclude_tau, progress=progress)

    def decode(self, vectors: torch.Tensor, labels: torch.Tensor, image_index: torch.Tensor, *, seed: int, stream: int = seeding.STREAM_MASK, iteration: int | None = None, network: Vec2Face | None = None) -> torch.Tensor:
        """Vectors -> images [B,3,112,112] (unclipped), each with its own keyed mask generator.
        ``network`` replaces the generator on the gradient path (AttrOP passes its inference view)."""
        keys = [(seed, stream, int(i), int(j)) + (() if iteration is None else (iteration,)) for i, j in zip(labels, image_index)]
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

    def steer(self, vectors, identity_vectors, labels, image_index, config: AttrOPConfig, *, seed: int, stream: int = seeding.STREAM_ATTROP_MASK):
        """AttrOP on a batch of vectors, with per-(identity, image, iteration) masks."""
        missing = [name for name in ("recognizer", "quality") if getattr(self, name) is None]
        if config.target_yaw is not None and self.pose is None:
            missing.append("pose")
        if missing:
            raise ValueError(f"AttrOP needs the {', '.join(missing)} component(s); load a pipeline that has them")

        # frozen copies laid out for many forward + input-backward passes (BatchNorm folded, channels-last)
        generator, recognizer, quality = (inference_view(m) for m in (self.generator, self.recognizer, self.quality))
        pose = inference_view(self.pose) if self.pose is not None else None

        def decode(v, rows, iteration):
            return self.decode(v, labels[rows.cpu()], image_index[rows.cpu()], seed=seed, stream=stream, iteration=iteration, network=generator)

        yaw_fn = (lambda images: pose.predict_euler(images)[:, 1]) if pose is not None else None
        return attrop(
            vectors, identity_vectors, decode,
            identity_fn=recognizer,
            quality_fn=lambda images: magface_quality(quality, images),
            yaw_fn=yaw_fn,
            config=config,
            models=[m for m in (self.generator, self.recognizer, self.quality, self.pose) if m is not None],
        )

    def refine(self, identities: torch.Tensor, config: AttrOPConfig, *, seed: int, identity_offset: int = 0, batch_size: int = 32) -> torch.Tensor:
        """The official identity-refinement step: AttrOP towards quality only, each identity its own target."""
        config = AttrOPConfig(**{**config.__dict__, "target_yaw": None})
        labels = torch.arange(len(identities)) + identity_offset
        refined = identities.clone()
        for rows in torch.arange(len(identities)).split(batch_size):
            result = self.steer(identities[rows], identities[rows], labels[rows], torch.zeros(len(rows), dtype=torch.long), config, seed=seed, stream=seeding.STREAM_REFINE_MASK)
            refined[rows] = result.vectors.to(refined.dtype)
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

    def variations(self, images, images_per_identity: int = 8, sigma: float = 0.2, seed: int = 0, output_type: str = "pil", batch_size: int = 32):
        """New images of the people in ``images`` (the official reference mode: one sigma level)."""
        features = self.identity_features(images)
        return self(features, images_per_identity=images_per_identity, sigmas=(sigma,), fractions=(1.0,),
                    min_similarity=0.0, seed=seed, output_type=output_type, batch_size=batch_size, progress=False)

    def interpolate(self, a: torch.Tensor, b: torch.Tensor, steps: int = 8, seed: int = 0, output_type: str = "pil"):
        """Faces along the straight line from vector ``a`` to ``b`` (norm interpolated too), one mask for all steps."""
        a, b = a.reshape(1, -1).float(), b.reshape(1, -1).float()
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
            raise FileNotFoundError(f"{folder}: no {OFFICIAL_FILES['generator']}; expected the official Vec2Face layout")
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
        non-released generator size); otherwise they go to diffusers. The official repo id fetches only the four weight files and the prior features (the repo
        also holds a 42 GB training LMDB). Offline, an unreachable repo id raises an error that
        says how to pass a local folder instead.
        """
        name = str(pretrained_model_name_or_path)
        if name in PRESETS:
            return cls.from_preset(name)
        path = Path(name).expanduser()
        if path.is_dir():
            if (path / OFFICIAL_FILES["generator"]).exists():
                return cls.from_official(path, prior_features=prior_features, **kwargs)
            return super().from_pretrained(path, **kwargs)
        if path.exists() or name.count("/") != 1:
            raise FileNotFoundError(f"{name}: not a folder, preset ({', '.join(PRESETS)}) or Hub repo id (owner/name)")
        try:
            if name == OFFICIAL_REPO_ID:
                from huggingface_hub import snapshot_download

                local = snapshot_download(name, allow_patterns=[*OFFICIAL_FILES.values(), f"*{OFFICIAL_PRIOR_FEATURES}"])
                return cls.from_official(local, prior_features=prior_features)
            return super().from_pretrained(name, **kwargs)
        except Exception as err:
            if not _is_hub_unreachable(err):
                raise
            raise OSError(
                f"Could not reach the Hugging Face Hub for {name!r} ({type(err).__name__}). Download the repository "
                f"elsewhere (e.g. `huggingface-cli download {name} --local-dir Vec2Face`) and pass the local folder: "
                f"Vec2FacePipeline.from_pretrained('Vec2Face'). Unset HF_HUB_OFFLINE if you meant to go online."
            ) from err

    @classmethod
    def from_preset(cls, name: str = "random-tiny", seed: int = 0) -> "Vec2FacePipeline":
        """A complete small pipeline with RANDOM weights, built offline in seconds, for tests and smoke runs.

        Its images are not faces; datasets built with it are labelled ``random-tiny``.
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
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


def _is_hub_unreachable(err: BaseException) -> bool:
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    while err is not None:
        if isinstance(err, (LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError, ConnectionError, TimeoutError)):
            return True
        err = err.__cause__ or err.__context__
    return False
