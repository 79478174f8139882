"""Vec2Face generator (paper section 3.1): a feature masked autoencoder plus a VQGAN-style image decoder.

An identity vector (a 512-d, un-normalised ArcFace feature) is projected to the transformer width
and turned into 49 feature tokens (49 scaled/shifted copies of the projection, one per 7x7 cell)
plus the projection itself as token 0. A random subset of feature tokens is masked (replaced by
token 0) and a smaller subset is dropped before the encoder; the decoder fills every masked
position with the embedded token 0, and the 7x7 token map is decoded to a 112x112 RGB image.
The random masks are what makes one vector yield different images.

Everything here mirrors the official ``MaskedGenerativeEncoderViT`` closely enough that the
released ``weights/vec2face_generator.pth`` loads strictly (same keys, including the unused
``patch_embed`` and ``center_token``) and produces the same images. Two official quirks are kept
on purpose because the released weights were trained with them:

* attention logits are computed in float32 (also under autocast), with an explicit max subtraction;
* a ResnetBlock that changes width returns ``nin_shortcut(h) + h``, discarding its input.

Reference: ``shared/reference/ARCHITECTURE.md`` section 2.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import partial
from math import gcd
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.utils import BaseOutput
from timm.layers import Mlp, PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn

from ..weights import StateDict, WeightsLoadError, load_official_model
from ..errors import InvalidInputError

NUM_FEATURE_TOKENS = 49  # 7x7 map, hard-coded in the official model
SEQUENCE_LENGTH = NUM_FEATURE_TOKENS + 1  # plus the identity token at position 0
TOKEN_GRID = 7

# Truncated-normal mask-ratio settings (min, mu, std, max) used by the official scripts.
INFERENCE_MASK_RATIO = (0.1, 0.15, 0.25, 1.0)
TRAINING_MASK_RATIO = (0.5, 0.75, 0.25, 1.0)

# What the weights determine about the released generator; its head counts (12/16) are the defaults.
RELEASED_SIZE = {"embed_dim": 768, "depth": 12, "decoder_depth": 8}

GeneratorArg = torch.Generator | list[torch.Generator] | None


@dataclass
class Vec2FaceOutput(BaseOutput):
    """Result of :meth:`Vec2Face.forward`.

    images: [B,3,112,112] RGB, nominal range [-1,1], NOT clipped.
    tokens: [B,50,D] decoder output tokens (training target of the token loss is ``gt_tokens``).
        ``logits`` is a deprecated alias (the field never held logits).
    gt_tokens: [B,50,D] identity + feature tokens before masking (detached).
    latent: [B,50-n_drop,D] encoder output.
    image_latents: [B,z,7,7] the projection fed to the image decoder.
    token_drop_mask / token_all_mask: [B,50] float 0/1 masks that were used.
    """

    images: torch.Tensor
    tokens: torch.Tensor
    gt_tokens: torch.Tensor
    latent: torch.Tensor
    image_latents: torch.Tensor
    token_drop_mask: torch.Tensor
    token_all_mask: torch.Tensor

    @property
    def logits(self) -> torch.Tensor:
        warnings.warn("Vec2FaceOutput.logits is deprecated; use .tokens (decoder output tokens)", DeprecationWarning, stacklevel=2)
        return self.tokens


# --------------------------------------------------------------------------------------------------
# Masking (ARCHITECTURE.md 2.4)
# --------------------------------------------------------------------------------------------------


def truncated_normal_ppf(u: torch.Tensor, ratio: tuple[float, float, float, float]) -> torch.Tensor:
    """Inverse CDF of the truncated normal on [min, max] with location mu and scale std.

    scipy's ``truncnorm.rvs`` (what the official code calls) is exactly this function applied to a
    uniform draw, so feeding numpy's uniforms reproduces its mask ratios.
    """
    lo, mu, std, hi = ratio
    u = u.to(torch.float64)
    cdf_lo = torch.special.ndtr(torch.tensor((lo - mu) / std, dtype=torch.float64))
    cdf_hi = torch.special.ndtr(torch.tensor((hi - mu) / std, dtype=torch.float64))
    return (mu + std * torch.special.ndtri(cdf_lo + u * (cdf_hi - cdf_lo))).clamp(lo, hi)


def masks_from_noise(noise: torch.Tensor, num_dropped: int, num_masked: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
    """Official mask rule: per row, the ``num_dropped`` / ``num_masked`` tokens with the smallest noise.

    ``noise`` is [B,49]; ``num_masked`` a scalar or [B] tensor. Returns float 0/1 masks [B,50]
    with a leading zero column (the identity token is never dropped or masked).
    """
    rank = noise.argsort(dim=1, stable=True).argsort(dim=1, stable=True)
    num_masked = torch.as_tensor(num_masked, device=noise.device).reshape(-1, 1)
    drop = (rank < num_dropped).float()
    masked = (rank < num_masked).float()
    zero = noise.new_zeros(noise.shape[0], 1)
    return torch.cat([zero, drop], dim=1), torch.cat([zero, masked], dim=1)


def draw_token_masks(
    batch_size: int,
    ratio: tuple[float, float, float, float] = INFERENCE_MASK_RATIO,
    rng: GeneratorArg = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw (token_drop_mask, token_all_mask), each [B,50] float, as the official model does.

    The masked fraction r ~ truncnorm(min, mu, std, max); ``ceil(49·min)`` tokens are dropped before
    the encoder and ``ceil(49·r)`` are masked. With one ``torch.Generator`` as ``rng`` (or None: torch's
    global RNG) one ratio is drawn for the batch, as in the official code. With a list of generators, one
    per sample, each sample draws its own ratio and noise, so its mask does not depend on the rest
    of the batch (what dataset generation needs for batch-size independence).
    """
    num_dropped = math.ceil(NUM_FEATURE_TOKENS * ratio[0])
    if isinstance(rng, (list, tuple)):
        if len(rng) != batch_size:
            raise ValueError(f"got {len(rng)} generators for a batch of {batch_size}; pass one per sample")
        draws = [_draw_ratio_and_noise(1, ratio, g) for g in rng]
        num_masked = torch.cat([d[0] for d in draws])
        noise = torch.cat([d[1] for d in draws])
    else:
        num_masked, noise = _draw_ratio_and_noise(batch_size, ratio, rng)
        num_masked = num_masked.expand(batch_size)
    drop, masked = masks_from_noise(noise, num_dropped, num_masked)
    return drop.to(device), masked.to(device)


