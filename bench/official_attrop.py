"""The official AttrOP loop (``gen_image`` in the Vec2Face model file), re-implemented for benchmarks.

What it computes, per ARCHITECTURE.md section 5 (kept faithfully, since this is the baseline that
hsface's speed is measured against):

* every model keeps ``requires_grad=True`` on its weights, so each backward pass also computes the
  weight gradients of the generator, both IResNets and SixDRepNet, and accumulates them (they are
  never zeroed: the optimiser only holds the vectors);
* ``backward(retain_graph=True)``;
* batch-mean losses; an iteration whose batch means miss a criterion is not counted (``i -= 1``),
  the Adam step is taken anyway;
* the pose model gets the image as BGR by channel indexing, mapped to [0, 1], 112x112; the yaw is
  clipped to [-90, 90];
* after the loop one more forward with a fresh mask makes the returned image.

Two bench-only additions, both off by default: ``max_passes`` caps the loop passes (the official
loop has no cap; random-weight models never meet the criteria), and ``masks`` lets a caller inject
the per-pass masks. Nothing here is used by the library.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vec2face_model.models.sixdrepnet import euler_angles_from_rotation

BGR = [2, 1, 0]


def official_gen_image(
    rep: torch.Tensor,
    generator: torch.nn.Module,
    quality_model: torch.nn.Module,
    fr_model: torch.nn.Module,
    pose_model: torch.nn.Module | None = None,
    class_rep: torch.Tensor | None = None,
    num_iter: int = 1,
    lr: float = 0.1,
    q_target: float = 27,
    pose: float = 60,
    max_passes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Returns (image of a final fresh-mask decode, adjusted vectors, loop passes run)."""
    for model in (generator, quality_model, fr_model, pose_model):
        if model is not None:
            model.requires_grad_(True)  # official: weights are trainable parameters
    v = rep.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([v], lr=lr)
    target = rep if class_rep is None else class_rep
    i, passes = 0, 0
    while i < num_iter and (max_passes is None or passes < max_passes):
        image = generator(v).images.clamp(-1, 1)
        id_loss = torch.mean(1 - F.cosine_similarity(fr_model(image), target))
        quality = torch.norm(quality_model(image), 2, 1)
        q_loss = torch.mean(torch.clamp(q_target - quality, min=0))
        if pose_model is not None:
            bgr = (image[:, BGR] + 1) / 2
            yaw = euler_angles_from_rotation(pose_model(bgr))[:, 1].clamp(-90, 90)
            pose_loss = torch.mean(torch.abs(pose - torch.abs(yaw)))
        else:
            pose_loss = torch.zeros((), device=v.device)
        if pose_loss > 5 or id_loss > 0.3 or q_loss > 1:
            i -= 1
        loss = 100 * id_loss + q_loss + pose_loss
        optimizer.zero_grad()
        loss.backward(retain_graph=True)
        optimizer.step()
        i += 1
        passes += 1
    image = generator(v).images.clamp(-1, 1)  # official: no no_grad here either
    return image, v.detach(), passes
