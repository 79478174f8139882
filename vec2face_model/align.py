"""Face alignment for reference photos: detect five landmarks, warp onto the 112x112 ArcFace template.

    from vec2face_model import align_face
    crop = align_face(Image.open("photo.jpg"))        # PIL.Image, 112x112, eyes where ArcFace expects them

Vec2Face's recognizer (and so reference mode) only understands faces in the ArcFace crop; an
unaligned photo gives a meaningless identity vector. The detector is MTCNN (Zhang et al. 2016):
a three-stage cascade (proposal, refinement, output networks) whose last stage predicts the eyes,
nose tip and mouth corners. The networks are defined here; their weights are the ones that ship
inside the ``facenet-pytorch`` 2.6.0 wheel (``facenet_pytorch/data/{p,r,o}net.pt``, 2 MB, read
with ``torch.load(weights_only=True)``). That package pins torch < 2.3, so it is installed
without its dependencies (``pip install --no-deps facenet-pytorch==2.6.0``) and never imported:
only its data files are read. ``HSFACE_MTCNN_DIR`` points at another folder with the three files.

Why this detector: it runs offline from a registry package (mediapipe ships no model files;
insightface, uniface and face-alignment download theirs at run time), is small enough for CPU
(well under a second per photo on a CPU), and gives the five points the ArcFace template is defined on.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .weights import load_state_dict_strict, read_weights
from .errors import HSFaceError, InvalidInputError

__all__ = [
    "ARCFACE_TEMPLATE",
    "AlignmentUnavailableError",
    "MTCNN",
    "NoFaceFoundError",
    "align_face",
    "apply_similarity",
    "detect_landmarks",
    "estimate_similarity",
]

# Five points (left eye, right eye, nose tip, left and right mouth corner; "left" as seen in the
# image) of the 112x112 crop the ArcFace recognizers were trained on (insightface's arcface_dst).
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)
CROP_SIZE = 112
MTCNN_FILES = ("pnet.pt", "rnet.pt", "onet.pt")
INSTALL_HINT = (
    "pip install --no-deps facenet-pytorch==2.6.0 (only its MTCNN weight files are read; its torch pin does not apply), "
    "or set HSFACE_MTCNN_DIR to a folder with pnet.pt, rnet.pt and onet.pt"
)


class NoFaceFoundError(InvalidInputError):
    """The detector found no face in an image given for alignment."""


class AlignmentUnavailableError(HSFaceError, ImportError):
    """The detector's weight files are not installed."""


# --- the three MTCNN networks (layer names match the weight files) -----------------------------


class _ProposalNet(nn.Module):
    """P-Net: fully convolutional, 12x12 windows at stride 2 -> face probability + box offsets."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, 1)
        self.conv4_2 = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 2, 2, ceil_mode=True)
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_1(x).softmax(1)[:, 1], self.conv4_2(x)


class _RefineNet(nn.Module):
    """R-Net: 24x24 candidate crops -> face probability + box offsets."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x):
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = self.prelu3(self.conv3(x))
        # the weights come from a (W, H, C)-major framework: flatten in that order
        x = self.prelu4(self.dense4(x.permute(0, 3, 2, 1).flatten(1)))
        return self.dense5_1(x).softmax(1)[:, 1], self.dense5_2(x)