def _draw_ratio_and_noise(rows: int, ratio, rng: torch.Generator | None):
    rng_device = rng.device if rng is not None else torch.device("cpu")
    u = torch.rand(1, generator=rng, device=rng_device, dtype=torch.float64).cpu()
    # float64 product then ceil, as numpy does in the official code (49*0.1 -> 4.9000000000000004 -> 5)
    num_masked = torch.ceil(NUM_FEATURE_TOKENS * truncated_normal_ppf(u, ratio)).long()
    noise = torch.rand(rows, NUM_FEATURE_TOKENS, generator=rng, device=rng_device).cpu()
    return num_masked, noise


# --------------------------------------------------------------------------------------------------
# Transformer parts (ARCHITECTURE.md 2.5, 2.6)
# --------------------------------------------------------------------------------------------------


class Float32LogitAttention(nn.Module):
    """Multi-head self-attention whose logits and softmax are always computed in float32.

    The official block disables autocast and casts q and k to float32 before ``q·kᵀ``; the
    released weights were trained that way, so reduced-precision runs keep this part in float32.
    Accepts (and ignores) the extra keyword arguments timm's ``Block`` passes to attention layers.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0, **_):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        batch, length, dim = x.shape
        qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = (q.float() @ k.float().transpose(-2, -1)) * self.scale
            logits = logits - logits.amax(dim=-1, keepdim=True)
            attn = self.attn_drop(logits.softmax(dim=-1))
        out = (attn.to(v.dtype) @ v).transpose(1, 2).reshape(batch, length, dim)
        return self.proj_drop(self.proj(out))


def transformer_block(dim: int, num_heads: int, mlp_ratio: float, eps: float, dropout: float) -> Block:
    """timm's pre-norm ViT block (keys norm1/attn.qkv/attn.proj/norm2/mlp.fc1/mlp.fc2) with float32 logits."""
    return Block(
        dim,
        num_heads,
        mlp_ratio=mlp_ratio,
        qkv_bias=True,
        proj_drop=dropout,
        attn_drop=dropout,
        norm_layer=partial(nn.LayerNorm, eps=eps),
        mlp_layer=Mlp,
        attn_layer=Float32LogitAttention,
    )


