"""The Vec2Face training objective (official ``VQLPIPSWithDiscriminator``, ARCHITECTURE.md 4.3), term by term.

With x̂ the generated image, x the real one (both RGB in [-1, 1]) and f the identity feature::

    generator = w_pixel·mean((x̂−x)²) + w_lpips·mean(LPIPS_vgg(x̂, x)) + w_ssim·(1 − SSIM((x̂+1)/2, (x+1)/2))
              + w_token·mean((tokens[:,1:] − gt_tokens[:,1:])²) + w_identity·mean(1 − cos(f, R(x̂)))
              + w_gan·g·(−mean(D(x̂)))                                  [only from the GAN start epoch]
    discriminator = 0.5·(mean((D(x) − 1)²) + mean(D(x̂)²))                 (LSGAN)

Official weights (``LossWeights()``): 1, 0.2, 0.1, 1, 1, 1. The official code writes the LPIPS term as
``mean(rec + 0.1·p)`` with ``p = 2·LPIPS``, i.e. 0.2·LPIPS. R is the frozen face recognizer.

Two deliberate departures from the official code, each with a switch that reproduces it:

* The generator's GAN term is computed through a *frozen* discriminator, so the discriminator is
  trained by its own loss only. Officially D(x̂) is not frozen and the discriminator also receives
  −∂mean(D(x̂))/∂θ_D, which pushes D(fake) up against its own objective. ``official_gan_gradient_leak``
  restores that.
* ``g`` is 1, as the released model was effectively trained: the official VQGAN adaptive weight is
  unreachable (its guard flag is inverted) and ``disc_weight=0.8`` is unused. ``adaptive_gan_weight``
  turns the intended rule on: ``g = disc_weight·‖∇_L nll‖ / (‖∇_L gan‖ + 1e-4)`` clamped to [0, 1e4],
  with L the image decoder's last convolution and nll the weighted sum of the other generator terms.

LPIPS uses the ``lpips`` package (v0.1 VGG16 with its calibrated linear heads). Its VGG16 trunk
needs torchvision's ImageNet weights, which cannot be downloaded offline; :func:`build_lpips` takes
a local file, falls back to the torch hub cache, and otherwise explains what to do.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vec2face_model.weights import read_weights
from vec2face_model.feature_math import cosine

__all__ = [
    "LossWeights", "GeneratorLosses", "LPIPSWeightsError", "PerceptualLoss", "Vec2FaceObjective", "TERM_NAMES",
    "adaptive_gan_weight", "build_lpips", "discriminator_lsgan_loss", "frozen", "gaussian_window",
    "generator_gan_loss", "identity_loss", "resolve_vgg16_weights", "ssim", "token_loss",
]

TERM_NAMES = ("pixel", "lpips", "ssim", "token", "identity", "gan")

# torchvision's VGG16_Weights.IMAGENET1K_V1 file name: what lpips would download into the torch hub cache.
VGG16_HUB_FILE = "vgg16-397923af.pth"
# lpips cuts VGG16's ``features`` after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
LPIPS_VGG_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))
ADAPTIVE_WEIGHT_EPS = 1e-4
ADAPTIVE_WEIGHT_MAX = 1e4


@dataclass(frozen=True)
class LossWeights:
    """Weight of every generator term; the defaults are the official ones (since 2025-02-06).

    ``ssim`` weighs ``1 − SSIM``; ``gan`` weighs ``−mean(D(x̂))`` once the GAN phase has started.
    A zero weight skips computing the term.
    """

    pixel: float = 1.0
    lpips: float = 0.2
    ssim: float = 0.1
    token: float = 1.0
    identity: float = 1.0
    gan: float = 1.0

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"loss weight {f.name} must be a finite number >= 0, got {value!r}")


# -- SSIM --------------------------------------------------------------------------------------------


def gaussian_window(size: int = 11, sigma: float = 1.5, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Normalised 1-D gaussian of ``size`` taps (odd) centred on the middle tap."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"window size must be a positive odd number, got {size}")
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    offsets = torch.arange(size, dtype=torch.float64, device=device) - size // 2
    window = torch.exp(-(offsets**2) / (2 * sigma**2))
    return (window / window.sum()).to(dtype)


def _gaussian_blur_valid(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    channels = x.shape[1]
    size = window.numel()
    x = F.conv2d(x, window.view(1, 1, 1, size).expand(channels, 1, 1, size), groups=channels)
    return F.conv2d(x, window.view(1, 1, size, 1).expand(channels, 1, size, 1), groups=channels)


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float = 1.0,
    window_size: int = 11,
    sigma: float = 1.5,
    k: tuple[float, float] = (0.01, 0.03),
) -> torch.Tensor:
    """Per-image SSIM [B] of two [B,C,H,W] batches (Wang et al. 2004), differentiable.

    Gaussian window (separable, ``valid`` padding: no border effects), ``C1 = (k1·L)²``,
    ``C2 = (k2·L)²``, averaged over channels and positions — the settings of the official
    ``pytorch_msssim.SSIM(data_range=1, channel=3)``. Always computed in float32.
    """
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim needs two [B,C,H,W] batches of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if min(x.shape[-2:]) < window_size:
        raise ValueError(f"images of size {tuple(x.shape[-2:])} are smaller than the {window_size}-tap SSIM window")
    with torch.autocast(device_type=x.device.type, enabled=False):
        x, y = x.float(), y.float()
        window = gaussian_window(window_size, sigma, device=x.device)
        c1, c2 = (k[0] * data_range) ** 2, (k[1] * data_range) ** 2
        mu_x, mu_y = _gaussian_blur_valid(x, window), _gaussian_blur_valid(y, window)
        var_x = _gaussian_blur_valid(x * x, window) - mu_x**2
        var_y = _gaussian_blur_valid(y * y, window) - mu_y**2
        cov = _gaussian_blur_valid(x * y, window) - mu_x * mu_y
        luminance = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
        structure = (2 * cov + c2) / (var_x + var_y + c2)
        return (luminance * structure).flatten(1).mean(1)


# -- LPIPS -------------------------------------------------------------------------------------------


class LPIPSWeightsError(FileNotFoundError):
    """LPIPS needs VGG16 ImageNet weights that are not available locally."""


def resolve_vgg16_weights(path: str | Path | None) -> Path:
    """The VGG16 weight file to use: ``path`` if given, else torchvision's file in the torch hub cache."""
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise LPIPSWeightsError(f"lpips_vgg_weights={str(path)!r}: no such file")
        return path
    cached = Path(torch.hub.get_dir()) / "checkpoints" / VGG16_HUB_FILE
    if cached.is_file():
        return cached
    raise LPIPSWeightsError(
        "The LPIPS term needs torchvision's ImageNet VGG16 weights, which are not available offline. "
        f"Download {VGG16_HUB_FILE} (torchvision VGG16_Weights.IMAGENET1K_V1, "
        f"https://download.pytorch.org/models/{VGG16_HUB_FILE}) on a machine with network access and either "
        f"pass its path (--lpips_vgg_weights=/path/{VGG16_HUB_FILE}) or put it at {cached}. "
        "For smoke tests only, --lpips_random_backbone=true uses a randomly initialised VGG16 "
        "(the resulting 'LPIPS' is not a perceptual distance); --loss_lpips=0 drops the term."
    )


