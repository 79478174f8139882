"""``hsface demo``: look before you build — a local Gradio app over one Vec2FacePipeline.

    hsface demo --model random-tiny          # offline, random weights (not faces): a smoke run
    hsface demo                              # the official weights (Hub cache or download)

Tabs and their named endpoints (scriptable with ``gradio_client``; every call is a pure function
of its inputs, the identity ``i`` of (tau, seed) being ``pipe.sample_identities(i + 1, tau, seed)[i]``):

* ``/sample`` (n, tau, seed) -> one face per identity + heatmap of their pairwise cosines
* ``/vary`` (identity, sigma, n, tau, seed) -> n variations, each captioned with its cosine to the identity
* ``/pose`` (identity, yaw, pitch or None, quality, max_steps, n, tau, seed) -> AttrOP images + per-image success and reached angles
* ``/reference`` (photo, sigma, n, seed) -> the photo's aligned 112x112 crop + variations of that person
* ``/export`` () -> what the tabs show now, written as a ``load_dataset``-able folder (parquet + card)

Binds 127.0.0.1 unless ``--host`` says otherwise; ``--share`` (a public gradio.live link) is off
by default. Needs the ``[demo]`` extra (gradio); ``/reference`` also the detector weights
(see :mod:`vec2face_model.align`).
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import math
import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

__all__ = ["add_parser", "build_app", "export_view", "launch"]

VIEWS = ("sample", "vary", "pose", "reference")
MAX_IMAGES = 64  # per call: the demo is for looking, `hsface build` is for volume
POSE_CHUNK = 4  # images per AttrOP batch in /pose
# numeric columns of an export (NaN where a tab does not set them)
EXPORTED_NUMBERS = ("sigma", "cos_to_identity", "target_yaw", "yaw", "target_pitch", "pitch", "quality")
DEFAULT_EXPORT_DIR = "hsface-demo-exports"


def _require_gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no usage pings
    try:
        import gradio
    except ImportError as err:
        raise ImportError('hsface demo needs Gradio: pip install -e ".[demo]"') from err
    return gradio


def _check_count(name: str, value, low: int = 1, high: int = MAX_IMAGES) -> int:
    from vec2face_model.errors import InvalidInputError

    if value is None or float(value) != int(value) or not low <= int(value) <= high:
        raise InvalidInputError(f"{name} must be a whole number from {low} to {high}, got {value!r}")
    return int(value)


def _check_range(name: str, value, low: float, high: float) -> float:
    from vec2face_model.errors import InvalidInputError

    if value is None or not math.isfinite(float(value)) or not low <= float(value) <= high:
        raise InvalidInputError(f"{name} must be between {low} and {high}, got {value!r}")
    return float(value)


def _heatmap(similarity: np.ndarray, title: str):
    """A labelled pairwise-cosine heatmap as a PIL image (matplotlib's object API: no global state)."""
    from matplotlib.figure import Figure

    from vec2face_model.image_io import open_image

    size = 3.0 + 0.2 * len(similarity)
    figure = Figure(figsize=(min(size + 1.2, 9), min(size, 8)), dpi=80)
    axes = figure.add_subplot()
    shown = axes.imshow(similarity, vmin=-1, vmax=1, cmap="RdBu_r")
    axes.set_title(title, fontsize=8)
    axes.set_xlabel("identity")
    axes.set_ylabel("identity")
    figure.colorbar(shown, ax=axes, label="cosine")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return open_image(buffer.getvalue()).convert("RGB")


class DemoSession:
    """The demo's computations, free of Gradio (tested directly and through the app)."""

    def __init__(self, pipe, model_name: str = ""):
        self.pipe = pipe
        self.model_name = model_name

    def identities(self, count: int, tau: float, seed: int):
        tau = _check_range("tau", tau, -1.0, 1.0)
        return self.pipe.sample_identities(count, tau=tau, seed=int(seed), progress=True).vectors

    def identity(self, index, tau: float, seed: int):
        index = _check_count("identity", index, 0, 10_000)
        return self.identities(index + 1, tau, seed)[index : index + 1]

    def sample(self, n, tau, seed):
        import torch

        from vec2face_model.conventions import tensor_to_uint8, uint8_to_tensor
        from vec2face_model.feature_math import cosine_matrix

        n = _check_count("n", n, 1, 32)
        vectors = self.identities(n, tau, seed).to(self.pipe.device)
        index = torch.arange(n)
        images = tensor_to_uint8(self.pipe.decode(vectors, index, torch.zeros_like(index), seed=int(seed)).cpu())
        if self.pipe.recognizer is not None:  # how separated the decoded faces are, not just their vectors
            similarity = cosine_matrix(self.pipe.identity_features(uint8_to_tensor(images)).cpu())
            title = "faces (recognizer features)"
        else:
            similarity, title = cosine_matrix(vectors.cpu()), "identity vectors"
        off_diagonal = cosine_matrix(vectors.cpu()).masked_fill(torch.eye(n, dtype=torch.bool), float("nan"))
        bound = float(np.nanmax(off_diagonal.numpy())) if n > 1 else float("nan")
        rows = [dict(view="sample", identity=i, caption=f"identity {i}") for i in range(n)]
        return images, rows, _heatmap(similarity.numpy(), f"pairwise cosine: {title}\nidentity vectors: max {bound:.2f} (tau {float(tau):.2f})")

    def vary(self, identity, sigma, n, tau, seed):
        sigma = _check_range("sigma", sigma, 0.0, 2.0)
        n = _check_count("n", n)
        vector = self.identity(identity, tau, seed)
        out = self.pipe(vector, images_per_identity=n, sigmas=(sigma,), fractions=(1.0,), min_similarity=0.0,
                        seed=int(seed), identity_offset=int(identity), output_type="np")
        rows = [dict(view="vary", identity=int(identity), sigma=sigma, cos_to_identity=float(c), caption=f"cos {c:.3f}")
                for c in out.cos_to_identity]
        return out.images, rows

    def pose(self, identity, yaw, pitch, quality, max_steps, n, tau, seed):
        from tqdm.auto import tqdm

        from vec2face_model.attrop import AttrOPConfig
        from vec2face_model.conventions import tensor_to_uint8
        from vec2face_model.feature_math import cosine
        from vec2face_model.identity import perturb

        pitch = None if pitch is None else _check_range("pitch", pitch, -1e9, 1e9)  # empty: pitch left free
        config = AttrOPConfig(target_yaw=_check_range("yaw", yaw, -1e9, 1e9), target_pitch=pitch,
                              target_quality=_check_range("quality", quality, 0.0, 100.0), max_steps=_check_count("max steps", max_steps, 1, 200))
        n = _check_count("n", n, 1, 16)
        vector = self.identity(identity, tau, seed)
        # the build's perturbation and AttrOP masks for (seed, identity, image index), called directly
        # because every image is steered (pipe(...) expects some plain images per identity)
        perturbed = perturb(vector, n, seed=int(seed), identity_offset=int(identity))
        images, rows = [], []
        # a few images per AttrOP call so the page's progress bar moves (results do not depend on batching)
        for start in tqdm(range(0, n, POSE_CHUNK), desc="AttrOP", unit="batch"):
            part = slice(start, start + POSE_CHUNK)
            vectors, identities = perturbed.vectors[part], vector.expand(len(perturbed.vectors[part]), -1)
            result = self.pipe.steer(vectors.to(self.pipe.device), identities.to(self.pipe.device), perturbed.identity_index[part].cpu(),
                                     perturbed.image_index[part].cpu(), config, seed=int(seed))
            images.append(tensor_to_uint8(result.images.cpu()))
            cos = cosine(result.vectors.float().cpu(), identities.cpu())
            for k in range(len(vectors)):
                success, reached, reached_pitch = bool(result.success[k]), float(result.yaw[k]), float(result.pitch[k])
                pitch_text = "" if pitch is None else f", pitch {reached_pitch:.1f}° (target {pitch:g})"
                rows.append(dict(view="pose", identity=int(identity), target_yaw=config.target_yaw, yaw=reached,
                                 target_pitch=math.nan if pitch is None else pitch, pitch=reached_pitch,
                                 quality=float(result.quality[k]), attrop_success=success, steps=int(result.steps[k]),
                                 cos_to_identity=float(cos[k]),
                                 caption=f"yaw {reached:.1f}° (target {config.target_yaw:g}){pitch_text} "
                                         f"{'reached' if success else 'not reached'}"))
        return np.concatenate(images), rows

    def reference(self, photo, sigma, n, seed):
        from vec2face_model.align import align_face
        from vec2face_model.errors import InvalidInputError

        if photo is None:
            raise InvalidInputError("upload a photo with a face first")
        sigma = _check_range("sigma", sigma, 0.0, 2.0)
        n = _check_count("n", n)
        crop = align_face(photo, name=getattr(photo, "filename", None) or "the uploaded photo")
        out = self.pipe.variations([crop], images_per_identity=n, sigma=sigma, seed=int(seed), output_type="np", align=False)
        rows = [dict(view="reference", identity=-1, sigma=sigma, cos_to_identity=float(c), caption=f"cos {c:.3f}")
                for c in out.cos_to_identity]
        return crop, out.images, rows


def export_view(on_screen: dict, out_dir, model_name: str = "") -> Path:
    """Write the images shown (``{view: [(image, row), ...]}``) as ``OUT/export-<time>/``: a parquet
    file under ``data/`` and a README whose YAML ``configs`` make ``load_dataset(folder)`` work.
    Never writes into an existing folder."""
    import datasets

    from vec2face_model.errors import InvalidInputError

    from vec2face_model.image_io import encode_image

    records = []
    for view in VIEWS:
        for image, row in on_screen.get(view, []):
            records.append({
                "image": {"bytes": encode_image(np.asarray(image), "png"), "path": None},
                "view": view,
                "identity": int(row.get("identity", -1)),
                "caption": row.get("caption", ""),
                **{key: float(row.get(key, float("nan"))) for key in EXPORTED_NUMBERS},
                "attrop_success": bool(row.get("attrop_success", False)),
            })
    if not records:
        raise InvalidInputError("nothing to export yet: run one of the tabs first")
    features = datasets.Features({
        "image": datasets.Image(), "view": datasets.Value("string"), "identity": datasets.Value("int32"),
        "caption": datasets.Value("string"),
        **{key: datasets.Value("float32") for key in EXPORTED_NUMBERS},
        "attrop_success": datasets.Value("bool"),
    })
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    root = Path(out_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    for attempt in range(1000):
        folder = root / (f"export-{stamp}" + (f"-{attempt}" if attempt else ""))
        try:
            folder.mkdir()
            break
        except FileExistsError:
            continue
    (folder / "data").mkdir()
    datasets.Dataset.from_list(records, features=features).to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    counts = {view: len(on_screen.get(view, [])) for view in VIEWS if on_screen.get(view)}
    card = (
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-*.parquet\n---\n\n"
        f"# hsface demo export\n\nImages shown by `hsface demo` (model `{model_name or 'unknown'}`) at {stamp} UTC: "
        f"{json.dumps(counts)}.\n" + ("\n**Random weights: these images are not faces.**\n" if "random" in model_name else "")
        + "\n```python\nfrom datasets import load_dataset\n"
        f"ds = load_dataset({str(folder)!r}, split='train')\n```\n\nColumns: `image`, `view` (tab), `identity`, `caption`, "
        "`sigma`, `cos_to_identity`, `target_yaw`, `yaw`, `target_pitch`, `pitch`, `quality`, `attrop_success` "
        "(NaN / False where a tab does not set them).\n"
    )
    (folder / "README.md").write_text(card)
    return folder


def _readable_errors(fn):
    """Errors a user can fix (HSFaceError, ValueError) become gr.Error: shown in the page, no traceback."""
    gr = _require_gradio()

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, ImportError) as err:  # HSFaceError subclasses ValueError or ImportError here
            raise gr.Error(str(err)) from err

    return wrapper


def build_app(pipe, model_name: str = "", export_dir=DEFAULT_EXPORT_DIR):
    """The Gradio Blocks app over ``pipe`` (not launched)."""
    gr = _require_gradio()
    session = DemoSession(pipe, model_name)
    note = " — **random weights: the images are not faces**" if "random" in model_name else ""

    def shown(images, rows):
        return [(np.asarray(image), row["caption"]) for image, row in zip(images, rows)]

    def remember(state, view, images, rows):
        return {**(state or {}), view: list(zip([np.asarray(i) for i in images], rows))}

    @_readable_errors
    def sample(n, tau, seed, state, progress=gr.Progress(track_tqdm=True)):
        images, rows, heatmap = session.sample(n, tau, seed)
        return shown(images, rows), heatmap, remember(state, "sample", images, rows)

    @_readable_errors
    def vary(identity, sigma, n, tau, seed, state, progress=gr.Progress(track_tqdm=True)):
        images, rows = session.vary(identity, sigma, n, tau, seed)
        return shown(images, rows), remember(state, "vary", images, rows)

    @_readable_errors
    def pose(identity, yaw, pitch, quality, max_steps, n, tau, seed, state, progress=gr.Progress(track_tqdm=True)):
        images, rows = session.pose(identity, yaw, pitch, quality, max_steps, n, tau, seed)
        keys = ("target_yaw", "yaw", *(("target_pitch", "pitch") if pitch is not None else ()), "quality", "attrop_success", "steps")
        table = [{k: row[k] for k in keys} for row in rows]
        return shown(images, rows), table, remember(state, "pose", images, rows)

    @_readable_errors
    def reference(photo, sigma, n, seed, state, progress=gr.Progress(track_tqdm=True)):
        crop, images, rows = session.reference(photo, sigma, n, seed)
        return crop, shown(images, rows), remember(state, "reference", images, rows)

    @_readable_errors
    def export(state):
        folder = export_view(state or {}, export_dir, model_name)
        return f"Exported to `{folder}`: `load_dataset({str(folder)!r}, split='train')`"

    model_events = dict(concurrency_limit=1, concurrency_id="pipeline")  # one pipeline, one call at a time
    with gr.Blocks(title="hsface demo") as app:
        gr.Markdown(f"## hsface demo — model `{model_name or 'custom'}`{note}")
        state = gr.State({})
        with gr.Row():
            tau = gr.Slider(-0.2, 1.0, value=0.3, step=0.05, label="tau (max pairwise cosine of identities)")
            seed = gr.Number(0, precision=0, label="seed")
        with gr.Tab("Sample identities"):
            n_ids = gr.Slider(1, 32, value=8, step=1, label="identities")
            sample_button = gr.Button("Sample", variant="primary", elem_id="sample-button")
            with gr.Row():
                sample_gallery = gr.Gallery(label="one face per identity", columns=4, elem_id="sample-gallery")
                heatmap = gr.Image(label="pairwise cosine", type="pil")
        with gr.Tab("Vary"):
            with gr.Row():
                vary_identity = gr.Number(0, precision=0, label="identity")
                sigma = gr.Slider(0.0, 1.5, value=0.5, step=0.05, label="sigma")
                n_vary = gr.Slider(1, MAX_IMAGES, value=8, step=1, label="images")
            vary_button = gr.Button("Vary", variant="primary")
            vary_gallery = gr.Gallery(label="variations (cosine to the identity)", columns=8)
        with gr.Tab("Pose (AttrOP)"):
            with gr.Row():
                pose_identity = gr.Number(0, precision=0, label="identity")
                yaw = gr.Slider(0, 90, value=60, step=1, label="target yaw (degrees)")
                pitch = gr.Number(None, label="target pitch (degrees, signed; empty: free)")
                quality = gr.Slider(0, 40, value=27, step=0.5, label="target quality (MagFace)")
                max_steps = gr.Slider(1, 60, value=5, step=1, label="max steps")
                n_pose = gr.Slider(1, 16, value=4, step=1, label="images")
            pose_button = gr.Button("Steer", variant="primary")
            pose_gallery = gr.Gallery(label="AttrOP images", columns=8)
            pose_table = gr.JSON(label="per image: target, reached yaw, quality, success, steps used")
        with gr.Tab("Reference photo"):
            with gr.Row():
                photo = gr.Image(type="pil", label="photo with a face")
                crop = gr.Image(type="pil", label="aligned 112x112 crop")
            with gr.Row():
                ref_sigma = gr.Slider(0.0, 1.5, value=0.2, step=0.05, label="sigma")
                n_ref = gr.Slider(1, MAX_IMAGES, value=8, step=1, label="images")
            ref_button = gr.Button("Vary this person", variant="primary")
            ref_gallery = gr.Gallery(label="variations (cosine to the photo's identity)", columns=8)
        with gr.Row():
            export_button = gr.Button("Export what is shown as a dataset folder", elem_id="export-button")
            export_message = gr.Markdown()

        sample_button.click(sample, [n_ids, tau, seed, state], [sample_gallery, heatmap, state], api_name="sample", **model_events)
        vary_button.click(vary, [vary_identity, sigma, n_vary, tau, seed, state], [vary_gallery, state], api_name="vary", **model_events)
        pose_button.click(pose, [pose_identity, yaw, pitch, quality, max_steps, n_pose, tau, seed, state], [pose_gallery, pose_table, state],
                          api_name="pose", **model_events)
        ref_button.click(reference, [photo, ref_sigma, n_ref, seed, state], [crop, ref_gallery, state], api_name="reference", **model_events)
        export_button.click(export, [state], [export_message], api_name="export")
    return app


def launch(model: str | None = None, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
           export_dir=DEFAULT_EXPORT_DIR, block: bool = True):
    """Load the pipeline and serve the app; returns the launched Blocks (``block=False`` for tests)."""
    from vec2face_model.pipeline_vec2face import OFFICIAL_REPO_ID, Vec2FacePipeline

    name = model or OFFICIAL_REPO_ID
    app = build_app(Vec2FacePipeline.from_pretrained(name), name, export_dir)
    app.queue()
    app.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block, ssr_mode=False,
               show_error=False, quiet=not block)
    return app


def _run(args) -> int:
    launch(args.model, host=args.host, port=args.port, share=args.share, export_dir=args.export_dir)
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("demo", help="local Gradio app: sample, vary, pose and reference-photo views (needs the [demo] extra)")
    p.add_argument("--model", help="pipeline: preset 'random-tiny', a local folder, or a Hub repo id (default: official weights)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, help="port (default: Gradio's, 7860 or the next free one)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    p.add_argument("--export-dir", default=DEFAULT_EXPORT_DIR, help=f"where the export button writes (default ./{DEFAULT_EXPORT_DIR})")
    p.set_defaults(run=_run)
    return p
