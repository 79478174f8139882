"""IResNet face-recognition backbones (ArcFace / MagFace), as used by Vec2Face.

"Improved" ResNets from insightface (Deng et al., ArcFace, arXiv:1801.07698): pre-activation style
basic blocks with BatchNorm -> conv -> BatchNorm -> PReLU -> conv -> BatchNorm, every stage
downsampling by 2 (112 -> 7), and a flatten + fully-connected head producing a 512-d embedding.

The released ``arcface-r100-glint360k.pth`` and ``magface-r100-glint360k.pth`` load strictly into
:func:`iresnet100` (official key names are kept). The output is the raw, un-normalised feature:
ArcFace compares features by cosine, MagFace (Meng et al., arXiv:2103.06627) reads image quality
off the feature norm (:func:`magface_quality`).

Input: float32 [B,3,112,112] RGB in [-1,1] (``vec2face_model.conventions``); no internal
normalisation. Reference: ``shared/reference/ARCHITECTURE.md`` section 3.

``use_se=True`` adds squeeze-excitation gates (Hu et al., arXiv:1709.01507). Two layouts exist:

* ``se_mode="shortcut_first"``: one gate per stage, on the (projected) shortcut of the stage's first
  block, keys ``layerN.0.attn.fc1/fc2``. This is the SE-IResNet of HaiyuWu/SOTA-Face-Recognition-
  Train-and-Test, the repository that trained the paper's HSFace FR models (``fr_weights/hsface*.pth``).
* ``se_mode="residual"``: a gate at the end of every block's residual branch, before the addition
  (the textbook SE-ResNet placement), keys ``layerN.M.se.fc1/fc2``.

:meth:`IResNet.from_official` tells them apart by their keys.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.utils import BaseOutput
from torch import nn

from ..weights import StateDict, WeightsLoadError, load_official_model

__all__ = [
    "SE_MODES",
    "IResNet",
    "IResNetOutput",
    "infer_iresnet_config",
    "iresnet18",
    "iresnet34",
    "iresnet50",
    "iresnet100",
    "iresnet200",
    "fold_batchnorm",
    "magface_quality",
    "se_iresnet50",
]

STAGE_WIDTHS = (64, 128, 256, 512)  # fixed in the official model
INPUT_SIZE = 112
FINAL_GRID = INPUT_SIZE // 2 ** len(STAGE_WIDTHS)  # 7: every stage halves the resolution
BN_EPS = 1e-5
SE_MODES = ("residual", "shortcut_first")


@dataclass
class IResNetOutput(BaseOutput):
    """Intermediates of :meth:`IResNet.forward` with ``return_intermediates=True``.

    features: [B,F] the model output (``features`` BatchNorm1d), not normalised.
    fc_out: [B,F] the ``fc`` output before the feature BatchNorm.
    bn2_out: [B,512,7,7] the head BatchNorm2d output (flattened in C,H,W order into ``fc``).
    layer4_out: [B,512,7,7] the last stage's output.
    """

    features: torch.Tensor
    fc_out: torch.Tensor
    bn2_out: torch.Tensor
    layer4_out: torch.Tensor


class SqueezeExcitation(nn.Module):
    """Channel gate ``x * sigmoid(fc2(relu(fc1(avgpool(x)))))`` with bias-free 1x1 convolutions.

    Args:
        channels: input and output channels.
        reduction: the bottleneck has ``channels // reduction`` channels.
    """

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, kernel_size=1, bias=False)
        self.fc2 = nn.Conv2d(channels // reduction, channels, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = x.mean(dim=(2, 3), keepdim=True)
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(gate))))
        return x * gate


class IBasicBlock(nn.Module):
    """Residual block ``BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN [-> SE]`` plus shortcut.

    No activation after the addition. The stride sits on the second convolution (official layout).

    Args:
        in_channels: input channels.
        channels: output channels.
        stride: stride of the second convolution (and of the projection shortcut).
        se_reduction: reduction of a squeeze-excitation gate on the residual branch (``se``), or ``None``.
        shortcut_se_reduction: reduction of a gate on the shortcut (``attn``), or ``None``.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        stride: int = 1,
        se_reduction: int | None = None,
        shortcut_se_reduction: int | None = None,
    ):
        super().__init__()
        # Attribute order = official state-dict order.
        self.bn1 = nn.BatchNorm2d(in_channels, eps=BN_EPS)
        self.conv1 = nn.Conv2d(in_channels, channels, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels, eps=BN_EPS)
        self.prelu = nn.PReLU(channels)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels, eps=BN_EPS)
        self.se = SqueezeExcitation(channels, se_reduction) if se_reduction else None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(channels, eps=BN_EPS),
            )
        else:
            self.downsample = None
        # After `downsample`: the official shortcut-gate layout registers it last.
        self.attn = SqueezeExcitation(channels, shortcut_se_reduction) if shortcut_se_reduction else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        if self.se is not None:
            out = self.se(out)
        shortcut = x if self.downsample is None else self.downsample(x)
        if self.attn is not None:
            shortcut = self.attn(shortcut)
        return out + shortcut


