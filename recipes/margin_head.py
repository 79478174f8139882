"""Class-sharded ArcFace head with an exact distributed softmax cross-entropy (the Partial FC idea).

Partial FC (An et al., arXiv:2010.05222 and arXiv:2203.15565): with ``W`` processes, each holds a
contiguous slice of the class centres. The embeddings and labels of the whole global batch are
all-gathered, each process computes the logits of its own classes, and the softmax normaliser is
combined across processes (all-reduce of the row max and of the sum of exponentials). With
``sample_rate=1`` the loss equals a single-device ArcFace softmax cross-entropy over all classes on
the global batch, to float rounding; no device ever holds the full classifier.

ArcFace (Deng et al., arXiv:1801.07698): the target logit is ``s * cos(theta + m)``, every other
logit ``s * cos(theta)``. As in the repository that trained the paper's FR models, there is no
"easy margin" fallback for ``theta + m > pi``.

Gradients (see :class:`ShardedMarginHead`): every process computes the same global loss. Class
centres get the exact gradient of that loss. The embedding gradients are summed over processes
through the all-gather's backward, then multiplied by ``world_size`` when ``backbone_grads_averaged``
(the default), because DDP/accelerate average the backbone gradients over processes afterwards.

Example::

    head = ShardedMarginHead(512, num_classes=300_000, rank=rank, world_size=world_size)
    loss = head(backbone(images), labels).loss   # labels: global class indices of this rank's batch
    loss.backward()
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vec2face_model.seeding import STREAM_HEAD_CENTRES, STREAM_HEAD_NEGATIVES, derive_seed

__all__ = [
    "HeadOutput",
    "ShardedMarginHead",
    "all_gather_with_grad",
    "arcface_logits",
    "init_class_centres",
    "shard_range",
    "sharded_cross_entropy",
]

NOT_HERE = -1  # label of a row whose class lives on another shard
CENTRE_INIT_STD = 0.01  # Partial FC's initialisation
CENTRE_INIT_CHUNK = 4096  # classes per keyed random chunk: the init does not depend on the world size
COSINE_EPS = 1e-7  # keeps acos' gradient finite at cos = +-1


def shard_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """``[start, end)`` of the classes held by ``rank``; the first ``num_classes % world_size`` ranks get one more."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if num_classes < world_size:
        raise ValueError(f"num_classes ({num_classes}) must be at least world_size ({world_size})")
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def init_class_centres(num_classes: int, dim: int, start: int, end: int, seed: int) -> torch.Tensor:
    """Rows ``start:end`` of an ``N(0, 0.01)`` ``[num_classes, dim]`` matrix keyed by ``seed``.

    Rows come in keyed chunks, so a shard's initial centres are the same whatever the world size.
    """
    rows = []
    for chunk in range(start // CENTRE_INIT_CHUNK, (end - 1) // CENTRE_INIT_CHUNK + 1):
        chunk_start = chunk * CENTRE_INIT_CHUNK
        count = min(CENTRE_INIT_CHUNK, num_classes - chunk_start)
        generator = torch.Generator().manual_seed(derive_seed(seed, STREAM_HEAD_CENTRES, chunk))
        block = torch.randn(count, dim, generator=generator) * CENTRE_INIT_STD
        rows.append(block[max(start - chunk_start, 0) : end - chunk_start])
    return torch.cat(rows)


def arcface_logits(cosine: torch.Tensor, labels: torch.Tensor, scale: float, margin: float) -> torch.Tensor:
    """``scale * cos(theta + margin)`` at each row's label column, ``scale * cos(theta)`` elsewhere.

    ``labels`` index the columns of ``cosine``; rows labelled -1 get no margin.
    """
    rows = torch.nonzero(labels != NOT_HERE).squeeze(1)
    cols = labels[rows]
    target = cosine[rows, cols].clamp(-1 + COSINE_EPS, 1 - COSINE_EPS)
    with_margin = torch.cos(torch.acos(target) + margin)
    logits = cosine.index_put((rows, cols), with_margin)
    return logits * scale


class _ShardedCrossEntropy(torch.autograd.Function):
    """Per-row ``logsumexp(all shards) - target logit``; backward ``softmax - onehot`` on this shard."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, world_size: int) -> torch.Tensor:
        # 1. global row max: only for stability, the loss does not depend on it
        row_max = logits.max(dim=1, keepdim=True).values
        _all_reduce(row_max, dist.ReduceOp.MAX, world_size)
        # 2. global normaliser
        exp = torch.exp(logits - row_max)
        sum_exp = exp.sum(dim=1, keepdim=True)
        _all_reduce(sum_exp, dist.ReduceOp.SUM, world_size)
        # 3. target logit: exactly one shard holds it, the others add zero
        here = labels != NOT_HERE
        target = torch.where(here, logits.gather(1, labels.clamp_min(0)[:, None]).squeeze(1), 0.0)
        _all_reduce(target, dist.ReduceOp.SUM, world_size)
        ctx.save_for_backward(exp / sum_exp, labels)
        return (torch.log(sum_exp).squeeze(1) + row_max.squeeze(1)) - target

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        probabilities, labels = ctx.saved_tensors
        grad = probabilities.clone()
        rows = torch.nonzero(labels != NOT_HERE).squeeze(1)
        grad[rows, labels[rows]] -= 1
        return grad * grad_loss[:, None], None, None


def sharded_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, world_size: int = 1) -> torch.Tensor:
    """Per-row softmax cross-entropy ``[N]`` over the classes of all shards.

    Args:
        logits: ``[N, C_local]`` this shard's columns for the (gathered) batch, float32.
        labels: ``[N]`` column of the target class on this shard, or -1 where another shard holds it.
        world_size: number of shards; above 1 the default process group combines them.

    The returned losses are the same on every shard. The backward assumes every shard back-propagates
    the same gradient into them (e.g. every shard takes the mean).
    """
    return _ShardedCrossEntropy.apply(logits, labels, world_size)


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, world_size: int, grad_scale: float) -> torch.Tensor:
        ctx.rank, ctx.size, ctx.grad_scale = dist.get_rank(), len(tensor), grad_scale
        chunks = [torch.empty_like(tensor) for _ in range(world_size)]
        dist.all_gather(chunks, tensor.contiguous())
        return torch.cat(chunks)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Every rank's loss reads every rank's embeddings: sum the contributions (gloo has no reduce_scatter).
        grad = grad.contiguous()
        dist.all_reduce(grad, dist.ReduceOp.SUM)
        own = grad[ctx.rank * ctx.size : (ctx.rank + 1) * ctx.size]
        return own * ctx.grad_scale, None, None


def all_gather_with_grad(tensor: torch.Tensor, world_size: int, grad_scale: float = 1.0) -> torch.Tensor:
    """Concatenate ``tensor`` (same shape on every rank) over ranks, ``[W*N, ...]``.

    Backward returns this rank's slice of the gradient summed over ranks, times ``grad_scale``.
    """
    if world_size == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor, world_size, grad_scale)


def _all_reduce(tensor: torch.Tensor, op, world_size: int) -> None:
    if world_size > 1:
        dist.all_reduce(tensor, op)


@dataclass
class HeadOutput:
    """loss: scalar mean cross-entropy over the global batch (same on every rank).
    accuracy: scalar top-1 accuracy of the raw cosines over the global batch (detached)."""

    loss: torch.Tensor
    accuracy: torch.Tensor


class ShardedMarginHead(nn.Module):
    """ArcFace class centres ``[C_local, D]`` for this rank's classes, and the distributed loss.

    Args:
        embedding_size: ``D``.
        num_classes: total number of classes over all ranks.
        scale: ArcFace ``s``.
        margin: ArcFace additive angular margin ``m`` (radians).
        rank, world_size: this process and the number of shards (the default process group's).
        sample_rate: fraction of this shard's classes in each step's softmax (Partial FC): the
            classes of the batch plus random others. 1.0 is the exact full softmax.
        seed: keys the centre initialisation and the negative sampling.
        backbone_grads_averaged: the backbone's gradients are averaged over ranks after backward
            (DDP, accelerate); the embedding gradient is then scaled by ``world_size`` so that the
            average is the gradient of the global loss.
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        scale: float = 64.0,
        margin: float = 0.5,
        rank: int = 0,
        world_size: int = 1,
        sample_rate: float = 1.0,
        seed: int = 0,
        backbone_grads_averaged: bool = True,
    ):
        super().__init__()
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if not 0.0 <= margin < math.pi / 2:
            raise ValueError(f"margin must be in [0, pi/2) radians, got {margin}")
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.embedding_size, self.num_classes = embedding_size, num_classes
        self.scale, self.margin, self.sample_rate, self.seed = scale, margin, sample_rate, seed
        self.rank, self.world_size = rank, world_size
        self.class_start, self.class_end = shard_range(num_classes, world_size, rank)
        self.embedding_grad_scale = float(world_size) if backbone_grads_averaged else 1.0
        self.weight = nn.Parameter(init_class_centres(num_classes, embedding_size, self.class_start, self.class_end, seed))

    @property
    def num_local(self) -> int:
        return self.class_end - self.class_start

    def extra_repr(self) -> str:
        return (f"classes [{self.class_start}, {self.class_end}) of {self.num_classes}, dim={self.embedding_size}, "
                f"s={self.scale}, m={self.margin}, sample_rate={self.sample_rate}")

    def _sample_classes(self, local_labels: torch.Tensor, step: int) -> torch.Tensor:
        """Sorted local class indices: all positives of the batch plus random negatives."""
        num_sample = max(int(self.sample_rate * self.num_local), 1)
        positives = torch.unique(local_labels[local_labels != NOT_HERE])
        if len(positives) >= num_sample:
            return positives
        generator = torch.Generator().manual_seed(derive_seed(self.seed, STREAM_HEAD_NEGATIVES, step, self.rank))
        priority = torch.rand(self.num_local, generator=generator).to(local_labels.device)
        priority[positives] = 2.0  # above any random draw: positives are always kept
        return priority.topk(num_sample).indices.sort().values

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, step: int = 0) -> HeadOutput:
        """Loss of this rank's ``embeddings`` ``[B, D]`` with global class ``labels`` ``[B]``.

        ``B`` must be the same on every rank. ``step`` keys the negative sampling (``sample_rate < 1``).
        """
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"expected embeddings [B, {self.embedding_size}], got {tuple(embeddings.shape)}")
        if labels.shape != embeddings.shape[:1]:
            raise ValueError(f"expected labels [{len(embeddings)}], got {tuple(labels.shape)}")
        # 1. the global batch, in float32 whatever the autocast around us
        embeddings = all_gather_with_grad(embeddings.float(), self.world_size, self.embedding_grad_scale)
        labels = labels.long()
        if self.world_size > 1:
            gathered = [torch.empty_like(labels) for _ in range(self.world_size)]
            dist.all_gather(gathered, labels.contiguous())
            labels = torch.cat(gathered)
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"labels must be in [0, {self.num_classes}), got [{int(labels.min())}, {int(labels.max())}]")
        # 2. labels as columns of this shard
        here = (labels >= self.class_start) & (labels < self.class_end)
        local_labels = torch.where(here, labels - self.class_start, NOT_HERE)
        weight = self.weight
        if self.sample_rate < 1.0:
            index = self._sample_classes(local_labels, step)
            weight = weight[index]
            local_labels = torch.where(here, torch.searchsorted(index, local_labels.clamp_min(0)), NOT_HERE)
        # 3. cosines, margin, distributed cross-entropy
        with torch.autocast(embeddings.device.type, enabled=False):
            cosine = F.linear(F.normalize(embeddings), F.normalize(weight.float())).clamp(-1, 1)
            logits = arcface_logits(cosine, local_labels, self.scale, self.margin)
            loss = sharded_cross_entropy(logits, local_labels, self.world_size).mean()
        return HeadOutput(loss=loss, accuracy=self._accuracy(cosine.detach(), local_labels))

    def _accuracy(self, cosine: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        best = cosine.max(dim=1).values
        _all_reduce(best, dist.ReduceOp.MAX, self.world_size)
        target = torch.where(local_labels != NOT_HERE, cosine.gather(1, local_labels.clamp_min(0)[:, None]).squeeze(1), 0.0)
        _all_reduce(target, dist.ReduceOp.SUM, self.world_size)
        return (target >= best).float().mean()
