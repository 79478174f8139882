"""The HSFace Hugging Face Datasets builder: one config per dataset size, explicit Features,
shards = contiguous identity ranges, every example keyed by (shard, index) deterministically.

Two ways to run it:

* ``HSFace(config_name="tiny", model="random-tiny").download_and_prepare()`` — the datasets-native
  way (Arrow cache; ``num_proc`` splits the shards between workers);
* ``hsface build tiny`` — the same examples written as a Hub repository of parquet shards,
  resumable and distributed (:mod:`builder.build`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial

import datasets
import numpy as np
import torch
from datasets.builder import Key

from vec2face_model.image_io import encode_image
from vec2face_model.pipeline_vec2face import Vec2FacePipeline, Vec2FacePipelineOutput

from .config import HSFACE_CONFIGS, HSFaceConfig

# Present only in configs whose AttrOP schedule steers pitch or roll, so the paper configs' shards
# keep their bytes (their pose images are steered in yaw alone).
POSE_BEYOND_YAW_COLUMNS = ("attrop_target_pitch", "attrop_target_roll", "pitch", "roll")


def _features(label: datasets.ClassLabel | datasets.Value, pose_beyond_yaw: bool = False) -> datasets.Features:
    pose = {
        "attrop_target_pitch": datasets.Value("float32"),  # signed degrees; null where not steered in pitch
        "attrop_target_roll": datasets.Value("float32"),  # absolute degrees; null where not steered in roll
        "pitch": datasets.Value("float32"),  # measured by the pose model where AttrOP ran, else null
        "roll": datasets.Value("float32"),  # likewise
    } if pose_beyond_yaw else {}
    return datasets.Features(
        {
            "image": datasets.Image(),
            "label": label,  # global identity index
            "image_index": datasets.Value("int32"),  # index of the image within its identity
            "sigma": datasets.Value("float32"),  # perturbation level of the image's vector
            "cos_to_identity": datasets.Value("float32"),  # cosine of the image's vector to the identity vector
            "attrop_target_yaw": datasets.Value("float32"),  # null for plain (non-AttrOP) images
            "attrop_success": datasets.Value("bool"),  # null for plain images
            "yaw": datasets.Value("float32"),  # measured by the pose model where AttrOP ran, else null
            "quality": datasets.Value("float32"),  # MagFace feature norm where AttrOP ran, else null
            **pose,
        }
    )


# A ClassLabel always lists its N names (datasets has no names-free form). The card's YAML carries
# them, and every load_dataset of any config in the repository parses that YAML:
# bench/bench_card_labels.py measured +0.6 s per load at 10k identities, +1.8 s at 20k, +8.9 s at
# 100k and +30 s at 300k (8.5 MB of YAML, past what the Hub's YAML validation accepts in practice).
# Configs above this size keep ``label`` as the int64 identity index; their card shows the cast.
CLASS_LABEL_MAX_IDENTITIES = 20_000


def hsface_features(num_identities: int, pose_beyond_yaw: bool = False) -> datasets.Features:
    """The columns users see. ``label`` (global identity index) is a ``ClassLabel`` of
    ``num_identities`` classes, so ``features["label"].num_classes`` and
    ``train_test_split(stratify_by_column="label")`` work; above :data:`CLASS_LABEL_MAX_IDENTITIES`
    it is the plain int64 index (``cast_column("label", ClassLabel(num_classes=N))`` makes the ClassLabel)."""
    if num_identities <= CLASS_LABEL_MAX_IDENTITIES:
        return _features(datasets.ClassLabel(num_classes=num_identities), pose_beyond_yaw)
    return _features(datasets.Value("int64"), pose_beyond_yaw)


def features(config: HSFaceConfig) -> datasets.Features:
    """:func:`hsface_features` of a config."""
    return hsface_features(config.num_identities, config.steers_beyond_yaw)


# The columns as stored in the parquet shards: ``label`` as ClassLabel's storage type (int64). A
# ClassLabel schema would carry its N names in every shard, twice (parquet keeps the schema metadata
# and the Arrow schema): 6.7 MB per shard at 300k identities. The card's ``dataset_info`` declares the
# ClassLabel, which ``load_dataset`` applies to the shards.
def shard_features(config: HSFaceConfig) -> datasets.Features:
    return _features(datasets.Value("int64"), config.steers_beyond_yaw)


CITATION = """@inproceedings{wu2025vec2face,
  title={Vec2Face: Scaling Face Dataset Generation with Loosely Constrained Vectors},
  author={Wu, Haiyu and Singh, Jaskirat and Tian, Sicong and Zheng, Liang and Bowyer, Kevin W.},
  booktitle={ICLR},
  year={2025}
}"""


def load_pipeline(model: str) -> Vec2FacePipeline:
    """A preset name (``random-tiny``), a local folder (converted or official layout) or a Hub repo id."""
    return Vec2FacePipeline.from_pretrained(model)


def configure_pipeline(pipe: Vec2FacePipeline, config: HSFaceConfig) -> Vec2FacePipeline:
    """Apply the config's execution options that live on the pipeline."""
    if config.torch_compile:
        pipe.compile_generator()
    return pipe


