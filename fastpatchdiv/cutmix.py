"""CutMix on the patch grid, with the per-patch source labels the patch mixing loss trains on.

The official code of Gong et al. 2021 (``two_mix`` in ``deit/engine.py`` of ChengyueGongR/PatchVisionTransformer)
draws λ ~ Beta(1, 1), a box of about λ·N patches on the patch grid with a random aspect ratio and position,
and a permutation of the batch: inside the box each image keeps its own patches, outside it takes its
partner's, and the image label becomes λ·y + (1 − λ)·y_partner with λ the box's actual share.

Shape:
    images: (B, C, H, W) with H, W multiples of the patch size; targets: (B,) class indices. Returns the
    mixed images (B, C, H, W), per-patch labels (B, N) with N = (H/p)·(W/p) in row-major grid order,
    and soft image targets (B, num_classes).

Example:
    >>> mixed, patch_labels, soft = cutmix_patches(images, labels, 16, num_classes=1000)
    >>> loss = F.cross_entropy(model(mixed), soft) + patch_mixing_loss(tokens, W, b, patch_labels)
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import torch
import torch.nn.functional as F


def _draw_int(low: int, high: int, generator: torch.Generator) -> int:
    """An integer uniform on [low, high], both ends included."""
    return int(torch.randint(low, high + 1, (), generator=generator, device=generator.device))


def _sample_beta(alpha: float, count: int, generator: torch.Generator) -> list[float]:
    """``count`` draws of Beta(α, α), reproducible from ``generator``.

    torch's Beta (Gamma) sampler takes no generator, so a seed is drawn from ``generator`` and the
    samples are taken from the CPU RNG under ``torch.random.fork_rng``, which restores the global CPU RNG
    state afterwards: the same generator state gives the same λ, and the global stream is left alone.
    """
    seed = _draw_int(0, 2**62, generator)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # the CPU stream only: torch.manual_seed also seeds CUDA
        return torch.distributions.Beta(float(alpha), float(alpha)).sample((count,)).tolist()


def _box(lam: float, grid_h: int, grid_w: int, generator: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, height, width) in patches of a box of about λ·N patches inside the (grid_h, grid_w) grid.

    The target area is round(λ·N) patches; the height is uniform on [1, min(grid_h, area)] and the width
    area/height (rounded), clipped to the grid; a clipped width gives the height back to the area. The
    position is uniform over the places the box fits. Rounding and clipping make the box's share
    differ from λ: callers use the share actually kept.
    """
    area = round(lam * grid_h * grid_w)
    if area == 0:
        return 0, 0, 0, 0
    height = _draw_int(1, min(grid_h, area), generator)
    width = min(grid_w, max(1, round(area / height)))
    if width == grid_w:
        height = min(grid_h, max(1, round(area / grid_w)))
    top = _draw_int(0, grid_h - height, generator)
    left = _draw_int(0, grid_w - width, generator)
    return top, left, height, width