class TokenEmbedding(nn.Module):
    """Position embedding + LayerNorm + dropout over an already-embedded [B,50,D] sequence.

    Named and laid out like the official ``BertEmbeddings`` (keys ``position_embeddings``,
    ``LayerNorm``, buffer ``position_ids``) so the released weights load as they are.
    """

    def __init__(self, dim: int, eps: float, dropout: float):
        super().__init__()
        self.position_embeddings = nn.Embedding(SEQUENCE_LENGTH, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("position_ids", torch.arange(SEQUENCE_LENGTH).unsqueeze(0), persistent=True)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = self.position_embeddings(self.position_ids[:, : tokens.shape[1]])
        return self.dropout(self.LayerNorm(tokens + positions))


# --------------------------------------------------------------------------------------------------
# Image decoder (ARCHITECTURE.md 2.7): VQGAN decoder without attention or timestep
# --------------------------------------------------------------------------------------------------


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(out_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Without autograd the activations are updated in place: the same arithmetic (bit-identical
        # images) with fewer fresh 112x112 buffers to page-fault in (see performance.reuse_freed_memory).
        inplace = not torch.is_grad_enabled()
        h = self.conv1(F.silu(self.norm1(x), inplace=inplace))
        h = self.conv2(F.silu(self.norm2(h), inplace=inplace))
        if hasattr(self, "nin_shortcut"):
            # Official quirk, kept because the released weights depend on it: the shortcut is
            # applied to h and the block input is discarded.
            shortcut = self.nin_shortcut(h)
            return shortcut.add_(h) if inplace else shortcut + h
        return h.add_(x) if inplace else x + h


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.block_1(x))


class UpLevel(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_res_blocks: int, upsample: bool):
        super().__init__()
        widths = [in_channels] + [out_channels] * num_res_blocks
        self.block = nn.ModuleList(ResnetBlock(a, b) for a, b in zip(widths[:-1], widths[1:]))
        if upsample:
            self.upsample = Upsample(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return self.upsample(x) if hasattr(self, "upsample") else x


class ImageDecoder(nn.Module):
    """[B,z,7,7] -> [B,3,7·2^(L-1),...]: conv_in, two mid blocks, L up levels (stored by level index), conv_out."""

    def __init__(self, channels: int, channel_mult: list[int], num_res_blocks: int, z_channels: int, out_channels: int):
        super().__init__()
        widths = [channels * m for m in channel_mult]
        self.conv_in = nn.Conv2d(z_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1])
        levels = {}
        running = widths[-1]
        for level in reversed(range(len(widths))):
            levels[level] = UpLevel(running, widths[level], num_res_blocks, upsample=level != 0)
            running = widths[level]
        self.up = nn.ModuleList(levels[level] for level in range(len(widths)))
        self.norm_out = _group_norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], out_channels, 3, padding=1)
        # diffusers' ModelMixin.enable_gradient_checkpointing sets these two on every module that has them
        self.gradient_checkpointing = False
        self._gradient_checkpointing_func = None

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # The same sequence as mid(...) then each level(...); with checkpointing on, each ResnetBlock,
        # upsampling and the output head is its own segment: the full-resolution blocks hold the
        # largest activations, so whole levels as segments would keep most of the memory.
        checkpoint = _checkpointing(self)
        h = self.conv_in(z)
        for unit in self._units():
            h = checkpoint(unit, h)
        return checkpoint(self._head, h)

    def _units(self) -> list[nn.Module]:
        units = [self.mid.block_1, self.mid.block_2]
        for level in reversed(self.up):
            units += list(level.block) + ([level.upsample] if hasattr(level, "upsample") else [])
        return units

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.norm_out(h), inplace=not torch.is_grad_enabled()))


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


