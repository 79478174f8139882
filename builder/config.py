"""HSFace generation configs: every parameter of the paper's recipe, explicit and recorded in the output."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import datasets

from vec2face_model.attrop import AttrOPConfig
from vec2face_model.errors import InvalidInputError
from vec2face_model.pipeline_vec2face import OFFICIAL_REPO_ID, PRECISIONS, AttrOPSchedule

# Fields that change the dataset's bytes: a folder built with other values is another dataset, and
# a rerun with other values is refused. batch_size is one of them: identity refinement and AttrOP run
# Adam on the vectors, whose first steps move by about lr * sign(gradient), so the last-bit rounding
# differences of differently shaped batches grow into visibly different images (and early stopping
# changes which samples share a batch). Shards are the unit of work, so identities_per_shard too.
CONTENT_FIELDS = (
    "num_identities", "images_per_identity", "tau", "sigmas", "fractions", "min_similarity",
    "attrop_groups", "attrop_quality", "attrop_max_steps", "attrop_lr", "refine_identities",
    "refine_max_steps", "seed", "identities_per_shard", "batch_size", "image_format", "precision",
    "torch_compile", "model",
)


def steers_beyond_yaw(attrop_groups) -> bool:
    """Whether AttrOP groups ``(count, yaw[, pitch[, roll]])`` target pitch or roll."""
    return any(t is not None for group in attrop_groups for t in group[2:])


@dataclass
class HSFaceConfig(datasets.BuilderConfig):
    """One HSFace config. Defaults are the paper's recipe (HSFace10K..300K, 50 images per identity):
    identity sampling with tau 0.3 -> identity refinement (AttrOP, quality 27) -> perturbation mix
    sigma 0.3/0.5/0.7 for 40/40/20 % -> AttrOP pose images (20 at yaw 60, 10 at yaw 85, quality 27)
    replacing plain ones.
    """

    num_identities: int = 10_000
    images_per_identity: int = 50
    tau: float = 0.3
    sigmas: tuple[float, ...] = (0.3, 0.5, 0.7)
    fractions: tuple[float, ...] = (0.4, 0.4, 0.2)
    min_similarity: float = 0.5
    attrop_groups: tuple[tuple, ...] = ((20, 60.0), (10, 85.0))  # (count, yaw[, pitch[, roll]]) per group
    attrop_quality: float = 27.0
    attrop_max_steps: int = 30
    attrop_lr: float = 0.1
    refine_identities: bool = True
    refine_max_steps: int = 30
    seed: int = 0
    identities_per_shard: int = 200  # 10k images: ~380 MB of pixels in memory, ~50 MB of JPEG per shard
    batch_size: int = 32
    image_format: str = "jpeg"  # "jpeg" (quality 95) or "png" (lossless, ~5x larger)
    precision: str = "fp32"  # "bf16"/"fp16": autocast, ~2x faster on bf16-capable hardware, pixels differ by rounding
    torch_compile: bool = False  # plain decoding through torch.compile: faster, pixels differ by rounding
    model: str = OFFICIAL_REPO_ID

    def __post_init__(self):
        super().__post_init__()
        self.sigmas = tuple(float(s) for s in self.sigmas)
        self.fractions = tuple(float(f) for f in self.fractions)
        # (count, yaw[, pitch[, roll]]); None leaves an angle free
        self.attrop_groups = tuple((int(g[0]), *(None if t is None else float(t) for t in g[1:])) for g in self.attrop_groups)
        for name in ("num_identities", "images_per_identity", "identities_per_shard", "batch_size"):
            if getattr(self, name) < 1:
                raise InvalidInputError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.image_format not in ("jpeg", "png"):
            raise InvalidInputError(f"image_format must be 'jpeg' or 'png', got {self.image_format!r}")
        if self.precision not in PRECISIONS:
            raise InvalidInputError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.attrop_groups:
            self.attrop_schedule().pose_targets(self.images_per_identity)  # validates the schedule fits

    @property
    def steers_beyond_yaw(self) -> bool:
        """Whether the AttrOP schedule targets pitch or roll (the shards then have those columns)."""
        return steers_beyond_yaw(self.attrop_groups)

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_identities / self.identities_per_shard)

    @property
    def num_images(self) -> int:
        return self.num_identities * self.images_per_identity

    def shard_identities(self, shard: int) -> range:
        """Global identity indices of a shard (shards are contiguous identity ranges)."""
        if not 0 <= shard < self.num_shards:
            raise InvalidInputError(f"shard {shard} out of range 0..{self.num_shards - 1}")
        start = shard * self.identities_per_shard
        return range(start, min(start + self.identities_per_shard, self.num_identities))

    def attrop_schedule(self) -> AttrOPSchedule | None:
        if not self.attrop_groups:
            return None
        return AttrOPSchedule(groups=self.attrop_groups, config=AttrOPConfig(
            target_quality=self.attrop_quality, max_steps=self.attrop_max_steps, lr=self.attrop_lr))

    def refine_config(self) -> AttrOPConfig | None:
        if not self.refine_identities:
            return None
        return AttrOPConfig(target_yaw=None, target_quality=self.attrop_quality, max_steps=self.refine_max_steps, lr=self.attrop_lr)

    def content(self) -> dict:
        """The parameters that define the dataset (JSON-ready)."""
        values = {f: getattr(self, f) for f in CONTENT_FIELDS}
        return {k: [list(x) if isinstance(x, tuple) else x for x in v] if isinstance(v, tuple) else v for k, v in values.items()}

    def replace(self, **changes) -> "HSFaceConfig":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise InvalidInputError(f"unknown config field(s): {sorted(unknown)}")
        return dataclasses.replace(self, **changes)


_PAPER_SIZES = {"10k": 10_000, "20k": 20_000, "100k": 100_000, "200k": 200_000, "300k": 300_000}

# The HSFace dataset configs by name (`hsface build --config NAME`, `load_dataset(folder, NAME)`).
HSFACE_CONFIGS: dict[str, HSFaceConfig] = {
    name: HSFaceConfig(name=name, num_identities=n, description=f"HSFace{name.upper()}: {n:,} identities x 50 images (paper recipe)")
    for name, n in _PAPER_SIZES.items()
}
# Smoke-run config: a few identities x a few images, one AttrOP image each, short AttrOP budgets.
HSFACE_CONFIGS["tiny"] = HSFaceConfig(
    name="tiny", num_identities=4, images_per_identity=5, attrop_groups=((1, 60.0),), attrop_max_steps=2,
    refine_max_steps=2, identities_per_shard=2, batch_size=8,
    description="Smoke-test config: 4 identities x 5 images (1 AttrOP pose image each), 2 shards",
)


def get_config(name: str, **overrides) -> HSFaceConfig:
    if name not in HSFACE_CONFIGS:
        raise InvalidInputError(f"unknown HSFace config {name!r}; available: {', '.join(HSFACE_CONFIGS)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return HSFACE_CONFIGS[name].replace(**overrides) if overrides else HSFACE_CONFIGS[name]


def __getattr__(name: str):
    # "preset" meant three other things too (pipeline weights, recipe training settings); the old name stays for a while
    if name == "PRESETS":
        import warnings

        warnings.warn("builder.config.PRESETS is deprecated; use builder.config.HSFACE_CONFIGS", DeprecationWarning, stacklevel=2)
        return HSFACE_CONFIGS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
