"""Face verification as reported in the Vec2Face paper (§4): LFW, CFP-FP, CPLFW, AgeDB-30, CALFW.

The protocol is insightface's (``recognition/arcface_torch/eval/verification.py``), re-stated on
cosine similarity:

1. Every image and its horizontal flip are embedded; the two raw embeddings are summed and then
   L2-normalised (:func:`embed_pairs`).
2. A pair's score is the cosine of its two embeddings; a pair is predicted "same" when
   ``score > threshold`` (strict, like insightface's ``distance < threshold``).
3. 10-fold cross-validation without shuffling (``sklearn.model_selection.KFold``): the threshold
   that maximises accuracy on 9 folds is applied to the held-out fold; the reported accuracy is the
   mean (and population std) over folds; TAR@FAR=1e-3 and the EER come with it
   (:mod:`vec2face_model.verification`, shared with the dataset analysis).

Differences from insightface, on purpose: thresholds are cosines, not squared distances
(``‖a−b‖² = 2 − 2·cos`` for unit vectors, so the decision rule is the same), and the candidate
thresholds are exact — the midpoints between consecutive distinct training scores — instead of a
0.01 grid on distances; ties go to the largest threshold, which is also what insightface's
``argmax`` over ascending distances picks. Accuracies can therefore differ slightly from
insightface's where its grid cannot separate two scores.

Data (:mod:`recipes.verification_sets`): insightface verification ``.bin`` files (read with a
restricted unpickler that never runs code) or a folder of images with a pairs file. Images must be
aligned 112x112 face crops. Models (:func:`recipes.backbones.load_backbone`): any ``train_fr``
output (``<output_dir>/backbone`` or a checkpoint folder: IResNets and ViTs), an official IResNet
``.pth``/``.safetensors`` file, or an ``IResNet.save_pretrained`` folder or Hub id.

Usage::

    python -m recipes.eval_fr --model ./runs/train_fr/backbone --data-dir ./faces_emore --out results.json
"""

from __future__ import annotations

if __package__ in (None, ""):  # run by path (`accelerate launch recipes/eval_fr.py`): import the checkout's package
    import sys
    from pathlib import Path

    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the checkout root instead of recipes/

import argparse
import json
import logging
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from recipes.backbones import load_backbone
from recipes.verification_sets import PAPER_SETS, EncodedImages, VerificationSet, load_sets
from vec2face_model.conventions import hflip, uint8_to_tensor
from vec2face_model.feature_math import cosine, l2_normalize
from vec2face_model.files import write_text_atomic
from vec2face_model.verification import verification_metrics

logger = logging.getLogger(__name__)

__all__ = ["embed_pairs", "evaluate", "format_markdown", "main", "pair_similarities", "results_to_json", "table_row"]

MISSING = "–"
EmbedFn = Callable[[torch.Tensor], torch.Tensor]


# -- protocol ------------------------------------------------------------------------------------