class Vec2Face(ModelMixin, ConfigMixin):
    """Vec2Face generator. The default config is the released ``vec2face_vit_base_patch16``.

    ``forward(vectors)`` maps [B, rep_dim] identity vectors to [B,3,112,112] images. Masks are drawn
    from ``generator`` with the config's inference mask ratio unless given explicitly.

    ``enable_gradient_checkpointing()`` (diffusers' mechanism) recomputes every transformer block and
    every image-decoder level in the backward pass instead of keeping their activations: same loss
    and gradients (dropout masks are replayed), less memory, about one extra forward of compute.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        rep_dim: int = 512,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        decoder_embed_dim: int = 768,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        layer_norm_eps: float = 1e-6,
        dropout: float = 0.1,
        img_size: int = 112,
        patch_size: int = 16,
        in_chans: int = 3,
        image_decoder_channels: int = 128,
        image_decoder_channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4),
        image_decoder_num_res_blocks: int = 2,
        z_channels: int = 256,
        out_channels: int = 3,
        mask_ratio_min: float = INFERENCE_MASK_RATIO[0],
        mask_ratio_mu: float = INFERENCE_MASK_RATIO[1],
        mask_ratio_std: float = INFERENCE_MASK_RATIO[2],
        mask_ratio_max: float = INFERENCE_MASK_RATIO[3],
    ):
        super().__init__()
        if decoder_embed_dim != embed_dim:
            raise ValueError(
                f"decoder_embed_dim ({decoder_embed_dim}) must equal embed_dim ({embed_dim}): the image "
                "projection and the token loss use encoder-width decoder outputs (as in the official model)"
            )
        bad_widths = [image_decoder_channels * m for m in image_decoder_channel_mult if (image_decoder_channels * m) % 32]
        if bad_widths:
            raise ValueError(f"image decoder widths {bad_widths} are not multiples of 32 (GroupNorm uses 32 groups)")
        if not 0 < mask_ratio_min <= mask_ratio_max <= 1:
            raise ValueError(f"need 0 < mask_ratio_min <= mask_ratio_max <= 1, got {mask_ratio_min}, {mask_ratio_max}")

        # Registration order follows the official model so state_dict() lists keys in the same order.
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, SEQUENCE_LENGTH, decoder_embed_dim))
        self.token_emb = TokenEmbedding(embed_dim, layer_norm_eps, dropout)
        self.latent_prior_proj_f = nn.Linear(rep_dim, embed_dim)
        self.feature_token = nn.Linear(1, NUM_FEATURE_TOKENS)
        self.center_token = nn.Linear(embed_dim, NUM_FEATURE_TOKENS)  # unused by forward; kept for strict loading
        self.im_decoder = ImageDecoder(
            image_decoder_channels, list(image_decoder_channel_mult), image_decoder_num_res_blocks, z_channels, out_channels
        )
        self.im_decoder_proj = nn.Linear(embed_dim, z_channels)
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)  # unused; kept for strict loading
        self.blocks = nn.ModuleList(transformer_block(embed_dim, num_heads, mlp_ratio, layer_norm_eps, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=layer_norm_eps)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.decoder_blocks = nn.ModuleList(
            transformer_block(decoder_embed_dim, decoder_num_heads, mlp_ratio, layer_norm_eps, dropout) for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=layer_norm_eps)
        self.gradient_checkpointing = False
        self._gradient_checkpointing_func = None
        self._init_weights()

    def _init_weights(self) -> None:
        # Only matters when training from scratch (ARCHITECTURE.md 2.8).
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.decoder_pos_embed_learned, std=0.02)
        nn.init.normal_(self.token_emb.position_embeddings.weight, std=0.02)
        nn.init.xavier_uniform_(self.patch_embed.proj.weight.view(self.patch_embed.proj.weight.shape[0], -1))

    # -- masks ------------------------------------------------------------------------------------

    @property
    def mask_ratio(self) -> tuple[float, float, float, float]:
        c = self.config
        return (c.mask_ratio_min, c.mask_ratio_mu, c.mask_ratio_std, c.mask_ratio_max)

    def draw_masks(self, batch_size: int, rng: GeneratorArg = None, ratio=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks for a batch; ``ratio`` (min, mu, std, max) defaults to the config (inference settings).
        ``rng``: a torch.Generator, one per sample, or None (in this module ``generator`` is the network)."""
        return draw_token_masks(batch_size, ratio or self.mask_ratio, rng, device=self.device)

    # -- forward ----------------------------------------------------------------------------------

    def identity_tokens(self, vectors: torch.Tensor) -> torch.Tensor:
        """[B,50,D]: the projected identity as token 0 followed by its 49 feature tokens (unmasked)."""
        identity = self.latent_prior_proj_f(vectors)
        feature_tokens = self.feature_token(identity.unsqueeze(-1)).transpose(1, 2)  # token j = w_j·e + b_j
        return torch.cat([identity.unsqueeze(1), feature_tokens], dim=1)

    def encode(self, vectors: torch.Tensor, token_drop_mask: torch.Tensor, token_all_mask: torch.Tensor):
        """Encoder half: returns (latent [B,50-n_drop,D], gt_tokens [B,50,D])."""
        tokens = self.identity_tokens(vectors)
        gt_tokens = tokens.detach()
        identity = tokens[:, :1]
        tokens = torch.where(token_all_mask.bool().unsqueeze(-1), identity, tokens)  # masked -> identity token
        tokens = self.token_emb(tokens)
        keep = ~token_drop_mask.bool()
        num_kept = _uniform_row_count(keep, "token_drop_mask")
        x = tokens[keep].reshape(tokens.shape[0], num_kept, tokens.shape[-1])
        checkpoint = _checkpointing(self)
        for block in self.blocks:
            x = checkpoint(block, x)
        return self.norm(x), gt_tokens

    def decode_tokens(self, latent: torch.Tensor, token_drop_mask: torch.Tensor, token_all_mask: torch.Tensor):
        """Decoder half: returns (image_latents [B,z,7,7], tokens [B,50,Dd])."""
        x = self.decoder_embed(latent)
        batch, _, width = x.shape
        fill = x[:, :1]  # the embedded identity token fills every masked position
        keep = ~token_drop_mask.bool()
        padded = fill.expand(batch, SEQUENCE_LENGTH, width).clone()
        padded[keep] = x.reshape(-1, width)
        # Encoder outputs of masked-but-kept tokens are discarded too (official behaviour).
        padded = torch.where(token_all_mask.bool().unsqueeze(-1), fill, padded)
        x = padded + self.decoder_pos_embed_learned
        checkpoint = _checkpointing(self)
        for block in self.decoder_blocks:
            x = checkpoint(block, x)
        tokens = self.decoder_norm(x)
        grid = tokens[:, 1:].reshape(batch, TOKEN_GRID, TOKEN_GRID, width)
        image_latents = self.im_decoder_proj(grid).permute(0, 3, 1, 2)
        return image_latents, tokens

    def forward(
        self,
        vectors: torch.Tensor,
        *,
        token_drop_mask: torch.Tensor | None = None,
        token_all_mask: torch.Tensor | None = None,
        generator: GeneratorArg = None,  # diffusers' keyword for the mask torch.Generator(s)
    ) -> Vec2FaceOutput:
        if vectors.dim() != 2 or vectors.shape[1] != self.config.rep_dim:
            raise ValueError(f"expected identity vectors of shape [B, {self.config.rep_dim}], got {tuple(vectors.shape)}")
        if (token_drop_mask is None) != (token_all_mask is None):
            raise ValueError("pass both token_drop_mask and token_all_mask, or neither")
        if token_drop_mask is None:
            token_drop_mask, token_all_mask = self.draw_masks(vectors.shape[0], rng=generator)
        token_drop_mask = token_drop_mask.to(vectors.device)
        token_all_mask = token_all_mask.to(vectors.device)
        latent, gt_tokens = self.encode(vectors, token_drop_mask, token_all_mask)
        image_latents, tokens = self.decode_tokens(latent, token_drop_mask, token_all_mask)
        images = self.im_decoder(image_latents)
        return Vec2FaceOutput(
            images=images,
            tokens=tokens,
            gt_tokens=gt_tokens,
            latent=latent,
            image_latents=image_latents,
            token_drop_mask=token_drop_mask,
            token_all_mask=token_all_mask,
        )

    # -- official weights ---------------------------------------------------------------------------

    @classmethod
    def from_official(cls, path_or_state_dict: str | Path | StateDict, **overrides) -> "Vec2Face":
        """Build from the official ``vec2face_generator.pth`` (checkpoint dict with ``model_vec2face``
        or a bare state dict) or a safetensors file, inferring every size the weights determine.

        Head counts cannot be read off the weights: they default to the released model's values
        (12 encoder, 16 decoder) and can be overridden, as can the mask-ratio settings.
        """
        def infer_config(state_dict: StateDict, source: str) -> dict:
            config = infer_generator_config(state_dict, source)
            size = {key: config[key] for key in RELEASED_SIZE}
            missing_heads = [key for key in ("num_heads", "decoder_num_heads") if key not in overrides]
            if size != RELEASED_SIZE and missing_heads:
                raise InvalidInputError(
                    f"{source}: a generator of size {size}, not the released {RELEASED_SIZE}; head counts cannot be "
                    f"read from weights, so pass {' and '.join(missing_heads)} as trained (from_official(..., "
                    f"num_heads=..., decoder_num_heads=...); hsface convert --num-heads N --decoder-num-heads M)"
                )
            return config

        return load_official_model(cls, path_or_state_dict, infer_config, overrides)  # unwraps checkpoint["model_vec2face"]