def sample_config_identities(pipe: Vec2FacePipeline, config: HSFaceConfig, progress: bool = False) -> torch.Tensor:
    """The config's identity vectors [num_identities, 512]: a pure function of (prior, tau, seed)."""
    return pipe.sample_identities(config.num_identities, tau=config.tau, seed=config.seed, progress=progress).vectors


def _optional(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def generate_shard(
    pipe: Vec2FacePipeline,
    config: HSFaceConfig,
    identities: torch.Tensor,
    shard: int,
    on_images: Callable[[int], None] | None = None,
) -> Vec2FacePipelineOutput:
    """Pixels (uint8) and metadata of one shard's images, in (label, image_index) order."""
    ids = config.shard_identities(shard)
    return pipe(
        identities[ids.start : ids.stop],
        images_per_identity=config.images_per_identity,
        sigmas=config.sigmas,
        fractions=config.fractions,
        min_similarity=config.min_similarity,
        attrop_schedule=config.attrop_schedule(),
        refine_identities=config.refine_config(),
        seed=config.seed,
        identity_offset=ids.start,
        output_type="np",
        batch_size=config.batch_size,
        progress=False,
        on_images=on_images,
        precision=config.precision,
    )


def shard_examples(out: Vec2FacePipelineOutput, image_format: str, map_fn: Callable = map) -> list[dict]:
    """Dataset rows of a generated shard, images encoded; ``map_fn`` may be a thread pool's ``map``
    (PNG's zlib step runs outside the GIL)."""
    encoded = map_fn(partial(encode_image, image_format=image_format), out.images)
    targets = [out.attrop_target_yaw, out.attrop_target_pitch, out.attrop_target_roll]
    targets = np.stack([t if t is not None else np.full(len(out.labels), np.nan) for t in targets], axis=1)
    beyond_yaw = bool(np.isfinite(targets[:, 1:]).any())  # the same for every shard of a config
    examples = []
    for r, image in enumerate(encoded):
        steered = bool(np.isfinite(targets[r]).any())
        pose = {"attrop_target_pitch": _optional(targets[r, 1]), "attrop_target_roll": _optional(targets[r, 2]),
                "pitch": _optional(out.pitch[r]), "roll": _optional(out.roll[r])} if beyond_yaw else {}
        examples.append(
            {
                "image": {"bytes": image, "path": None},
                "label": int(out.labels[r]),
                "image_index": int(out.image_index[r]),
                "sigma": float(out.sigma[r]),
                "cos_to_identity": float(out.cos_to_identity[r]),
                "attrop_target_yaw": _optional(out.attrop_target_yaw[r]),
                "attrop_success": bool(out.attrop_success[r]) if steered else None,
                "yaw": _optional(out.yaw[r]),
                "quality": _optional(out.quality[r]),
                **pose,
            }
        )
    return examples


def generate_shard_examples(pipe, config: HSFaceConfig, identities: torch.Tensor, shard: int, on_images=None) -> list[dict]:
    """All examples of one shard, in (label, image_index) order."""
    return shard_examples(generate_shard(pipe, config, identities, shard, on_images), config.image_format)


class HSFace(datasets.GeneratorBasedBuilder):
    """HSFace: synthetic face-recognition training data generated with Vec2Face."""

    BUILDER_CONFIG_CLASS = HSFaceConfig
    BUILDER_CONFIGS = list(HSFACE_CONFIGS.values())
    DEFAULT_CONFIG_NAME = "tiny"

    def _info(self) -> datasets.DatasetInfo:
        return datasets.DatasetInfo(
            description=self.config.description or "",
            features=features(self.config),
            citation=CITATION,
            homepage="https://github.com/HaiyuWu/Vec2Face",
        )

    def _split_generators(self, dl_manager):
        # A list-valued gen_kwarg: datasets splits the shards between num_proc workers.
        return [datasets.SplitGenerator(name=datasets.Split.TRAIN, gen_kwargs={"shards": list(range(self.config.num_shards))})]

    def _generate_examples(self, shards: list[int]) -> Iterator[tuple[Key, dict]]:
        pipe = configure_pipeline(load_pipeline(self.config.model), self.config)
        identities = sample_config_identities(pipe, self.config)
        for shard in shards:
            for index, example in enumerate(generate_shard_examples(pipe, self.config, identities, shard)):
                yield Key(shard, index), example