@torch.inference_mode()
def embed_pairs(
    embed_fn: EmbedFn,
    images: np.ndarray | EncodedImages,
    batch_size: int = 64,
    flip: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Unit-norm embeddings ``[N, D]`` (float32, CPU) of uint8 ``[N,112,112,3]`` RGB images.

    With ``flip``, the raw embeddings of each image and of its horizontal flip are summed before
    normalising (insightface's test-time augmentation).

    Args:
        embed_fn: maps canonical float32 ``[B,3,112,112]`` RGB in [-1, 1] to ``[B, D]``; put a
            model in eval mode before passing it.
        images: array or :class:`EncodedImages`, read ``batch_size`` at a time.
        device: where the batches are sent before ``embed_fn`` is called.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    chunks = []
    for start in range(0, len(images), batch_size):
        batch = uint8_to_tensor(images[start : start + batch_size])
        if device is not None:
            batch = batch.to(device)
        features = _call_embed(embed_fn, batch)
        if flip:
            features = features + _call_embed(embed_fn, hflip(batch))
        chunks.append(l2_normalize(features.float()).cpu())
    if not chunks:
        raise ValueError("no images to embed")
    return torch.cat(chunks)


def _call_embed(embed_fn: EmbedFn, batch: torch.Tensor) -> torch.Tensor:
    features = embed_fn(batch)
    if not isinstance(features, torch.Tensor) or features.dim() != 2 or len(features) != len(batch):
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"embed_fn must return a [B, D] tensor for a batch of {len(batch)} images, got {shape}")
    return features


def pair_similarities(embeddings: torch.Tensor) -> torch.Tensor:
    """Cosine of rows ``2i`` and ``2i+1``: ``[2P, D] -> [P]``."""
    if len(embeddings) % 2:
        raise ValueError(f"expected an even number of embeddings (two per pair), got {len(embeddings)}")
    return cosine(embeddings[0::2], embeddings[1::2])


def evaluate(
    embed_fn: EmbedFn,
    sets: dict[str, VerificationSet],
    batch_size: int = 64,
    flip: bool = True,
    n_folds: int = 10,
    far: float = 1e-3,
    device: torch.device | str | None = None,
) -> dict[str, dict]:
    """Embed each set and score it (:func:`vec2face_model.verification.verification_metrics`); returns ``{name: metrics}``."""
    results = {}
    for name, dataset in sets.items():
        embeddings = embed_pairs(embed_fn, dataset.images, batch_size=batch_size, flip=flip, device=device)
        results[name] = verification_metrics(pair_similarities(embeddings), dataset.issame, n_folds=n_folds, far=far)
        logger.info("%s: %.2f%% +- %.2f (%d pairs)", name, 100 * results[name]["accuracy"],
                    100 * results[name]["accuracy_std"], dataset.num_pairs)
    return results


# -- the paper's table ---------------------------------------------------------------------------


def table_row(results: dict[str, dict]) -> dict[str, float | None]:
    """Accuracy in % (2 decimals) per paper column plus ``Avg``; missing sets are None.

    ``Avg`` is the mean over the paper's sets that are present (unrounded values, then rounded),
    None if none is. Sets outside :data:`PAPER_SETS` get their own columns after ``Avg`` and are
    not averaged.
    """
    present = [100 * results[key]["accuracy"] for key in PAPER_SETS if key in results]
    row = {column: _percent(results.get(key)) for key, column in PAPER_SETS.items()}
    row["Avg"] = round(float(np.mean(present)), 2) if present else None
    row.update({key: _percent(metrics) for key, metrics in results.items() if key not in PAPER_SETS})
    return row


def _percent(metrics: dict | None) -> float | None:
    return None if metrics is None else round(100 * metrics["accuracy"], 2)


def format_markdown(results: dict[str, dict], label: str = "model") -> str:
    """The paper's table as Markdown: missing sets show ``–``; a note says which ``Avg`` left out."""
    row = table_row(results)
    header = ["Model", *row]
    cells = [label, *(MISSING if value is None else f"{value:.2f}" for value in row.values())]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * len(row)) + "|", "| " + " | ".join(cells) + " |"]
    missing = [column for key, column in PAPER_SETS.items() if key not in results]
    if missing:
        lines.append("")
        lines.append(f"Avg is over {len(PAPER_SETS) - len(missing)} of {len(PAPER_SETS)} sets; missing ({MISSING}): {', '.join(missing)}.")
    return "\n".join(lines)


def results_to_json(results: dict[str, dict], label: str = "model") -> dict:
    """JSON-ready summary: ``table`` (:func:`table_row`, missing sets null), ``missing``,
    ``average_over`` and the full per-set ``metrics``."""
    return {
        "model": label,
        "table": table_row(results),
        "missing": [column for key, column in PAPER_SETS.items() if key not in results],
        "average_over": [column for key, column in PAPER_SETS.items() if key in results],
        "metrics": results,
    }


# -- CLI -----------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="eval_fr", description="Face verification accuracy (LFW, CFP-FP, CPLFW, AgeDB-30, CALFW).")
    parser.add_argument("--model", required=True, help="train_fr backbone/checkpoint folder, IResNet save_pretrained "
                        "folder or Hub id, or official .pth/.safetensors file")
    parser.add_argument("--data-dir", required=True, help="folder with <set>.bin files or <set>/pairs.txt folders")
    parser.add_argument("--sets", nargs="+", default=list(PAPER_SETS), help=f"default: {' '.join(PAPER_SETS)}")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--resize", action="store_true", help="resize non-112x112 crops instead of refusing them")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    sets = load_sets(args.data_dir, args.sets, resize=args.resize)
    if not sets:
        parser.error(f"none of {args.sets} found in {args.data_dir} (expected <set>.bin or <set>/pairs.txt)")
    model = load_backbone(args.model).to(args.device)
    results = evaluate(model, sets, batch_size=args.batch_size, device=args.device)
    label = Path(args.model).name or str(args.model)
    summary = results_to_json(results, label=label)
    print(format_markdown(results, label=label))
    if args.out:
        write_text_atomic(args.out, json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
