"""What a saved or pushed Vec2FacePipeline carries besides its weights: the ``pipeline.py`` that lets
``diffusers.DiffusionPipeline.from_pretrained`` find the class, and the Hub model card.

diffusers resolves a pipeline class from ``model_index.json``'s ``_class_name``. A plain name must be
an attribute of the ``diffusers`` package; the list form ``[module_file, class_name]`` (diffusers'
convention for pipelines that live in their repository) names ``<folder>/<module_file>.py``, which
diffusers imports when the caller passes ``trust_remote_code=True``. hsface's ``pipeline.py`` only
imports the class from the installed ``hsface`` package, so the code that runs is the package's.
"""

from __future__ import annotations

from huggingface_hub import ModelCard, ModelCardData

REMOTE_CODE_MODULE = "pipeline"  # diffusers' default custom-pipeline file name is pipeline.py
OFFICIAL_REPO_ID = "BooBooWu/Vec2Face"
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