def cutmix_patches(
    images: torch.Tensor,
    targets: torch.Tensor,
    patch_size: int | tuple[int, int],
    *,
    num_classes: int,
    alpha: float = 1.0,
    per_image: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""CutMix aligned to the patch grid, as the official code of Gong et al. 2021 mixes images.

    The (H, W) image is a (H/p_h, W/p_w) grid of N patches. λ ~ Beta(α, α); a box of about λ·N whole
    patches (random aspect ratio and position, see ``_box``) keeps each image's own patches and the rest
    of the grid is filled with the patches of a partner image (a random permutation of the batch; an
    image can be its own partner). Every patch's pixels therefore come from exactly one image.
    ``per_image=False`` draws one λ and one box for the whole batch (the official ``two_mix``);
    ``per_image=True`` draws one per image.

    Args:
        images: (B, C, H, W), any dtype and device.
        targets: (B,) integer class indices in [0, num_classes). Soft (B, num_classes) targets are not
            accepted: the per-patch labels name one class per patch; mix hard labels here and smooth or
            Mixup the returned image-level targets afterwards if wanted.
        patch_size: p, or (p_h, p_w); must divide H and W (the patch embedding's patch size).
        num_classes: width of the returned image-level soft targets.
        alpha: α > 0 of Beta(α, α); 1.0 (uniform λ) is the official code's value.
        per_image: one box per image instead of one for the batch.
        generator: torch.Generator for every random draw (partner permutation, λ, box); None uses torch's
            global RNG. λ is sampled by ``torch.distributions.Beta`` under ``torch.random.fork_rng`` with a
            seed drawn from the generator, so a seeded generator gives the same mix every time.

    Returns:
        mixed: (B, C, H, W) in the images' dtype.
        patch_labels: (B, N) int64, the class of the image each patch's pixels came from, row-major over
            the (H/p_h, W/p_w) grid (the order timm's patch embedding flattens patches in), ready for
            :func:`fastpatchdiv.patch_mixing_loss`.
        soft_targets: (B, num_classes) float32, λ_b·onehot(y_b) + (1 − λ_b)·onehot(y_partner) with
            λ_b = the share of image b's patches it kept (after rounding and clipping the box).

    Raises:
        TypeError: images/targets not tensors, targets not integer, a generator that is not one.
        ValueError: images not 4-D, targets not (B,), class indices outside [0, num_classes), a patch
            size that does not divide H and W, α <= 0 or not finite, num_classes < 1.

    Example:
        >>> images, labels = torch.randn(8, 3, 224, 224), torch.randint(0, 10, (8,))
        >>> mixed, patch_labels, soft = cutmix_patches(images, labels, 16, num_classes=10)
        >>> patch_labels.shape, soft.shape
        (torch.Size([8, 196]), torch.Size([8, 10]))
    """
    if not isinstance(images, torch.Tensor) or not isinstance(targets, torch.Tensor):
        got = f"{type(images).__name__}, {type(targets).__name__}"
        raise TypeError(f"images and targets must be torch.Tensors, got {got}")
    if images.dim() != 4:
        raise ValueError(f"images must have shape (B, C, H, W), got {tuple(images.shape)}")
    B, channels, H, W = images.shape
    if targets.is_floating_point() or targets.dtype == torch.bool or targets.is_complex():
        raise TypeError(
            f"targets must be (B,) integer class indices (soft targets are not accepted), got {targets.dtype}"
        )
    if tuple(targets.shape) != (B,):
        raise ValueError(f"targets must have shape ({B},) to match the images, got {tuple(targets.shape)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, Integral) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    lo, hi = torch.stack(torch.aminmax(targets)).tolist() if targets.numel() else (0, 0)
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"targets must be class indices in [0, {num_classes}), got values in [{lo}, {hi}]")
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, Integral) else tuple(patch_size)
    if not all(isinstance(p, Integral) and not isinstance(p, bool) and p >= 1 for p in (ph, pw)):
        raise ValueError(f"patch_size must be a positive int or a pair of them, got {patch_size!r}")
    if H % ph or W % pw:
        raise ValueError(f"patch_size {(ph, pw)} must divide the image size (H, W) = {(H, W)}")
    if isinstance(alpha, bool) or not isinstance(alpha, Real) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    gen = generator if generator is not None else torch.default_generator

    grid_h, grid_w = H // ph, W // pw
    partner = torch.randperm(B, generator=gen, device=gen.device).to(images.device)
    boxes = B if per_image else 1
    keep = torch.zeros(boxes, grid_h, grid_w, dtype=torch.bool)
    for i, lam in enumerate(_sample_beta(alpha, boxes, gen)):
        top, left, height, width = _box(lam, grid_h, grid_w, gen)
        keep[i, top : top + height, left : left + width] = True
    keep = keep.to(images.device).expand(B, grid_h, grid_w)

    # The patch mask blown up to pixels, (B, 1, H, W), and one where(): plain 4-D tensors, because indexing
    # a 6-D patch view or index_select takes slow gather paths on CPU.
    pixels = keep[:, None, :, None, :, None].expand(B, 1, grid_h, ph, grid_w, pw).reshape(B, 1, H, W)
    mixed = torch.where(pixels, images, images[partner])
    own = targets.long()
    other = own[partner]
    flat = keep.reshape(B, grid_h * grid_w)
    patch_labels = torch.where(flat, own[:, None], other[:, None])
    lam = flat.float().mean(dim=1, keepdim=True)
    soft = lam * F.one_hot(own, num_classes).float() + (1 - lam) * F.one_hot(other, num_classes).float()
    return mixed, patch_labels, soft
