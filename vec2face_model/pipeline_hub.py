"""Vec2FacePipeline's files and the Hub: the ``pipeline.py`` that lets
``diffusers.DiffusionPipeline.from_pretrained`` find the class, the Hub model card, the checks
diffusers' loader does not make (unreadable or foreign weight files), and the offline advice.

diffusers resolves a pipeline class from ``model_index.json``'s ``_class_name``. A plain name must be
an attribute of the ``diffusers`` package; the list form ``[module_file, class_name]`` (diffusers'
convention for pipelines that live in their repository) names ``<folder>/<module_file>.py``, which
diffusers imports when the caller passes ``trust_remote_code=True``. hsface's ``pipeline.py`` only
imports the class from the installed ``hsface`` package, so the code that runs is the package's.
"""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from .weights import WeightsLoadError

REMOTE_CODE_MODULE = "pipeline"  # diffusers' default custom-pipeline file name is pipeline.py
OFFICIAL_REPO_ID = "BooBooWu/Vec2Face"
# What from_pretrained fetches of the official repo (it also holds a 42 GB training LMDB).
OFFICIAL_FILES = {
    "generator": "weights/vec2face_generator.pth",
    "recognizer": "weights/arcface-r100-glint360k.pth",
    "quality": "weights/magface-r100-glint360k.pth",
    "pose": "weights/6DRepNet_300W_LP_AFLW2000.pth",
}
OFFICIAL_PRIOR_FEATURES = "center_feature_examples.npy"
CARD_TAGS = ["vec2face", "hsface", "face-generation", "synthetic-data", "face-recognition"]


def remote_code(pipeline_class: type) -> str:
    """The ``pipeline.py`` written beside ``model_index.json``: re-exports ``pipeline_class``."""
    return (
        f'"""Loader shim written by hsface: diffusers imports this file to find {pipeline_class.__name__}.\n\n'
        "The pipeline's code is the installed hsface package (pip install hsface); nothing else runs here.\n"
        '"""\n\n'
        f"from {pipeline_class.__module__} import {pipeline_class.__name__}\n\n"
        f'__all__ = ["{pipeline_class.__name__}"]\n'
    )


def model_card(repo_id: str, *, preset: str | None, components: dict[str, str], has_prior: bool) -> ModelCard:
    """The Hub card of a pushed pipeline: license, base model, how to load and call it, limitations.

    ``components`` maps component name -> a short description (class, parameter count).
    """
    random_weights = preset is not None
    data = ModelCardData(
        license="mit",
        library_name="diffusers",
        base_model=None if random_weights else OFFICIAL_REPO_ID,
        tags=CARD_TAGS + (["random-weights"] if random_weights else []),
    )
    warning = (
        f"> **Warning: random weights.** This is the `{preset}` preset of hsface: its networks are randomly "
        "initialised, for tests and smoke runs. Its images are not faces.\n\n"
        if random_weights
        else ""
    )
    rows = "\n".join(f"| `{name}` | {text} |" for name, text in components.items())
    sampling = (
        "out = pipe(num_identities=4, images_per_identity=8, generator=torch.Generator().manual_seed(0))"
        if has_prior
        else "out = pipe(identity_vectors, images_per_identity=8, generator=torch.Generator().manual_seed(0))  # [N, 512] ArcFace features"
    )
    text = f"""---
{data.to_yaml()}
---

# Vec2Face pipeline ({repo_id})

{warning}A [Vec2Face](https://huggingface.co/{OFFICIAL_REPO_ID}) (ICLR 2025, "Vec2Face: Scaling Face Dataset Generation
with Loosely Constrained Vectors") pipeline in diffusers format, saved by hsface
(official code: [HaiyuWu/Vec2Face](https://github.com/HaiyuWu/Vec2Face)): identity vectors in, 112x112 aligned faces out, with
identity sampling, perturbation and AttrOP pose/quality steering.

| component | |
|---|---|
{rows}

## Usage

Needs the hsface package installed (`pip install hsface`); `pipeline.py` in this repository only
imports its `Vec2FacePipeline`.

```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{repo_id}", trust_remote_code=True)
# or: from vec2face_model import Vec2FacePipeline; pipe = Vec2FacePipeline.from_pretrained("{repo_id}")
{sampling}
out.images[0].save("face.png")
```

## License and limitations

The Vec2Face code and weights are released under the MIT license. The identity and quality models
(ArcFace / MagFace IResNet-100) were trained on Glint360K, whose terms restrict use to
non-commercial research: check them before using these models or their outputs elsewhere.
Generated faces are synthetic but inherit the biases of the training data (the Vec2Face+ paper
reports uneven demographic coverage); do not use them to identify real people.

## Citation

```bibtex
@inproceedings{{wu2025vec2face,
  title={{Vec2Face: Scaling Face Dataset Generation with Loosely Constrained Vectors}},
  author={{Wu, Haiyu and Singh, Jaskirat and Tian, Sicong and Zheng, Liang and Bowyer, Kevin W.}},
  booktitle={{ICLR}},
  year={{2025}}
}}
```
"""
    return ModelCard(text)


