"""cutmix_patches: every patch's pixels come from the image its label names, λ is the labelled share."""

import pytest
import torch

from fastpatchdiv import cutmix_patches
from fastpatchdiv.cutmix import _box, _sample_beta


def tagged_images(B, H, W, channels=3):
    """Image b holds the value b everywhere plus a pixel pattern in [0, 1), so a patch's pixels name their source.

    The pattern is a multiple of 2^-11 (exact in float64 after adding b, as the tests subtract it back).
    """
    assert H * W <= 2048
    pattern = torch.arange(H * W, dtype=torch.float64).reshape(1, 1, H, W) / 2048
    return torch.arange(B, dtype=torch.float64).view(B, 1, 1, 1) + pattern.expand(B, channels, H, W)


def source_of_patches(mixed, ph, pw):
    """(B, N) index of the image each patch came from (the integer part), checked constant over the patch."""
    B, C, H, W = mixed.shape
    src = mixed.floor().reshape(B, C, H // ph, ph, W // pw, pw).permute(0, 2, 4, 1, 3, 5).reshape(B, -1, C * ph * pw)
    assert (src == src[..., :1]).all(), "a patch mixes pixels of two images"
    return src[..., 0].long()


@pytest.mark.parametrize("per_image", [False, True])
@pytest.mark.parametrize("H, W, patch", [(32, 32, 8), (24, 40, 4), (12, 20, (3, 5)), (16, 16, 16)])
def test_pixels_come_from_the_labelled_image(per_image, H, W, patch):
    B, num_classes = 6, 10
    images = tagged_images(B, H, W)
    targets = torch.tensor([3, 1, 4, 1, 5, 9])  # two images share class 1
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        mixed, labels, soft = cutmix_patches(
            images, targets, patch, num_classes=num_classes, generator=gen, per_image=per_image
        )
        ph, pw = (patch, patch) if isinstance(patch, int) else patch
        n = (H // ph) * (W // pw)
        assert mixed.shape == images.shape and mixed.dtype == images.dtype
        assert labels.shape == (B, n) and labels.dtype == torch.long
        assert soft.shape == (B, num_classes) and soft.dtype == torch.float32
        src = source_of_patches(mixed, ph, pw)
        # Only the image itself and one partner per image; each patch is labelled with its source's class.
        assert torch.equal(labels, targets[src])
        partner = torch.where(src != torch.arange(B)[:, None], src, -1).amax(dim=1)
        assert all(len(set(row.tolist()) - {b, int(partner[b])}) == 0 for b, row in enumerate(src))
        # The pixel pattern is the original's: patches are moved whole, never shifted.
        assert torch.equal(mixed - mixed.floor(), images - images.floor())
        # λ = the share of the image's own patches; soft targets are λ·own + (1 − λ)·partner's class.
        kept = (src == torch.arange(B)[:, None]).double().mean(dim=1)
        other = torch.where(partner >= 0, targets[partner.clamp_min(0)], targets)
        expected = kept[:, None] * torch.nn.functional.one_hot(targets, num_classes) + (1 - kept[:, None]) * (
            torch.nn.functional.one_hot(other, num_classes)
        )
        torch.testing.assert_close(soft.double(), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(soft.sum(dim=1), torch.ones(B), rtol=0, atol=1e-6)
        if not per_image:  # one box for the batch: every image kept the same patches
            own = src == torch.arange(B)[:, None]
            same_partner = partner >= 0
            assert (own[same_partner] == own[same_partner][:1]).all()


def test_box_is_a_rectangle_near_lambda():
    gen = torch.Generator().manual_seed(0)
    for gh, gw in [(14, 14), (7, 20), (1, 9), (9, 1)]:
        for lam in [0.0, 0.01, 0.3, 0.5, 0.77, 0.999, 1.0]:
            top, left, h, w = _box(lam, gh, gw, gen)
            assert 0 <= top and top + h <= gh and 0 <= left and left + w <= gw
            area = round(lam * gh * gw)
            if area == 0:
                assert h * w == 0
            else:
                # Rounding the width and clipping to the grid leave the box within a row/column of λ·N.
                assert abs(h * w - area) <= max(h, w), (gh, gw, lam, h, w)
    assert _box(1.0, 5, 7, gen) == (0, 0, 5, 7)


def test_lambda_follows_beta():
    """λ ~ Beta(α, α): mean 1/2 for any α, variance 1/(4(2α + 1)). (The box test covers area ≈ λ·N.)"""
    gen = torch.Generator().manual_seed(3)
    for alpha in (0.2, 1.0, 8.0):
        lam = torch.tensor(_sample_beta(alpha, 4000, gen), dtype=torch.float64)
        assert abs(lam.mean() - 0.5) < 0.03, alpha
        assert abs(lam.var() / (1 / (4 * (2 * alpha + 1))) - 1) < 0.1, alpha


def test_seeded_generator_reproduces_and_leaves_global_rng_alone():
    images, targets = torch.randn(5, 3, 16, 24), torch.tensor([0, 1, 2, 3, 4])
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = cutmix_patches(images, targets, 4, num_classes=5, per_image=True, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), before)
    b = cutmix_patches(images, targets, 4, num_classes=5, per_image=True, generator=torch.Generator().manual_seed(7))
    c = cutmix_patches(images, targets, 4, num_classes=5, per_image=True, generator=torch.Generator().manual_seed(8))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[1], c[1]) or not torch.equal(a[0], c[0])
    # Without a generator the global RNG drives it: reseeding reproduces.
    torch.manual_seed(5)
    d = cutmix_patches(images, targets, 4, num_classes=5)
    torch.manual_seed(5)
    e = cutmix_patches(images, targets, 4, num_classes=5)
    assert all(torch.equal(x, y) for x, y in zip(d, e, strict=True))


def test_labels_feed_the_mixing_loss_in_timm_order():
    """Row-major patch order: patch (r, c) is index r·(W/p) + c, as timm's PatchEmbed flattens."""
    import fastpatchdiv

    images = tagged_images(2, 8, 12, channels=1)
    mixed, labels, _ = cutmix_patches(images, torch.tensor([0, 1]), 4, num_classes=2, per_image=True)
    tokens = torch.nn.functional.unfold(mixed, kernel_size=4, stride=4).transpose(1, 2)  # (B, N, 16) row-major
    assert torch.equal(tokens.floor()[..., 0].long(), labels)  # image b has class b here
    loss = fastpatchdiv.patch_mixing_loss(tokens.float(), torch.randn(2, 16), None, labels)
    assert torch.isfinite(loss)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"patch_size": 5}, ValueError, r"patch_size \(5, 5\) must divide the image size \(H, W\) = \(16, 24\)"),
        ({"patch_size": (4, 5)}, ValueError, "must divide the image size"),
        ({"patch_size": 0}, ValueError, "patch_size must be a positive int"),
        ({"alpha": 0.0}, ValueError, "alpha must be a finite number > 0, got 0.0"),
        ({"alpha": -1}, ValueError, "alpha must be a finite number > 0"),
        ({"alpha": float("inf")}, ValueError, "alpha must be a finite number > 0"),
        ({"alpha": float("nan")}, ValueError, "alpha must be a finite number > 0"),
        ({"num_classes": 0}, ValueError, "num_classes must be an int >= 1"),
        ({"num_classes": 3}, ValueError, r"class indices in \[0, 3\), got values in \[0, 4\]"),
        ({"targets": torch.tensor([0, 1, 2])}, ValueError, r"targets must have shape \(5,\)"),
        ({"targets": torch.rand(5, 5)}, TypeError, "soft targets are not accepted"),
        ({"images": torch.randn(3, 16, 24)}, ValueError, r"images must have shape \(B, C, H, W\)"),
        ({"generator": 7}, TypeError, "generator must be a torch.Generator"),
    ],
)
def test_bad_arguments_raise(kwargs, error, match):
    args = {
        "images": torch.randn(5, 3, 16, 24),
        "targets": torch.tensor([0, 1, 2, 3, 4]),
        "patch_size": 4,
        "num_classes": 5,
    }
    args.update(kwargs)
    images, targets, patch_size = args.pop("images"), args.pop("targets"), args.pop("patch_size")
    with pytest.raises(error, match=match):
        cutmix_patches(images, targets, patch_size, **args)