def build_lpips(
    vgg_weights: str | Path | None = None,
    lin_weights: str | Path | None = None,
    random_backbone: bool = False,
    seed: int = 0,
):
    """A frozen, eval-mode ``lpips.LPIPS(net="vgg", version="0.1")`` built without any download.

    ``vgg_weights``: torchvision VGG16 state dict (``features.N.*`` keys; classifier ignored), found
    by :func:`resolve_vgg16_weights` when None. ``lin_weights``: LPIPS linear heads (``lin{0..4}.model.1.weight``,
    e.g. the official ``lpips/vgg.pth``); default: the v0.1 file shipped inside the ``lpips`` package.
    ``random_backbone``: a VGG16 drawn from ``seed`` instead of ImageNet weights (tests only).
    """
    import lpips

    # Built on the meta device: lpips would otherwise allocate and initialise all of VGG16,
    # classifier included (~2 s), only to throw most of it away.
    with torch.device("meta"):
        model = lpips.LPIPS(net="vgg", version="0.1", pretrained=False, pnet_rand=True, verbose=False)
    model.to_empty(device="cpu")
    state = {f"scaling_layer.{k}": v for k, v in lpips.ScalingLayer().state_dict().items()}

    if lin_weights is None:
        lin_weights = Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth"
    lin = read_weights(lin_weights)
    expected_lin = {f"lin{i}.model.1.weight" for i in range(len(LPIPS_VGG_SLICES))}
    if set(lin) != expected_lin:
        raise ValueError(f"{lin_weights}: expected LPIPS VGG linear weights with keys {sorted(expected_lin)}, got {sorted(lin)[:8]}")
    state.update(lin)
    # ``lins`` is a ModuleList holding the same heads again: its keys alias ``lin{i}``.
    state.update({f"lins.{i}.model.1.weight": lin[f"lin{i}.model.1.weight"] for i in range(len(LPIPS_VGG_SLICES))})

    if random_backbone:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for module in model.net.modules():
                if isinstance(module, nn.Conv2d):
                    module.reset_parameters()
        state.update({k: v for k, v in model.state_dict().items() if k.startswith("net.")})
    else:
        vgg_path = resolve_vgg16_weights(vgg_weights)
        vgg = read_weights(vgg_path)
        for slice_index, (start, stop) in enumerate(LPIPS_VGG_SLICES, start=1):
            for layer in range(start, stop):
                for param in ("weight", "bias"):
                    key = f"features.{layer}.{param}"
                    if f"net.slice{slice_index}.{layer}.{param}" not in model.state_dict():
                        continue  # ReLU / max-pool positions hold no weights
                    if key not in vgg:
                        raise ValueError(f"{vgg_path}: not a torchvision VGG16 state dict (missing {key!r})")
                    state[f"net.slice{slice_index}.{layer}.{param}"] = vgg[key]
    model.load_state_dict(state, strict=True)
    model.requires_grad_(False)
    return model.eval()


