"""The analysis report: every metric of :mod:`vec2face_model.analysis` as one JSON-ready dict,
and the files written from it (``report.json``, ``summary.md``, PNG plots, a sample grid)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..files import atomic_write, write_bytes_atomic, write_text_atomic
from ..image_io import encode_image
from ..verification import eer, tar_at_far
from .common import DEFAULT_BLOCK_SIZE, _as_features, _as_labels
from .identities import identity_centers, intra_class_cosines, leakage, max_neighbour_cosines, separability_curve
from .pairs import genuine_impostor_scores

HISTOGRAM_BINS = 200  # over [-1, 1]: 0.01 wide

METRIC_DEFINITIONS = {
    "intra_class": "Cosine of each image to the centre of its own identity; images below the threshold count as intra-class noise (likely not that identity).",
    "inter_class": "For each identity, the largest cosine between its centre and any other identity's centre; identities above the threshold count as inter-class noise (near-duplicate identities).",
    "separability": "Among the first k identities, the number with no earlier identity (smaller index) whose centre cosine exceeds the threshold (the official inter-separability measurement).",
    "eer": "Equal error rate of the verification scores: where the false-accept rate of impostor pairs equals the false-reject rate of genuine pairs, on the linearly interpolated empirical ROC.",
    "tar_at_far": "Fraction of genuine pairs scoring above the smallest threshold (an impostor score) at which at most a fraction far of impostor pairs score above it.",
    "leakage": "Identities whose centre has cosine above the threshold to at least one reference feature (e.g. the real identities the generator was trained on).",
}


def _describe(values: torch.Tensor) -> dict:
    values = values.detach().double().cpu().numpy()
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return {"count": 0, "mean": None, "std": None, "min": None, "p5": None, "p50": None, "p95": None, "max": None}
    p5, p50, p95 = np.percentile(values, [5, 50, 95])
    return {
        "count": int(len(values)),
        "mean": float(values.mean()),
        "std": float(values.std()),
        "min": float(values.min()),
        "p5": float(p5),
        "p50": float(p50),
        "p95": float(p95),
        "max": float(values.max()),
    }


def _histogram(values: torch.Tensor) -> dict:
    values = values.detach().double().cpu().numpy()
    values = np.clip(values[np.isfinite(values)], -1.0, 1.0)  # rounding can put cosines at 1 + 1e-7
    counts, _ = np.histogram(values, bins=HISTOGRAM_BINS, range=(-1.0, 1.0))
    return {"range": [-1.0, 1.0], "bins": HISTOGRAM_BINS, "counts": counts.tolist()}


def analyze_features(
    features,
    labels,
    reference=None,
    *,
    normalize_centers: bool = True,
    intra_threshold: float = 0.3,
    inter_threshold: float = 0.7,
    separability_threshold: float = 0.4,
    separability_counts=None,
    leakage_threshold: float = 0.4,
    num_pairs: int = 100_000,
    far: float = 1e-3,
    seed: int = 0,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> dict:
    """All metrics of this module as a JSON-serialisable report (with every count used).

    Identity order (for the separability curve) is ascending label. ``reference`` (features
    ``[R, D]``, e.g. real identity centres) enables the leakage check; without it
    ``report["leakage"]`` is None. Cosine histograms (200 bins over [-1, 1]) are included so that
    :func:`write_report` can plot without the features.
    """
    features = _as_features(features, "features")
    labels = _as_labels(labels, len(features))
    if len(features) == 0:
        raise ValueError("features is empty")
    centers, label_ids = identity_centers(features, labels, normalize=normalize_centers)
    images_per_identity = torch.bincount(torch.unique(labels, return_inverse=True)[1])

    intra = intra_class_cosines(features, labels, centers, label_ids, threshold=intra_threshold, block_size=block_size)
    inter = max_neighbour_cosines(centers, threshold=inter_threshold, block_size=block_size)
    curve = separability_curve(centers, separability_counts, threshold=separability_threshold, block_size=block_size)
    scores = genuine_impostor_scores(features, labels, num_pairs, seed, block_size=block_size)

    verification = {
        "num_genuine": scores.num_genuine,
        "num_impostor": scores.num_impostor,
        "genuine_available": scores.genuine_available,
        "impostor_available": scores.impostor_available,
        "seed": seed,
        "genuine": _describe(scores.genuine),
        "impostor": _describe(scores.impostor),
        "genuine_histogram": _histogram(scores.genuine),
        "impostor_histogram": _histogram(scores.impostor),
        "eer": None,
        "eer_threshold": None,
        "far": far,
        "tar": None,
        "tar_threshold": None,
        "far_achieved": None,
    }
    if scores.num_genuine and scores.num_impostor:
        verification["eer"], verification["eer_threshold"] = eer(scores.genuine, scores.impostor)
        at_far = tar_at_far(scores.genuine, scores.impostor, far)
        verification["tar"], verification["tar_threshold"], verification["far_achieved"] = at_far

    leak = None
    if reference is not None:
        found = leakage(centers, label_ids, reference, threshold=leakage_threshold, block_size=block_size)
        leak = {
            "threshold": leakage_threshold,
            "num_reference": len(torch.as_tensor(reference)),
            "num_leaked": len(found.leaked_ids),
            "fraction_leaked": len(found.leaked_ids) / len(centers),
            "leaked_ids": found.leaked_ids.tolist(),
            "leaked_max_cosines": found.leaked_max_cosines.tolist(),
            "leaked_reference_indices": found.leaked_reference_indices.tolist(),
            "max_cosine": _describe(found.max_cosines),
            "histogram": _histogram(found.max_cosines),
        }

    return {
        "num_images": len(features),
        "num_identities": len(centers),
        "feature_dim": features.shape[1],
        "images_per_identity": _describe(images_per_identity),
        "settings": {
            "normalize_centers": normalize_centers,
            "block_size": block_size,
            "num_pairs": num_pairs,
            "seed": seed,
        },
        "intra_class": {
            "threshold": intra_threshold,
            "num_images": len(intra.cosines),
            "num_below": intra.num_below,
            "fraction_below": intra.fraction_below,
            "cosine": _describe(intra.cosines),
            "histogram": _histogram(intra.cosines),
        },
        "inter_class": {
            "threshold": inter_threshold,
            "num_identities": len(inter.cosines),
            "num_above": inter.num_above,
            "fraction_above": inter.fraction_above,
            "max_neighbour_cosine": _describe(inter.cosines),
            "histogram": _histogram(inter.cosines),
        },
        "separability": {
            "threshold": separability_threshold,
            "counts": curve.counts,
            "unique": curve.unique,
            "fraction_unique": [u / k for k, u in zip(curve.counts, curve.unique)],
        },
        "verification": verification,
        "leakage": leak,
    }


def _format(value, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _summary_markdown(report: dict, plots: list[str]) -> str:
    intra, inter, sep = report["intra_class"], report["inter_class"], report["separability"]
    ver, leak = report["verification"], report["leakage"]
    per_identity = report["images_per_identity"]
    k, unique = sep["counts"][-1], sep["unique"][-1]
    rows = [
        ("Images / identities", f"{report['num_images']} / {report['num_identities']}", f"Feature rows and distinct labels; {_format(per_identity['mean'], 1)} images per identity on average (min {per_identity['min']:.0f}, max {per_identity['max']:.0f})."),
        (f"Intra-class noise (cos < {intra['threshold']})", f"{intra['fraction_below']:.2%} ({intra['num_below']} of {intra['num_images']} images)", METRIC_DEFINITIONS["intra_class"]),
        ("Mean intra-class cosine", _format(intra["cosine"]["mean"]), "Mean over images of the cosine to their identity centre."),
        (f"Inter-class noise (cos > {inter['threshold']})", f"{inter['fraction_above']:.2%} ({inter['num_above']} of {inter['num_identities']} identities)", METRIC_DEFINITIONS["inter_class"]),
        ("Mean max-neighbour cosine", _format(inter["max_neighbour_cosine"]["mean"]), "Mean over identities of the largest cosine to another identity centre."),
        (f"Separability (cos > {sep['threshold']})", f"{unique} of {k} unique ({unique / k:.2%})", METRIC_DEFINITIONS["separability"]),
        ("EER", f"{_format(ver['eer'])} at cos > {_format(ver['eer_threshold'])}", METRIC_DEFINITIONS["eer"] + f" {ver['num_genuine']} genuine / {ver['num_impostor']} impostor pairs."),
        (f"TAR @ FAR={ver['far']:g}", f"{_format(ver['tar'])} at cos > {_format(ver['tar_threshold'])}", METRIC_DEFINITIONS["tar_at_far"]),
    ]
    if leak is not None:
        rows.append(
            (f"Leakage (cos > {leak['threshold']})", f"{leak['num_leaked']} of {report['num_identities']} identities ({leak['fraction_leaked']:.2%})", METRIC_DEFINITIONS["leakage"] + f" {leak['num_reference']} reference features.")
        )
    lines = ["# Feature analysis", "", "| Metric | Value | Definition |", "|---|---|---|"]
    lines += [f"| {name} | {value} | {definition} |" for name, value, definition in rows]
    lines += ["", "## Separability curve", "", "| k | unique | fraction |", "|---|---|---|"]
    shown = sorted(set(np.linspace(0, len(sep["counts"]) - 1, min(len(sep["counts"]), 20)).round().astype(int).tolist()))
    lines += [f"| {sep['counts'][i]} | {sep['unique'][i]} | {sep['fraction_unique'][i]:.4f} |" for i in shown]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in plots]
    return "\n".join(lines) + "\n"


def _bar_histogram(axes, histogram: dict, label: str | None = None, alpha: float = 1.0) -> None:
    low, high = histogram["range"]
    edges = np.linspace(low, high, histogram["bins"] + 1)
    axes.stairs(histogram["counts"], edges, fill=True, alpha=alpha, label=label)


def _write_plots(report: dict, out_dir: Path) -> list[str]:
    try:
        from matplotlib.figure import Figure  # a Figure without pyplot leaves the global backend alone
    except ImportError as error:
        raise ImportError("plots need matplotlib: pip install 'hsface[build]', or call write_report(..., plots=False)") from error

    def save(name: str, draw) -> str:
        figure = Figure(figsize=(6.4, 4.0), dpi=100, layout="tight")
        draw(figure.add_subplot())
        with atomic_write(out_dir / name) as file:
            figure.savefig(file, format="png")  # Agg renders PNGs
        return name

    def thresholded(key: str, threshold_name: str, xlabel: str, ylabel: str, title: str):
        def draw(axes):  # a cosine histogram with the section's threshold marked
            section = report[key]
            _bar_histogram(axes, section["histogram"])
            axes.axvline(section["threshold"], color="red", linestyle="--", label=f"{threshold_name} {section['threshold']}")
            axes.set(xlabel=xlabel, ylabel=ylabel, title=title)
            axes.legend()

        return draw

    def separability(axes):
        section = report["separability"]
        axes.plot([0] + section["counts"], [0] + section["unique"], marker="." if len(section["counts"]) < 50 else None, label="unique")
        axes.plot([0, section["counts"][-1]], [0, section["counts"][-1]], color="grey", linestyle=":", label="all unique")
        axes.set(xlabel="first k identities", ylabel="unique identities", title=f"Separability (cos > {section['threshold']})")
        axes.legend()

    def verification(axes):
        section = report["verification"]
        _bar_histogram(axes, section["impostor_histogram"], label=f"impostor ({section['num_impostor']})", alpha=0.6)
        _bar_histogram(axes, section["genuine_histogram"], label=f"genuine ({section['num_genuine']})", alpha=0.6)
        if section["eer_threshold"] is not None:
            axes.axvline(section["eer_threshold"], color="red", linestyle="--", label=f"EER {section['eer']:.4f} at {section['eer_threshold']:.3f}")
        axes.set(xlabel="cosine", ylabel="pairs", title="Genuine / impostor scores")
        axes.legend()

    plots = [
        save("intra_class_cosine.png", thresholded("intra_class", "noise threshold", "cosine to identity centre", "images", "Intra-class cosine")),
        save("max_neighbour_cosine.png", thresholded("inter_class", "noise threshold", "max cosine to another identity centre", "identities", "Max-neighbour cosine")),
        save("separability_curve.png", separability),
        save("genuine_impostor.png", verification),
    ]
    if report["leakage"] is not None:
        plots.append(save("leakage.png", thresholded("leakage", "leakage threshold", "max cosine to a reference feature", "identities", "Leakage")))
    return plots


def write_report(report: dict, out_dir, *, plots: bool = True) -> list[Path]:
    """Write ``report.json``, ``summary.md`` and (with ``plots``) PNG plots; returns the paths.

    Plots (matplotlib, imported here): intra-class cosine histogram, max-neighbour histogram,
    separability curve, genuine/impostor histograms with the EER threshold, and the leakage
    histogram when the report has one. Everything is drawn from ``report`` alone.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "report.json", json.dumps(report, indent=2, allow_nan=False) + "\n")
    names = _write_plots(report, out_dir) if plots else []
    write_text_atomic(out_dir / "summary.md", _summary_markdown(report, names))
    return [out_dir / "report.json", out_dir / "summary.md"] + [out_dir / name for name in names]