def _checkpointing(module: nn.Module):
    """``module``'s checkpointing function while it is on and autograd records, else a plain call."""
    if module.gradient_checkpointing and torch.is_grad_enabled():
        return module._gradient_checkpointing_func
    return lambda block, *args: block(*args)


def _uniform_row_count(mask: torch.Tensor, name: str) -> int:
    counts = mask.sum(dim=1)
    if not bool((counts == counts[0]).all()):
        raise ValueError(f"every row of {name} must drop the same number of tokens, got counts {counts.tolist()}")
    return int(counts[0])


def _count_indexed(state_dict: StateDict, prefix: str) -> int:
    indices = {int(k[len(prefix) :].split(".")[0]) for k in state_dict if k.startswith(prefix)}
    return max(indices) + 1 if indices else 0


def infer_generator_config(state_dict: StateDict, source: str = "<state dict>") -> dict:
    """Every :class:`Vec2Face` config value that the weights determine."""
    try:
        embed_dim, rep_dim = state_dict["latent_prior_proj_f.weight"].shape
        decoder_embed_dim = state_dict["decoder_embed.weight"].shape[0]
        hidden = state_dict["blocks.0.mlp.fc1.weight"].shape[0]
        patch = state_dict["patch_embed.proj.weight"]
        z_channels = state_dict["im_decoder_proj.weight"].shape[0]
        out_channels = state_dict["im_decoder.conv_out.weight"].shape[0]
    except KeyError as err:
        raise WeightsLoadError(
            f"{source}: missing {err.args[0]!r}; this does not look like a Vec2Face generator state dict "
            "(expected the official 'model_vec2face' layout)"
        ) from None
    num_levels = _count_indexed(state_dict, "im_decoder.up.")
    level_widths = [state_dict[f"im_decoder.up.{i}.block.0.conv1.weight"].shape[0] for i in range(num_levels)]
    channels = 0
    for width in level_widths:
        channels = gcd(channels, width)
    return dict(
        rep_dim=rep_dim,
        embed_dim=embed_dim,
        depth=_count_indexed(state_dict, "blocks."),
        decoder_embed_dim=decoder_embed_dim,
        decoder_depth=_count_indexed(state_dict, "decoder_blocks."),
        mlp_ratio=hidden / embed_dim,
        patch_size=patch.shape[-1],
        in_chans=patch.shape[1],
        image_decoder_channels=channels,
        image_decoder_channel_mult=[w // channels for w in level_widths],
        image_decoder_num_res_blocks=_count_indexed(state_dict, "im_decoder.up.0.block."),
        z_channels=z_channels,
        out_channels=out_channels,
    )


def vec2face_vit_base_patch16(**overrides) -> Vec2Face:
    """The released model's architecture (174M parameters)."""
    return Vec2Face(**overrides)