class PerceptualLoss(nn.Module):
    """Per-sample LPIPS(VGG) distance [B] between two [-1, 1] RGB batches; always frozen and in eval mode."""

    def __init__(self, lpips_model: nn.Module):
        super().__init__()
        self.lpips = lpips_model.eval().requires_grad_(False)

    def train(self, mode: bool = True):
        # LPIPS heads carry dropout: the metric must stay deterministic while the generator trains.
        super().train(mode)
        self.lpips.eval()
        return self

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.lpips(x, y).flatten()


# -- individual terms --------------------------------------------------------------------------------


def token_loss(tokens: torch.Tensor, gt_tokens: torch.Tensor) -> torch.Tensor:
    """MSE between decoder output tokens and the unmasked feature tokens, identity token 0 excluded."""
    return (tokens[:, 1:].float() - gt_tokens[:, 1:].float()).pow(2).mean()


def identity_loss(features: torch.Tensor, generated_features: torch.Tensor) -> torch.Tensor:
    """mean(1 − cos(f, R(x̂)))."""
    return (1 - cosine(features.float(), generated_features.float())).mean()


def discriminator_lsgan_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Least-squares GAN discriminator loss 0.5·(mean((D(x)−1)²) + mean(D(x̂)²))."""
    return 0.5 * ((real_logits.float() - 1).pow(2).mean() + fake_logits.float().pow(2).mean())


def generator_gan_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The official generator term −mean(D(x̂)) (WGAN/hinge style, paired with an LSGAN discriminator)."""
    return -fake_logits.float().mean()


@contextlib.contextmanager
def frozen(module: nn.Module):
    """Temporarily stop ``module``'s parameters from requiring grad (gradients still reach its input)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p in params:
            p.requires_grad_(True)


def adaptive_gan_weight(nll: torch.Tensor, gan: torch.Tensor, last_layer: torch.Tensor, disc_weight: float) -> torch.Tensor:
    """VQGAN's balance ``disc_weight·‖∇_L nll‖ / (‖∇_L gan‖ + 1e-4)``, clamped to [0, 1e4], detached."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan, last_layer, retain_graph=True)[0]
    weight = nll_grad.norm() / (gan_grad.norm() + ADAPTIVE_WEIGHT_EPS)
    return (weight.clamp(0.0, ADAPTIVE_WEIGHT_MAX) * disc_weight).detach()


# -- the objective -----------------------------------------------------------------------------------