class _OutputNet(nn.Module):
    """O-Net: 48x48 crops -> face probability, box offsets and five landmarks."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x):
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu3(self.conv3(x)), 2, 2, ceil_mode=True)
        x = self.prelu4(self.conv4(x))
        x = self.prelu5(self.dense5(x.permute(0, 3, 2, 1).flatten(1)))
        return self.dense6_1(x).softmax(1)[:, 1], self.dense6_2(x), self.dense6_3(x)


def _mtcnn_weights_dir() -> Path:
    override = os.environ.get("HSFACE_MTCNN_DIR")
    if override:
        folder = Path(override).expanduser()
    else:
        # find_spec locates the installed package without running its __init__ (which imports
        # facenet-pytorch's own torch-pinned code); only the data files are wanted.
        spec = importlib.util.find_spec("facenet_pytorch")
        if spec is None or not spec.submodule_search_locations:
            raise AlignmentUnavailableError(f"face alignment needs the MTCNN detector weights: {INSTALL_HINT}")
        folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    missing = [name for name in MTCNN_FILES if not (folder / name).is_file()]
    if missing:
        raise AlignmentUnavailableError(f"{folder} lacks {', '.join(missing)}: {INSTALL_HINT}")
    return folder


class MTCNN(nn.Module):
    """The MTCNN cascade: ``detect(image)`` -> boxes ``[K, 5]`` (x1, y1, x2, y2, score) and
    landmarks ``[K, 5, 2]`` (x, y) in pixel coordinates, largest-score first.

    Defaults are the published ones: smallest face 20 px, stage thresholds 0.6 / 0.7 / 0.7,
    pyramid factor 0.709.
    """

    def __init__(self, min_face_size: int = 20, thresholds=(0.6, 0.7, 0.7), scale_factor: float = 0.709):
        super().__init__()
        self.pnet, self.rnet, self.onet = _ProposalNet(), _RefineNet(), _OutputNet()
        self.min_face_size, self.thresholds, self.scale_factor = min_face_size, tuple(thresholds), scale_factor

    @classmethod
    def from_installed(cls, **kwargs) -> "MTCNN":
        """The cascade with the weight files of the installed facenet-pytorch wheel (or ``HSFACE_MTCNN_DIR``)."""
        folder = _mtcnn_weights_dir()
        model = cls(**kwargs)
        for net, name in zip((model.pnet, model.rnet, model.onet), MTCNN_FILES):
            load_state_dict_strict(net, read_weights(folder / name), str(folder / name))
        return model.eval()

    @torch.inference_mode()
    def detect(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``image``: uint8 RGB ``[H, W, 3]``."""
        x = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)[None]
        x = (x - 127.5) / 128.0  # the networks' input scaling
        boxes = self._propose(x)
        boxes = self._refine(x, boxes, self.rnet, 24, self.thresholds[1])[0]
        boxes, landmarks = self._refine(x, boxes, self.onet, 48, self.thresholds[2])
        return boxes.numpy(), landmarks.numpy()

    def _propose(self, x: torch.Tensor) -> torch.Tensor:
        from torchvision.ops import nms

        height, width = x.shape[-2:]
        scale = 12.0 / self.min_face_size
        candidates = []
        while min(height, width) * scale >= 12:
            scaled = F.interpolate(x, size=(int(height * scale + 1), int(width * scale + 1)), mode="area")
            prob, offsets = self.pnet(scaled)
            rows, cols = torch.nonzero(prob[0] >= self.thresholds[0], as_tuple=True)
            # each output cell is a 12x12 window at stride 2 of the scaled image
            x1, y1 = ((2 * cols + 1) / scale).floor(), ((2 * rows + 1) / scale).floor()
            x2, y2 = ((2 * cols + 12) / scale).floor(), ((2 * rows + 12) / scale).floor()
            found = torch.stack([x1, y1, x2, y2, prob[0, rows, cols], *offsets[0, :, rows, cols]], dim=1)
            candidates.append(found[nms(found[:, :4], found[:, 4], 0.5)])
            scale *= self.scale_factor
        boxes = torch.cat(candidates) if candidates else torch.zeros(0, 9)
        boxes = boxes[nms(boxes[:, :4], boxes[:, 4], 0.7)]
        size = (boxes[:, 2:4] - boxes[:, 0:2]).repeat(1, 2)  # P-Net offsets are relative to x2 - x1
        corrected = boxes[:, :4] + boxes[:, 5:9] * size
        return _square(torch.cat([corrected, boxes[:, 4:5]], dim=1))

    def _refine(self, x: torch.Tensor, boxes: torch.Tensor, net: nn.Module, size: int, threshold: float):
        from torchvision.ops import nms

        if len(boxes) == 0:
            return boxes, torch.zeros(0, 5, 2)
        crops = torch.cat([_crop(x, box, size) for box in boxes])
        prob, offsets, *points = net(crops)
        final_stage = bool(points)
        keep = prob > threshold
        boxes, prob, offsets = boxes[keep], prob[keep], offsets[keep]
        width = boxes[:, 2] - boxes[:, 0] + 1
        height = boxes[:, 3] - boxes[:, 1] + 1
        landmarks = torch.zeros(len(boxes), 5, 2)
        if final_stage:  # O-Net: x0..x4, y0..y4 as fractions of the box
            points = points[0][keep]
            landmarks = torch.stack([points[:, :5] * width[:, None] + boxes[:, 0:1] - 1,
                                     points[:, 5:] * height[:, None] + boxes[:, 1:2] - 1], dim=2)
        scored = torch.cat([boxes[:, :4], prob[:, None]], dim=1)
        if not final_stage:  # R-Net: suppress overlaps, then apply the offsets
            keep = nms(scored[:, :4], scored[:, 4], 0.7)
            return _square(_shift(scored[keep], offsets[keep])), landmarks[keep]
        # O-Net: apply the offsets, then suppress by intersection over the smaller box (as published)
        boxes = _shift(scored, offsets)
        keep = _nms_min(boxes, 0.7)
        return boxes[keep], landmarks[keep]