def save_sample_grid(images_uint8, labels, path, ncols: int = 8) -> Path:
    """Save a PNG grid of ``[N, H, W, 3]`` uint8 images: one row per identity, ``ncols`` columns.

    Rows follow the labels' order of first appearance; within a row, images keep their input order
    (the first ``ncols`` of the identity); missing cells stay black.
    """
    images = images_uint8.cpu().numpy() if isinstance(images_uint8, torch.Tensor) else np.asarray(images_uint8)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise TypeError(f"images must be uint8 [N, H, W, 3] (RGB), got {images.dtype} {images.shape}")
    labels = _as_labels(labels, len(images)).tolist()
    if len(images) == 0:
        raise ValueError("no images to put in the grid")
    if ncols < 1:
        raise ValueError(f"ncols must be positive, got {ncols}")
    rows: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        rows.setdefault(label, []).append(index)
    height, width = images.shape[1:3]
    canvas = np.zeros((len(rows) * height, ncols * width, 3), dtype=np.uint8)
    for row, members in enumerate(rows.values()):
        for column, index in enumerate(members[:ncols]):
            canvas[row * height : (row + 1) * height, column * width : (column + 1) * width] = images[index]
    path = Path(path)
    write_bytes_atomic(path, encode_image(canvas, "png"))
    return path