@dataclass
class GeneratorLosses:
    """``terms``: unweighted value of every computed term (``ssim`` holds 1 − SSIM, ``gan`` −mean(D(x̂)));
    ``total``: the weighted sum that is back-propagated; ``gan_weight``: the effective GAN weight (0 when off)."""

    terms: dict[str, torch.Tensor]
    total: torch.Tensor
    gan_weight: float


class Vec2FaceObjective:
    """Computes the generator and discriminator losses of one batch.

    Args:
        weights: per-term weights.
        recognizer: frozen face recognizer R (eval mode) for the identity term.
        perceptual: LPIPS module, required when ``weights.lpips > 0``.
        adaptive_gan_weight / disc_weight: use VQGAN's adaptive GAN weight (see module docstring).
        official_gan_gradient_leak: let the generator's GAN term also train the discriminator.
    """

    def __init__(
        self,
        weights: LossWeights,
        recognizer: nn.Module | None,
        perceptual: nn.Module | None = None,
        adaptive_gan_weight: bool = False,
        disc_weight: float = 0.8,
        official_gan_gradient_leak: bool = False,
    ):
        if weights.lpips > 0 and perceptual is None:
            raise ValueError("weights.lpips > 0 needs a perceptual (LPIPS) module; build one with build_lpips()")
        if weights.identity > 0 and recognizer is None:
            raise ValueError("weights.identity > 0 needs the face recognizer")
        self.weights = weights
        self.recognizer = recognizer
        self.perceptual = perceptual
        self.adaptive_gan_weight = adaptive_gan_weight
        self.disc_weight = disc_weight
        self.official_gan_gradient_leak = official_gan_gradient_leak

    def generator_losses(
        self,
        output,
        real_images: torch.Tensor,
        features: torch.Tensor,
        discriminator: nn.Module | None = None,
        last_layer: torch.Tensor | None = None,
    ) -> GeneratorLosses:
        """Losses of a :class:`Vec2FaceOutput` against the real images and their identity features.

        ``discriminator`` (the plain module, not a DDP wrapper) switches the GAN term on; the
        adaptive weight needs ``last_layer`` (the generator's ``im_decoder.conv_out.weight``).
        """
        w = self.weights
        fake = output.images
        terms: dict[str, torch.Tensor] = {}
        if w.pixel > 0:
            terms["pixel"] = (fake.float() - real_images.float()).pow(2).mean()
        if w.lpips > 0:
            terms["lpips"] = self.perceptual(fake, real_images).float().mean()
        if w.ssim > 0:
            terms["ssim"] = 1 - ssim((fake + 1) / 2, (real_images + 1) / 2).mean()
        if w.token > 0:
            terms["token"] = token_loss(output.tokens, output.gt_tokens)
        if w.identity > 0:
            terms["identity"] = identity_loss(features, self.recognizer(fake))
        nll = sum(getattr(w, name) * value for name, value in terms.items())
        gan_weight = 0.0
        total = nll
        if discriminator is not None:
            leak = self.official_gan_gradient_leak
            with contextlib.nullcontext() if leak else frozen(discriminator):
                terms["gan"] = generator_gan_loss(discriminator(fake))
            if self.adaptive_gan_weight:
                if last_layer is None:
                    raise ValueError("the adaptive GAN weight needs last_layer (generator.im_decoder.conv_out.weight)")
                gan_weight = w.gan * float(adaptive_gan_weight(nll, terms["gan"], last_layer, self.disc_weight))
            else:
                gan_weight = w.gan
            total = total + gan_weight * terms["gan"]
        return GeneratorLosses(terms=terms, total=total, gan_weight=gan_weight)

    @staticmethod
    def discriminator_loss(discriminator: nn.Module, real_images: torch.Tensor, fake_images: torch.Tensor) -> torch.Tensor:
        """LSGAN loss on real and (detached) generated images, in ONE discriminator call.

        One call keeps DDP happy (a wrapped module must run forward once per backward) and is
        equivalent: the discriminator normalises per sample (GroupNorm), so batch composition
        does not change its outputs.
        """
        logits = discriminator(torch.cat([real_images, fake_images.detach()]))
        real_logits, fake_logits = logits.split([len(real_images), len(fake_images)])
        return discriminator_lsgan_loss(real_logits, fake_logits)