def _shift(boxes: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Box regression: corner offsets are fractions of the box's (inclusive) width and height."""
    width = boxes[:, 2] - boxes[:, 0] + 1
    height = boxes[:, 3] - boxes[:, 1] + 1
    shifted = boxes.clone()
    shifted[:, :4] += offsets * torch.stack([width, height, width, height], dim=1)
    return shifted


def _square(boxes: torch.Tensor) -> torch.Tensor:
    """Boxes grown to squares around their centres (the next stage's input is square)."""
    boxes = boxes.clone()
    side = torch.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    centre_x, centre_y = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    boxes[:, 0], boxes[:, 1] = centre_x - side / 2, centre_y - side / 2
    boxes[:, 2], boxes[:, 3] = boxes[:, 0] + side, boxes[:, 1] + side
    return boxes


def _crop(x: torch.Tensor, box: torch.Tensor, size: int) -> torch.Tensor:
    """Pixels [y1-1, y2) x [x1-1, x2) of ``x`` (black outside the image), resized to ``size``."""
    x1, y1, x2, y2 = (int(v) for v in box[:4])
    height, width = x.shape[-2:]
    canvas = torch.full((1, 3, max(y2 - y1 + 1, 1), max(x2 - x1 + 1, 1)), -127.5 / 128.0)
    top, left = max(y1 - 1, 0), max(x1 - 1, 0)
    bottom, right = min(y2, height), min(x2, width)
    if bottom > top and right > left:
        canvas[..., top - (y1 - 1):bottom - (y1 - 1), left - (x1 - 1):right - (x1 - 1)] = x[..., top:bottom, left:right]
    return F.interpolate(canvas, size=(size, size), mode="area")


def _nms_min(boxes: torch.Tensor, threshold: float) -> torch.Tensor:
    """Greedy suppression by intersection over the smaller area (few boxes remain here)."""
    order = boxes[:, 4].argsort(descending=True).tolist()
    area = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    kept: list[int] = []
    for i in order:
        overlaps = [_intersection(boxes[i], boxes[j]) / torch.minimum(area[i], area[j]) for j in kept]
        if all(o <= threshold for o in overlaps):
            kept.append(i)
    return torch.tensor(kept, dtype=torch.long)


def _intersection(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    w = (torch.minimum(a[2], b[2]) - torch.maximum(a[0], b[0]) + 1).clamp(min=0)
    h = (torch.minimum(a[3], b[3]) - torch.maximum(a[1], b[1]) + 1).clamp(min=0)
    return w * h


# --- alignment -----------------------------------------------------------------------------------


def estimate_similarity(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The 2x3 similarity (rotation, uniform scale, translation) mapping ``source`` points onto
    ``target`` points in the least-squares sense (Umeyama 1991, without reflection)."""
    source, target = np.asarray(source, np.float64), np.asarray(target, np.float64)
    source_mean, target_mean = source.mean(0), target.mean(0)
    src, dst = source - source_mean, target - target_mean
    covariance = dst.T @ src / len(source)
    u, singular, vt = np.linalg.svd(covariance)
    sign = np.diag([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0])
    rotation = u @ sign @ vt
    scale = np.trace(np.diag(singular) @ sign) / src.var(0).sum()
    translation = target_mean - scale * rotation @ source_mean
    return np.hstack([scale * rotation, translation[:, None]])


def apply_similarity(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``points [K, 2]`` mapped by a 2x3 matrix from :func:`estimate_similarity`."""
    return np.asarray(points, np.float64) @ matrix[:, :2].T + matrix[:, 2]


@functools.lru_cache(maxsize=1)
def _default_detector() -> MTCNN:
    return MTCNN.from_installed()



def _describe(image, name: str | None) -> str:
    if name:
        return name
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    if isinstance(image, np.ndarray):
        return f"the {'x'.join(map(str, image.shape))} image array"
    filename = getattr(image, "filename", "")
    size = getattr(image, "size", None)
    return filename or (f"the {size[0]}x{size[1]} image" if isinstance(size, tuple) else f"the {type(image).__name__}")


def _as_rgb_array(image) -> np.ndarray:
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as opened:
            return np.asarray(opened.convert("RGB"))
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4) or array.dtype != np.uint8:
        raise InvalidInputError(f"expected a PIL image, a path or a uint8 [H, W, 3] array, got {array.dtype} {array.shape}")
    return array[..., :3]


def detect_landmarks(image, *, detector: MTCNN | None = None, name: str | None = None) -> np.ndarray:
    """The five landmarks ``[5, 2]`` of the largest face in ``image`` (a warning when there are several)."""
    array = _as_rgb_array(image)
    detector = detector or _default_detector()
    boxes, landmarks = detector.detect(array)
    label = _describe(image, name)
    if len(boxes) == 0:
        raise NoFaceFoundError(f"no face found in {label}; pass a photo with a visible, roughly frontal face of at least "
                               f"{detector.min_face_size} px, or an already aligned 112x112 crop with align=False")
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    largest = int(np.argmax(areas))
    if len(boxes) > 1:
        warnings.warn(f"{len(boxes)} faces found in {label}; aligning the largest", stacklevel=3)
    return landmarks[largest]


def align_face(image, *, detector: MTCNN | None = None, name: str | None = None):
    """``image`` (PIL image, path or uint8 RGB array) -> the 112x112 ArcFace crop of its largest face.

    Raises :class:`NoFaceFoundError` (a ``ValueError``) naming the image when no face is found and
    :class:`AlignmentUnavailableError` (an ``ImportError``) saying what to install when the
    detector's weights are missing.
    """
    from PIL import Image

    array = _as_rgb_array(image)
    landmarks = detect_landmarks(array, detector=detector, name=_describe(image, name))
    # PIL's affine transform maps output pixels back to input pixels: give it the inverse.
    inverse = estimate_similarity(ARCFACE_TEMPLATE, landmarks)
    return Image.fromarray(array).transform((CROP_SIZE, CROP_SIZE), Image.Transform.AFFINE, inverse.flatten().tolist(),
                                             resample=Image.Resampling.BILINEAR)