def offline_advice(name: str, err: BaseException) -> str:
    """What to do when the Hub is unreachable: fetch only the needed files elsewhere (huggingface_hub's
    ``hf`` command), then pass the local folder."""
    if name == OFFICIAL_REPO_ID:
        files = " ".join([*OFFICIAL_FILES.values(), OFFICIAL_PRIOR_FEATURES])
        command, local = f"hf download {name} {files} --local-dir Vec2Face", "Vec2Face"
    else:
        local = name.split("/")[1]
        command = f"hf download {name} --local-dir {local}"
    offline = " HF_HUB_OFFLINE is set, so nothing was fetched: unset it to download." if _hub_offline() else ""
    return (
        f"Could not reach the Hugging Face Hub for {name!r} ({type(err).__name__}).{offline} On a machine with "
        f"network access run `{command}`, copy the folder here and pass the local folder: "
        f"Vec2FacePipeline.from_pretrained({local!r}), or `--model {local}` on the hsface command line."
    )


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def is_placeholder_card(card: ModelCard) -> bool:
    """diffusers' generated stand-in card: no metadata but its library name, template body."""
    metadata = {k: v for k, v in card.data.to_dict().items() if v is not None}
    return set(metadata) <= {"library_name"} and "automatically generated" in card.text


def _weight_files(folder: Path) -> dict[str, list[Path]]:
    """Component name -> its safetensors files, for the components ``model_index.json`` lists."""
    index = json.loads((folder / "model_index.json").read_text())
    return {
        name: sorted((folder / name).glob("*.safetensors"))
        for name, entry in index.items()
        if not name.startswith("_") and isinstance(entry, list) and entry[0] is not None
    }


def raise_for_unreadable_weights(folder: Path, err: BaseException) -> None:
    """Re-raise diffusers' load failure as WeightsLoadError naming the broken file, if one is."""
    from safetensors import safe_open

    if not (folder / "model_index.json").exists():
        return
    for files in _weight_files(folder).values():
        for file in files:
            try:
                with safe_open(str(file), "pt"):
                    pass
            except Exception as bad:  # noqa: BLE001 - any failure to open is what we report
                raise WeightsLoadError(
                    f"{file}: not a readable safetensors file (truncated or corrupt?): {bad}. Save or download "
                    "the pipeline again."
                ) from err


def check_component_weights(folder: Path, pipe: "Vec2FacePipeline") -> None:  # noqa: F821 - annotation only
    """WeightsLoadError unless each component's files hold exactly its state-dict keys (diffusers
    only warns about missing keys and initialises them randomly)."""
    from safetensors import safe_open

    for name, files in _weight_files(folder).items():
        module = getattr(pipe, name, None)
        if module is None or not files:
            continue
        stored = set()
        for file in files:
            with safe_open(str(file), "pt") as handle:
                stored |= set(handle.keys())
        expected = set(module.state_dict())
        missing, unexpected = sorted(expected - stored), sorted(stored - expected)
        if missing or unexpected:
            shown = files[0] if len(files) == 1 else folder / name
            raise WeightsLoadError(
                f"{shown} does not hold {type(module).__name__} weights: {len(missing)} missing key(s) "
                f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}. Is this the right file for "
                "this component, and does its config.json match it?"
            )


def is_hub_unreachable(err: BaseException) -> bool:
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    while err is not None:
        if isinstance(err, (LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError, ConnectionError, TimeoutError)):
            return True
        err = err.__cause__ or err.__context__
    return False