class IResNet(ModelMixin, ConfigMixin):
    """IResNet backbone; ``forward(images)`` maps [B,3,112,112] RGB in [-1,1] to raw [B, num_features].

    Args:
        layers: blocks per stage (4 ints), e.g. ``[3, 13, 30, 3]`` for IResNet-100.
        num_features: embedding size.
        dropout: dropout before ``fc`` (training only).
        use_se: add squeeze-excitation gates.
        se_reduction: bottleneck reduction of the gates.
        se_mode: where the gates go when ``use_se``: ``"residual"`` (every block's residual branch) or
            ``"shortcut_first"`` (the shortcut of each stage's first block, the official HSFace FR layout).
    """

    @register_to_config
    def __init__(
        self,
        layers: list[int] = (3, 13, 30, 3),
        num_features: int = 512,
        dropout: float = 0.4,
        use_se: bool = False,
        se_reduction: int = 16,
        se_mode: str = "residual",
    ):
        super().__init__()
        layers = list(layers)
        if len(layers) != len(STAGE_WIDTHS) or any(int(n) < 1 for n in layers):
            raise ValueError(f"layers must be {len(STAGE_WIDTHS)} positive block counts (e.g. [3, 13, 30, 3]), got {layers}")
        if use_se and not 1 <= se_reduction <= STAGE_WIDTHS[0]:
            raise ValueError(f"se_reduction must be between 1 and {STAGE_WIDTHS[0]}, got {se_reduction}")
        if se_mode not in SE_MODES:
            raise ValueError(f"se_mode must be one of {SE_MODES}, got {se_mode!r}")
        se = se_reduction if use_se and se_mode == "residual" else None
        shortcut_se = se_reduction if use_se and se_mode == "shortcut_first" else None

        # stem
        self.conv1 = nn.Conv2d(3, STAGE_WIDTHS[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(STAGE_WIDTHS[0], eps=BN_EPS)
        self.prelu = nn.PReLU(STAGE_WIDTHS[0])
        # stages: every one starts with a stride-2 block
        in_channels = STAGE_WIDTHS[0]
        for index, (width, count) in enumerate(zip(STAGE_WIDTHS, layers), start=1):
            blocks = [IBasicBlock(in_channels, width, stride=2, se_reduction=se, shortcut_se_reduction=shortcut_se)]
            blocks += [IBasicBlock(width, width, se_reduction=se) for _ in range(int(count) - 1)]
            self.add_module(f"layer{index}", nn.Sequential(*blocks))
            in_channels = width
        # head
        self.bn2 = nn.BatchNorm2d(STAGE_WIDTHS[-1], eps=BN_EPS)
        # Not named `dropout`: diffusers resolves config names before submodules (it has no weights).
        self.fc_dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(STAGE_WIDTHS[-1] * FINAL_GRID * FINAL_GRID, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=BN_EPS)
        self._init_weights()

    def _init_weights(self) -> None:
        # Official initialisation (only matters when training from scratch).
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.1)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # The feature BatchNorm's scale is fixed to 1 during FR training (it is still stored).
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad_(False)

    @property
    def stages(self) -> list[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Stem and the four stages: [B,3,112,112] -> [B,512,7,7] (``layer4_out``)."""
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, INPUT_SIZE, INPUT_SIZE):
            raise ValueError(
                f"expected images of shape [B, 3, {INPUT_SIZE}, {INPUT_SIZE}] (RGB in [-1, 1], aligned crops), "
                f"got {tuple(images.shape)}"
            )
        x = self.prelu(self.bn1(self.conv1(images)))
        for stage in self.stages:
            x = stage(x)
        return x

    def forward(self, images: torch.Tensor, return_intermediates: bool = False) -> torch.Tensor | IResNetOutput:
        """Raw embeddings [B, num_features]; an :class:`IResNetOutput` with ``return_intermediates``."""
        # 1. backbone
        layer4_out = self.forward_features(images)
        # 2. head: flatten in (C, H, W) order, as the official fc expects
        bn2_out = self.bn2(layer4_out)
        fc_out = self.fc(self.fc_dropout(torch.flatten(bn2_out, 1)))
        features = self.features(fc_out)
        if return_intermediates:
            return IResNetOutput(features=features, fc_out=fc_out, bn2_out=bn2_out, layer4_out=layer4_out)
        return features

    @classmethod
    def from_official(cls, path_or_state_dict: str | Path | StateDict, **overrides) -> "IResNet":
        """Build from an official IResNet state dict (``.pth``, safetensors file, or mapping).

        ``layers``, ``num_features``, ``use_se``, ``se_reduction`` and ``se_mode`` are read off the weights;
        ``overrides`` set the rest (e.g. ``dropout``) or force values. Loads strictly; returns the
        model in eval mode.
        """
        return load_official_model(cls, path_or_state_dict, infer_iresnet_config, overrides)


def _block_counts(state_dict: StateDict) -> list[int]:
    counts = []
    for stage in range(1, len(STAGE_WIDTHS) + 1):
        prefix = f"layer{stage}."
        indices = {int(k[len(prefix) :].split(".", 1)[0]) for k in state_dict if k.startswith(prefix)}
        counts.append(max(indices) + 1 if indices else 0)
    return counts


def infer_iresnet_config(state_dict: StateDict, source: str = "<state dict>") -> dict:
    """The :class:`IResNet` config values that a state dict determines."""
    if "fc.weight" not in state_dict:
        raise WeightsLoadError(f"{source}: missing 'fc.weight'; this does not look like an IResNet state dict")
    layers = _block_counts(state_dict)
    if not all(layers):
        raise WeightsLoadError(
            f"{source}: blocks per stage {layers}: every stage layer1..layer4 needs at least one block; "
            "this does not look like an IResNet state dict"
        )
    config = dict(layers=layers, num_features=int(state_dict["fc.weight"].shape[0]))
    se_keys = {"residual": "layer1.0.se.fc1.weight", "shortcut_first": "layer1.0.attn.fc1.weight"}
    present = [mode for mode, key in se_keys.items() if key in state_dict]
    if len(present) > 1:
        raise WeightsLoadError(
            f"{source}: has both 'se.' (residual) and 'attn.' (shortcut) squeeze-excitation keys; "
            "not an IResNet layout we know"
        )
    config["use_se"] = bool(present)
    if present:
        config["se_mode"] = present[0]
        config["se_reduction"] = STAGE_WIDTHS[0] // int(state_dict[se_keys[present[0]]].shape[0])
    return config


def magface_quality(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """MagFace quality: the L2 norm of the raw embedding, [B] (AttrOP's quality target is 27).

    Differentiable; call it under ``torch.no_grad()`` when no gradient is needed.
    """
    return model(images).norm(dim=1)


# -- standard sizes (insightface layer counts) -------------------------------------------------------


def iresnet18(**overrides) -> IResNet:
    return IResNet(layers=[2, 2, 2, 2], **overrides)


def iresnet34(**overrides) -> IResNet:
    return IResNet(layers=[3, 4, 6, 3], **overrides)


def iresnet50(**overrides) -> IResNet:
    return IResNet(layers=[3, 4, 14, 3], **overrides)


def iresnet100(**overrides) -> IResNet:
    """The layout of the released ArcFace-R100 and MagFace-R100 files (65.2M parameters)."""
    return IResNet(layers=[3, 13, 30, 3], **overrides)


def iresnet200(**overrides) -> IResNet:
    """The real IResNet-200 layout ``[6, 26, 60, 6]`` (insightface arcface_torch).

    Vec2Face's ``iresnet('200')`` silently builds the IResNet-100 layout ``[3, 13, 30, 3]``
    (a copy-paste bug in its layer table); use :func:`iresnet100` to reproduce that model.
    """
    return IResNet(layers=[6, 26, 60, 6], **overrides)


def se_iresnet50(**overrides) -> IResNet:
    """SE-IResNet-50: the paper's backbone for training FR models on HSFace.

    Defaults to the official training repository's gate layout (``se_mode="shortcut_first"``), so
    the released ``fr_weights/hsface*.pth`` files load into it; pass ``se_mode="residual"`` for the
    textbook placement.
    """
    return IResNet(**{"layers": [3, 4, 14, 3], "use_se": True, "se_mode": "shortcut_first", **overrides})


# -- inference copy with BatchNorm folded into the layers it follows ---------------------------------


def _fold_into_conv(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> None:
    """``norm(conv(x))`` -> ``conv'(x)`` in place on ``conv`` (eval-mode statistics)."""
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    bias = norm.bias - norm.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    conv.weight = nn.Parameter(conv.weight * scale.reshape(-1, 1, 1, 1), requires_grad=False)
    conv.bias = nn.Parameter(bias, requires_grad=False)


@torch.no_grad()
def fold_batchnorm(model: IResNet) -> IResNet:
    """A frozen eval-mode copy of ``model`` with every BatchNorm that follows a linear layer folded
    into it: ``conv1 -> bn2`` and ``conv2 -> bn3`` of each block, the stem, the projection shortcuts,
    and the head (``bn2 -> flatten -> fc -> features`` becomes one ``fc``). Each block's leading
    ``bn1`` stays: it precedes a zero-padded convolution, so it cannot be folded exactly.

    Same function as ``model`` in eval mode up to float rounding (a few 1e-7 relative). The copy's
    keys differ from the official ones; ``model`` itself is not touched, so its ``state_dict()``
    (and the provenance hash of it) stays as it was. Meant for AttrOP, which calls the recognizers
    hundreds of times per batch and needs gradients only with respect to the images.
    """
    folded = copy.deepcopy(model).eval().requires_grad_(False)
    _fold_into_conv(folded.conv1, folded.bn1)
    folded.bn1 = nn.Identity()
    for stage in folded.stages:
        for block in stage:
            _fold_into_conv(block.conv1, block.bn2)
            _fold_into_conv(block.conv2, block.bn3)
            block.bn2, block.bn3 = nn.Identity(), nn.Identity()
            if block.downsample is not None:
                _fold_into_conv(block.downsample[0], block.downsample[1])
                block.downsample[1] = nn.Identity()
    # head: bn2 acts per channel on the [512,7,7] map, which flattens channel-major into fc
    bn2, fc, features = folded.bn2, folded.fc, folded.features
    scale2 = bn2.weight / torch.sqrt(bn2.running_var + bn2.eps)
    shift2 = bn2.bias - bn2.running_mean * scale2
    cells = FINAL_GRID * FINAL_GRID
    weight = fc.weight * scale2.repeat_interleave(cells)[None, :]
    bias = fc.bias + fc.weight @ shift2.repeat_interleave(cells)
    scale_f = features.weight / torch.sqrt(features.running_var + features.eps)
    fc.weight = nn.Parameter(weight * scale_f[:, None], requires_grad=False)
    fc.bias = nn.Parameter((bias - features.running_mean) * scale_f + features.bias, requires_grad=False)
    folded.bn2, folded.features = nn.Identity(), nn.Identity()
    return folded
