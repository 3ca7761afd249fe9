"""fastpatchdiv.timm.attach on small random-init timm models, against float64 references.

The references take the tokens without hooks (``model.patch_embed(x)``, ``model.forward_features(x)``
minus the prefix tokens) and run the naive N x N formulas of ``fastpatchdiv.reference`` in float64.
Models are tiny (32-48 px, patch 8, depth 2, width 32) so the file runs in seconds on a CPU.
"""

import copy
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

pytest.importorskip("timm")

from timm.data.naflex_transforms import patchify_image  # noqa: E402
from timm.layers import set_reentrant_ckpt  # noqa: E402
from timm.models.beit import Beit  # noqa: E402
from timm.models.deit import VisionTransformerDistilled  # noqa: E402
from timm.models.eva import Eva  # noqa: E402
from timm.models.naflexvit import NaFlexVit, NaFlexVitCfg, batch_patchify  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402
from timm.models.vision_transformer_relpos import VisionTransformerRelPos  # noqa: E402

import fastpatchdiv.timm as fpt  # noqa: E402
from fastpatchdiv import cutmix_patches, patch_contrastive_loss  # noqa: E402
from fastpatchdiv.reference import (  # noqa: E402
    contrastive_loss_reference,
    cosine_loss_reference,
    mixing_loss_reference,
)
from tests.helpers import assert_close  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"
F32 = torch.float32
SMALL = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)

# name -> (builder, input (H, W)); prefix tokens: 1, 4 registers and no class token, 2, 1, 1, 0, 2 registers.
FAMILIES = {
    "vit": (lambda: VisionTransformer(img_size=32, **SMALL), (32, 32)),
    "registers": (
        lambda: VisionTransformer(img_size=(32, 48), class_token=False, reg_tokens=4, global_pool="avg", **SMALL),
        (32, 48),
    ),
    "deit_distilled": (lambda: VisionTransformerDistilled(img_size=32, **SMALL), (32, 32)),
    "eva": (lambda: Eva(img_size=32, **SMALL), (32, 32)),
    "beit": (lambda: Beit(img_size=32, **SMALL), (32, 32)),
    "relpos": (lambda: VisionTransformerRelPos(img_size=32, **SMALL), (32, 32)),
    "naflexvit": (
        lambda: NaFlexVit(NaFlexVitCfg(patch_size=8, embed_dim=32, depth=2, num_heads=2, reg_tokens=2), num_classes=10),
        (32, 40),
    ),
}
LOSS_OPTIONS = dict(temperature=0.5, normalize=True)  # unsaturated contrastive values at random init


def _model(name: str, dtype=torch.float32):
    build, hw = FAMILIES[name]
    torch.manual_seed(0)
    return build().to(dtype).train(), torch.randn(3, 3, *hw, dtype=dtype)


def _tokens_by_hand(model, x):
    """(first, last) without hooks: the patch-embedding output and forward_features minus the prefix tokens."""
    if isinstance(model, NaFlexVit):
        patches, _ = batch_patchify(x, model.embeds.patch_size)
        first = model.embeds.norm(model.embeds.proj(patches))
    else:
        first = model.patch_embed(x)
        if first.dim() == 4:  # dynamic_img_size: (B, H, W, D)
            first = first.flatten(1, 2)
    return first, model.forward_features(x)[:, model.num_prefix_tokens :]


def _reference(first, last, *, cosine_weight=1.0, contrastive_weight=1.0, mask=None, per_image=False, **opts):
    """Weighted float64 reference per image (masked tokens dropped), then the mean over images."""
    parts = {"cosine": [], "contrastive": []}
    for b in range(last.shape[0]):
        keep = slice(None) if mask is None else mask[b]
        a, z = first[b][keep].double().detach()[None], last[b][keep].double()[None]
        parts["cosine"].append(cosine_loss_reference(z))
        parts["contrastive"].append(contrastive_loss_reference(a, z, **opts))
    parts = {k: torch.cat(v) for k, v in parts.items()}
    total = cosine_weight * parts["cosine"] + contrastive_weight * parts["contrastive"]
    if per_image:
        return total, parts
    return total.mean(), {k: v.mean() for k, v in parts.items()}


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------------------------------------------
# Values and gradients against the float64 reference
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family, negatives",
    [(name, "mean") for name in FAMILIES] + [("vit", "all"), ("registers", "window"), ("naflexvit", "window")],
)
def test_loss_and_gradients_match_reference(family, negatives):
    model, x = _model(family)
    weights = dict(cosine_weight=1.0, contrastive_weight=0.5)
    opts = dict(LOSS_OPTIONS, negatives=negatives)
    if negatives == "window":
        opts.update(window=3, grid=(x.shape[2] // 8, x.shape[3] // 8))  # non-square grids: 4 x 6, 4 x 5
    if family == "registers":
        assert isinstance(model.norm, nn.Identity) and model.num_prefix_tokens == 4  # avg-pool: norm after pooling

    div = fpt.attach(model, **weights, **{k: v for k, v in opts.items() if k != "grid"})
    torch.manual_seed(1)  # the same dropout draws (VisionTransformerRelPos's rel-pos MLP) in both forwards
    model(x)
    loss = div.loss()
    loss.backward()
    got_grads = _grads(model)
    parts = div.losses()
    div.remove()

    model.zero_grad()
    torch.manual_seed(1)
    first, last = _tokens_by_hand(model, x)
    expected, expected_parts = _reference(first, last, **weights, **opts)
    expected.backward()
    expected_grads = _grads(model)

    assert loss.dtype == F32 and loss.shape == ()
    assert_close(loss, expected, F32, f"{family} loss")
    assert set(parts) == {"cosine", "contrastive"} and not any(v.requires_grad for v in parts.values())
    for k in parts:
        assert_close(parts[k], expected_parts[k], F32, f"{family} {k}")
    assert set(got_grads) == set(expected_grads)
    for name, g in got_grads.items():
        assert_close(g, expected_grads[name], F32, f"{family} d/d{name}")
    # The cosine term reaches every layer, the patch embedding included.
    embed = "embeds.proj.weight" if family == "naflexvit" else "patch_embed.proj.weight"
    for name in (embed, next(n for n in got_grads if n.startswith("blocks.0."))):
        assert got_grads[name].abs().sum() > 0, name


def test_reduction_none_and_sum():
    model, x = _model("vit")
    first, last = _tokens_by_hand(model, x)
    expected, _ = _reference(first, last, per_image=True, **LOSS_OPTIONS)
    for reduction, want in (("none", expected), ("sum", expected.sum())):
        with fpt.attach(model, reduction=reduction, **LOSS_OPTIONS) as div:
            model(x)
            got = div.loss()
        assert got.shape == want.shape
        assert_close(got, want, F32, reduction)


def test_last_block_takes_that_blocks_output():
    model, x = _model("eva")
    depth = len(model.blocks)
    (blk,) = model.forward_intermediates(x, indices=[0], norm=False, output_fmt="NLC", intermediates_only=True)
    first, _ = _tokens_by_hand(model, x)
    expected, _ = _reference(first, blk, **LOSS_OPTIONS)
    for index in (0, -depth):
        with fpt.attach(model, last_block=index, **LOSS_OPTIONS) as div:
            model(x)
            assert_close(div.loss(), expected, F32, f"last_block={index}")


def test_dynamic_img_size_flattens_nhwc_and_takes_each_forwards_grid():
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, dynamic_img_size=True, **SMALL).train()
    div = fpt.attach(model, negatives="window", window=3, **LOSS_OPTIONS)
    for hw in ((32, 48), (40, 24)):  # 4 x 6 and 5 x 3 patches, neither the model's 4 x 4
        x = torch.randn(2, 3, *hw)
        model(x)
        first, last = _tokens_by_hand(model, x)
        grid = (hw[0] // 8, hw[1] // 8)
        expected, _ = _reference(first, last, negatives="window", window=3, grid=grid, **LOSS_OPTIONS)
        assert_close(div.loss(), expected, F32, f"grid {grid}")


# ----------------------------------------------------------------------------------------------------
# NaFlexVit: variable-size batches with patch_valid
# ----------------------------------------------------------------------------------------------------


def _naflex_batch(sizes, patch=8):
    """A NaFlex batch of images of different sizes, padded at the end: patches, patch_coord, patch_valid."""
    items = [patchify_image(torch.randn(3, h, w), (patch, patch)) for h, w in sizes]
    n = max(p.shape[0] for p, _, _ in items)
    patches = torch.zeros(len(items), n, items[0][0].shape[1])
    coord = torch.zeros(len(items), n, 2, dtype=torch.long)
    valid = torch.zeros(len(items), n, dtype=torch.bool)
    for b, (p, c, v) in enumerate(items):
        patches[b, : len(p)], coord[b, : len(p)], valid[b, : len(p)] = p, c, v
    return patches, coord, valid


@pytest.mark.parametrize("negatives", ["mean", "all"])
def test_naflexvit_variable_size_batch_uses_patch_valid(negatives):
    model, _ = _model("naflexvit")
    patches, coord, valid = _naflex_batch([(32, 48), (24, 16), (40, 40)])  # 24, 6, 25 patches of 25
    opts = dict(LOSS_OPTIONS, negatives=negatives)
    div = fpt.attach(model, cosine_weight=1.0, contrastive_weight=0.5, **opts)
    patches.requires_grad_()
    model(patches, patch_coord=coord, patch_valid=valid)
    loss = div.loss()
    loss.backward()
    got_grads = _grads(model)
    div.remove()
    # Padding reaches neither loss: attention ignores padded keys and the losses skip padded tokens.
    assert patches.grad[~valid].eq(0).all() and patches.grad[valid].abs().sum() > 0
    patches = patches.detach()

    model.zero_grad()
    first = model.embeds.norm(model.embeds.proj(patches))
    feats = model.forward_features(patches, patch_coord=coord, patch_valid=valid)["patches"]
    expected, _ = _reference(first, feats[:, model.num_prefix_tokens :], cosine_weight=1.0, contrastive_weight=0.5,
                             mask=valid, **opts)  # fmt: skip
    expected.backward()
    assert_close(loss, expected, F32, "naflex masked loss")
    for name, g in _grads(model).items():
        assert_close(got_grads[name], g, F32, f"naflex d/d{name}")


def test_naflexvit_window_needs_a_grid():
    model, _ = _model("naflexvit")
    patches, coord, valid = _naflex_batch([(32, 48), (24, 16)])
    with fpt.attach(model, negatives="window") as div:
        model(patches, patch_coord=coord, patch_valid=valid)
        with pytest.raises(ValueError, match="NaFlex-mode forward"):
            div.loss()


# ----------------------------------------------------------------------------------------------------
# Training-loop behaviour: checkpointing, autocast, eval, several forwards, weights of 0
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("last_block", [None, 0])
def test_grad_checkpointing_gives_the_same_gradients(last_block, reentrant):
    model, x = _model("vit")
    targets = torch.arange(3)

    def step():
        model.zero_grad()
        with fpt.attach(model, last_block=last_block, contrastive_weight=0.5, **LOSS_OPTIONS) as div:
            loss = F.cross_entropy(model(x), targets) + div.loss()
            loss.backward()  # with checkpointing, this re-runs the blocks: not a new forward
            with pytest.raises(RuntimeError, match="already called"):
                div.loss()
        return loss.detach(), _grads(model)

    plain_loss, plain = step()
    set_reentrant_ckpt(reentrant)
    try:
        model.set_grad_checkpointing(True)
        ckpt_loss, ckpt = step()
    finally:
        model.set_grad_checkpointing(False)
        set_reentrant_ckpt(False)
    assert_close(ckpt_loss, plain_loss, F32, "loss")
    assert set(ckpt) == set(plain)
    for name, g in plain.items():
        assert_close(ckpt[name], g, F32, f"checkpointed d/d{name}")


def test_a_forward_without_gradients_is_not_silently_used_for_training():
    model, x = _model("vit")
    with fpt.attach(model) as div:
        with torch.no_grad():
            model(x)
            assert div.loss().isfinite()  # reading the values under no_grad is fine
            model(x)
        with pytest.raises(RuntimeError, match="without gradients"):
            div.loss()
        # A reentrant checkpoint around the whole model runs its forward without autograd as well.
        torch.utils.checkpoint.checkpoint(model, x.requires_grad_(), use_reentrant=True)
        with pytest.raises(RuntimeError, match="without gradients"):
            div.loss()


@pytest.mark.parametrize("precision, tolerance", [("fp32", F32), ("auto", torch.bfloat16)])
def test_autocast_bf16_gives_an_fp32_loss_of_the_autocast_tokens(precision, tolerance):
    """precision="auto" under autocast computes in autocast's dtype (issue 18); "fp32" keeps fp32."""
    model, x = _model("vit")
    with fpt.attach(model, contrastive_weight=0.5, precision=precision, **LOSS_OPTIONS) as div:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x)
            loss = div.loss()
            first, last = _tokens_by_hand(model, x)
        assert (first.dtype, last.dtype) == (torch.bfloat16, F32)  # mixed: the patch conv runs in bf16
        expected, _ = _reference(first, last, contrastive_weight=0.5, **LOSS_OPTIONS)
        assert loss.dtype == F32
        assert_close(loss, expected, tolerance, "autocast loss")
        loss.backward()
        assert all(p.grad.isfinite().all() for p in model.blocks.parameters())


def test_eval_mode_keeps_nothing_unless_asked():
    model, x = _model("vit")
    with fpt.attach(model) as div:
        model.eval()
        with torch.no_grad():
            model(x)
        assert div._recorder.latest is None and div._recorder.pending is None
        with pytest.raises(RuntimeError, match="eval mode"):
            div.loss()
    with fpt.attach(model, in_eval=True, **LOSS_OPTIONS) as div:
        with torch.no_grad():
            model(x)
            first, last = _tokens_by_hand(model, x)
            assert_close(div.loss(), _reference(first, last, **LOSS_OPTIONS)[0], F32, "in_eval")


def test_each_loss_takes_the_latest_forward_once():
    model, x = _model("beit")
    x2 = torch.randn_like(x)
    with fpt.attach(model, **LOSS_OPTIONS) as div:
        with pytest.raises(RuntimeError, match="no forward"):
            div.loss()
        model(x)
        model(x2)
        got = div.loss()
        with pytest.raises(RuntimeError, match="already called"):
            div.loss()
        model(x)  # a new forward makes loss() available again
        again = div.loss()
    first, last = _tokens_by_hand(model, x2)
    assert_close(got, _reference(first, last, **LOSS_OPTIONS)[0], F32, "latest forward")
    first, last = _tokens_by_hand(model, x)
    assert_close(again, _reference(first, last, **LOSS_OPTIONS)[0], F32, "next forward")


@pytest.mark.parametrize("reduction, shape", [("mean", ()), ("none", (3,))])
def test_all_zero_weights_give_zero_without_the_losses(reduction, shape):
    model, x = _model("vit")
    with fpt.attach(model, cosine_weight=0, contrastive_weight=0.0, reduction=reduction) as div:
        model(x)
        loss = div.loss()
        assert loss.shape == shape and loss.dtype == F32 and not loss.any()
        assert div.losses() == {}
        with pytest.raises(RuntimeError, match="already called"):
            div.loss()


def test_one_zero_weight_skips_that_loss():
    model, x = _model("vit")
    with fpt.attach(model, cosine_weight=0.0, contrastive_weight=2.0, **LOSS_OPTIONS) as div:
        model(x)
        loss = div.loss()
        assert set(div.losses()) == {"contrastive"}
        assert_close(loss, 2.0 * div.losses()["contrastive"], F32, "contrastive only")


def test_a_forward_that_calls_the_norm_twice_is_reported_by_loss():
    model, x = _model("vit")
    forward_features = model.forward_features
    with fpt.attach(model) as div:
        model.forward_features = lambda t, **kw: model.norm(forward_features(t, **kw))  # a second norm call
        try:
            model(x)  # the trainer's forward itself does not fail
        finally:
            del model.forward_features
        with pytest.raises(RuntimeError, match=r"model\.norm ran 2 times in one forward"):
            div.loss()


def test_eva_patch_dropout_pairs_the_kept_patches():
    torch.manual_seed(0)
    model = Eva(img_size=32, patch_drop_rate=0.5, **SMALL).train()
    x = torch.randn(3, 3, 32, 32)
    kept = {}
    handle = model.patch_drop.register_forward_hook(lambda m, a, out: kept.update(idx=out[1]))
    with fpt.attach(model, **LOSS_OPTIONS) as div:
        torch.manual_seed(1)
        model(x)
        got = div.loss()
    with pytest.raises(ValueError, match="patch dropout"):
        with fpt.attach(model, negatives="window", window=3) as div_window:
            model(x)
            div_window.loss()
    torch.manual_seed(1)  # the same dropped patches again
    last = model.forward_features(x)[:, model.num_prefix_tokens :]
    handle.remove()
    idx = kept["idx"]
    first = model.patch_embed(x).gather(1, idx.unsqueeze(-1).expand(-1, -1, 32))
    assert last.shape[1] == idx.shape[1] < 16
    assert_close(got, _reference(first, last, **LOSS_OPTIONS)[0], F32, "patch dropout")


# ----------------------------------------------------------------------------------------------------
# The patch mixing loss: attach(..., mixing_weight=..., head=...), loss(patch_targets=...)
# ----------------------------------------------------------------------------------------------------


def _mixing_reference(last, head, targets, mask=None):
    """Per-image float64 mixing loss of the given tokens; gradients reach ``last`` and the head."""
    bias = None if head.bias is None else head.bias.double()
    return mixing_loss_reference(last.double(), head.weight.double(), bias, targets, mask=mask)


@pytest.mark.parametrize("family, labels", [("vit", "hard"), ("registers", "soft"), ("naflexvit", "hard")])
def test_mixing_loss_and_gradients_match_reference(family, labels):
    model, x = _model(family)
    gen = torch.Generator().manual_seed(2)
    x, patch_labels, soft = cutmix_patches(x, torch.arange(3), 8, num_classes=10, generator=gen)
    if labels == "soft":  # arbitrary per-patch probabilities, (B, N, C)
        patch_labels = torch.randn(*patch_labels.shape, 10, generator=gen).softmax(dim=-1)
    weights = dict(cosine_weight=1.0, contrastive_weight=0.5, mixing_weight=0.5)
    div = fpt.attach(model, **weights, **LOSS_OPTIONS)
    head = div.mixing.head
    torch.manual_seed(1)
    loss = F.cross_entropy(model(x), soft) + div.loss(patch_targets=patch_labels)
    loss.backward()
    got_grads = {**_grads(model), **{f"head.{n}": p.grad.clone() for n, p in head.named_parameters()}}
    parts = div.losses()
    div.remove()

    model.zero_grad()
    head.zero_grad()
    torch.manual_seed(1)
    first, last = _tokens_by_hand(model, x)
    others, other_parts = _reference(first, last, cosine_weight=1.0, contrastive_weight=0.5, **LOSS_OPTIONS)
    mixing = _mixing_reference(last, head, patch_labels).mean()
    logits = model.forward_head(model.forward_features(x))
    expected = F.cross_entropy(logits.double(), soft.double()) + others + 0.5 * mixing
    expected.backward()
    expected_grads = {**_grads(model), **{f"head.{n}": p.grad for n, p in head.named_parameters()}}

    assert_close(loss, expected, F32, f"{family} loss")
    assert set(parts) == {"cosine", "contrastive", "mixing"}
    assert_close(parts["mixing"], mixing, F32, f"{family} mixing part")
    assert set(got_grads) == set(expected_grads)
    for name, g in got_grads.items():
        assert_close(g, expected_grads[name], F32, f"{family} d/d{name}")
    assert got_grads["head.weight"].abs().sum() > 0 and got_grads["head.bias"].abs().sum() > 0


@pytest.mark.parametrize("family", ["eva", "naflexvit"])
def test_mixing_labels_follow_patch_dropout_and_padding(family):
    """Labels are given for every patch; loss() keeps those of the kept patches, and padding does not count."""
    torch.manual_seed(0)
    if family == "eva":
        model = Eva(img_size=32, patch_drop_rate=0.5, **SMALL).train()
        inputs, kwargs, mask = (torch.randn(3, 3, 32, 32),), {}, None
    else:
        cfg = NaFlexVitCfg(patch_size=8, embed_dim=32, depth=2, num_heads=2, reg_tokens=2, patch_drop_rate=0.5)
        model = NaFlexVit(cfg, num_classes=10).train()
        patches, coord, mask = _naflex_batch([(32, 48), (24, 16), (40, 40)])
        inputs, kwargs = (patches,), dict(patch_coord=coord, patch_valid=mask)
    n = 16 if family == "eva" else mask.shape[1]
    labels = torch.randint(0, 10, (3, n))
    if mask is not None:
        labels[~mask] = 99  # padding: out of range, so counting it would raise
    kept = {}
    model.patch_drop.register_forward_hook(lambda m, a, out: kept.update(idx=out[1]))
    with fpt.attach(model, cosine_weight=0, contrastive_weight=0, mixing_weight=1.0, reduction="none") as div:
        torch.manual_seed(1)
        model(*inputs, **kwargs)
        got = div.loss(patch_targets=labels)
        head = div.mixing.head
    torch.manual_seed(1)  # the same dropped patches again
    feats = model.forward_features(*inputs, **kwargs)
    last = (feats["patches"] if isinstance(feats, dict) else feats)[:, model.num_prefix_tokens :]
    idx = kept["idx"]
    assert last.shape[1] == idx.shape[1] < n
    kept_mask = None if mask is None else mask.gather(1, idx)
    # F.cross_entropy checks every label, counted or not: the reference gets in-range padding labels.
    expected = _mixing_reference(last, head, labels.clamp(max=9).gather(1, idx), mask=kept_mask)
    assert got.shape == (3,)
    assert_close(got, expected, F32, f"{family} kept patches")


def test_mixing_head_is_created_passed_or_the_models():
    model, x = _model("vit")
    labels = torch.randint(0, 10, (3, 16))
    # Created: the official patch head's init, in the model's dtype, listed by parameters() and state_dict().
    with fpt.attach(model.double(), mixing_weight=1.0) as div:
        head = div.mixing.head
        assert (head.in_features, head.out_features) == (32, 10) and head.weight.dtype == torch.float64
        assert not head.bias.any() and 0.01 < head.weight.std().item() < 0.03
        assert list(div.parameters()) == [head.weight, head.bias]
        assert set(div.state_dict()) == {"mixing.head.weight", "mixing.head.bias"}
        model(x.double())
        assert div.loss(patch_targets=labels).dtype == torch.float64
    model.float()
    # Passed, without a bias.
    own = nn.Linear(32, 10, bias=False)
    with fpt.attach(model, cosine_weight=0, contrastive_weight=0, mixing_weight=2.0, head=own) as div:
        model(x)
        got = div.loss(patch_targets=labels)
        last = model.forward_features(x)[:, 1:]
        assert_close(got, 2.0 * _mixing_reference(last, own, labels).mean(), F32, "head without bias")
        assert list(div.parameters()) == [own.weight]
        # A head left behind when the model moves: a clear error, not a device mismatch deep inside.
        own.to("meta")
        model(x)
        with pytest.raises(RuntimeError, match=r"patch head is on meta .* div\.to\('cpu'\)"):
            div.loss(patch_targets=labels)
    # The model's own classifier: used, but the model already lists it, so div does not.
    model.zero_grad()
    with fpt.attach(model, cosine_weight=0, contrastive_weight=0, mixing_weight=1.0, head=model.head) as div:
        assert list(div.parameters()) == [] and div.state_dict() == {}
        model(x)
        div.loss(patch_targets=labels).backward()
        assert model.head.weight.grad.abs().sum() > 0


def test_mixing_loss_arguments():
    model, x = _model("vit")
    labels = torch.randint(0, 10, (3, 16))
    with fpt.attach(model, mixing_weight=1.0) as div:
        model(x)
        with pytest.raises(ValueError, match=r"mixing_weight=1.0\) needs the per-patch labels"):
            div.loss()  # checked before the forward's tokens are taken: the next call still has them
        with pytest.raises(TypeError, match="patch_targets must be a torch.Tensor, got list"):
            div.loss(patch_targets=labels.tolist())
        with pytest.raises(ValueError, match=r"B = 3 images of N = 16 patches \(a 4 x 4 grid\).* got shape \(3, 15\)"):
            div.loss(patch_targets=labels[:, :15])
    with fpt.attach(model) as div:
        model(x)
        with pytest.raises(ValueError, match="the mixing loss is off"):
            div.loss(patch_targets=labels)
    torch.manual_seed(0)
    featureless = VisionTransformer(img_size=32, **{**SMALL, "num_classes": 0})
    with pytest.raises(ValueError, match=r"no classifier \(num_classes=0\).* head=nn\.Linear\(32, num_classes\)"):
        fpt.attach(featureless, mixing_weight=1.0)
    fpt.attach(featureless, mixing_weight=1.0, head=nn.Linear(32, 7)).remove()  # any C without a classifier


# ----------------------------------------------------------------------------------------------------
# remove(), wrappers, copies
# ----------------------------------------------------------------------------------------------------

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def _hook_state(model):
    return {name: [dict(getattr(m, d, {})) for d in _HOOK_DICTS] for name, m in model.named_modules()}


@pytest.mark.parametrize("family", ["vit", "naflexvit"])
def test_remove_restores_the_model_exactly(family):
    model, x = _model(family)
    hooks_before, state_before = _hook_state(model), copy.deepcopy(model.state_dict())
    attrs_before = {name: set(vars(m)) for name, m in model.named_modules()}
    out_before = model(x)

    div = fpt.attach(model, contrastive_weight=0.5, mixing_weight=0.5)  # the mixing head stays outside the model
    assert _hook_state(model) != hooks_before
    assert torch.equal(model(x), out_before)  # hooks only look
    labels = torch.randint(0, 10, (x.shape[0], (x.shape[2] // 8) * (x.shape[3] // 8)))
    div.loss(patch_targets=labels).backward()
    model(x)  # tokens held when removed
    div.remove()
    div.remove()  # idempotent

    assert _hook_state(model) == hooks_before
    assert {name: set(vars(m)) for name, m in model.named_modules()} == attrs_before
    sd = model.state_dict()
    assert sd.keys() == state_before.keys() and all(torch.equal(sd[k], state_before[k]) for k in sd)
    assert torch.equal(model(x), out_before)
    assert div._recorder.latest is None
    with pytest.raises(RuntimeError, match="removed"):
        div.loss()


def test_context_manager_removes_the_hooks():
    model, x = _model("relpos")
    hooks_before = _hook_state(model)
    with fpt.attach(model) as div:
        model(x)
        div.loss()
    assert _hook_state(model) == hooks_before


def test_a_second_attach_raises_until_the_first_is_removed():
    """Two attaches would add their losses twice, silently: the second raises, and works after remove()."""
    model, x = _model("vit")
    div = fpt.attach(model)
    with pytest.raises(RuntimeError, match="already has a PatchDiversity"):
        fpt.attach(model, cosine_weight=2.0)
    div.remove()
    with fpt.attach(model) as again:
        model(x)
        assert again.loss().isfinite()


def test_div_has_no_parameters_of_its_own_or_the_models():
    model, _ = _model("vit")
    with fpt.attach(model) as div:
        assert list(div.parameters()) == [] and div.model is model
        assert "VisionTransformer" in repr(div)


def test_torch_compile_wrapper():
    model, x = _model("vit")
    first, last = _tokens_by_hand(model, x)
    expected = _reference(first, last, **LOSS_OPTIONS)[0]
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    with fpt.attach(compiled, **LOSS_OPTIONS) as div:  # the OptimizedModule: hooks go on _orig_mod
        assert div.model is model
        compiled(x)
        loss = div.loss()
        loss.backward()
        assert_close(loss, expected, F32, "compiled")

    # Compiled and run before attach: dynamo does not see the new hooks, and loss() says so.
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    compiled(x)
    with fpt.attach(compiled) as div:
        compiled(x)
        with pytest.raises(RuntimeError, match="torch.compile"):
            div.loss()
    torch._dynamo.reset()


def test_deepcopy_of_an_attached_model_is_ignored():
    """timm's ModelEmaV3 deep-copies the model: the copy's forwards must not replace the tokens."""
    model, x = _model("vit")
    with fpt.attach(model, **LOSS_OPTIONS) as div:
        model(x)  # tokens held while copying
        ema = copy.deepcopy(model)
        ema(torch.randn_like(x))
        first, last = _tokens_by_hand(model, x)
        assert_close(div.loss(), _reference(first, last, **LOSS_OPTIONS)[0], F32, "after deepcopy")
        ema(x)
        with pytest.raises(RuntimeError, match="already called"):
            div.loss()
        model(x)  # and the model itself still records
        assert_close(div.loss(), _reference(first, last, **LOSS_OPTIONS)[0], F32, "model after the copy ran")


# ----------------------------------------------------------------------------------------------------
# Arguments and import
# ----------------------------------------------------------------------------------------------------


def test_unknown_model_family_points_to_the_functional_api():
    from timm.models.resnet import BasicBlock, ResNet

    for model in (ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10), nn.Linear(4, 4)):
        with pytest.raises(TypeError) as err:
            fpt.attach(model)
        msg = str(err.value)
        assert type(model).__name__ in msg and "patch_cosine_loss" in msg
        assert all(family in msg for family in fpt.SUPPORTED_FAMILIES)


def test_unknown_negatives_has_the_losss_message():
    with pytest.raises(ValueError) as from_loss:
        patch_contrastive_loss(torch.randn(1, 4, 2), torch.randn(1, 4, 2), negatives="nearest")
    model, _ = _model("vit")
    with pytest.raises(ValueError) as from_attach:
        fpt.attach(model, negatives="nearest")
    assert str(from_attach.value) == str(from_loss.value)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(cosine_weight=-0.1), ValueError, "cosine_weight must be a finite number >= 0, got -0.1"),
        (dict(contrastive_weight=math.nan), ValueError, "contrastive_weight .* got nan"),
        (dict(cosine_weight=math.inf), ValueError, "cosine_weight .* got inf"),
        (dict(cosine_weight="1"), TypeError, "cosine_weight .* got '1'"),
        (dict(cosine_weight=True), TypeError, "cosine_weight"),
        (dict(temperature=0.0), ValueError, "temperature must be a positive finite number, got 0.0"),
        (dict(temperature=1e-40), ValueError, "1/τ must be finite in float32"),
        (dict(temperature=torch.tensor(0.5)), TypeError, "a tensor temperature"),
        (dict(window=4), ValueError, "window must be an odd int >= 3, got 4"),
        (dict(reduction="avg"), ValueError, "reduction must be one of .* got 'avg'"),
        (dict(backend="cuda"), ValueError, "backend must be one of .* got 'cuda'"),
        (dict(normalize=1), TypeError, "normalize must be a bool, got 1"),
        (dict(last_block=2), ValueError, "last_block=2 is out of range for a model with 2 blocks"),
        (dict(last_block=-3), ValueError, "last_block=-3 is out of range"),
        (dict(last_block="norm"), TypeError, "last_block must be None or an int"),
        (dict(mixing_weight=-1), ValueError, "mixing_weight must be a finite number >= 0, got -1"),
        (
            dict(mixing_weight=1, head=nn.Linear(16, 10)),
            ValueError,
            r"head must be nn\.Linear\(32, 10\) .* got nn\.Linear\(16, 10\)",
        ),
        (dict(mixing_weight=1, head=nn.Linear(32, 7)), ValueError, r"num_classes=10\); got nn\.Linear\(32, 7\)"),
        (dict(mixing_weight=1, head=nn.Conv2d(32, 10, 1)), TypeError, "head must be an nn.Linear.* got Conv2d"),
        (dict(head=nn.Linear(32, 10)), ValueError, r"mixing loss, which is off \(mixing_weight=0\)"),
    ],
)
def test_bad_arguments_raise_at_attach(kwargs, error, match):
    model, _ = _model("vit")
    hooks_before = _hook_state(model)
    with pytest.raises(error, match=match):
        fpt.attach(model, **kwargs)
    assert _hook_state(model) == hooks_before  # nothing left behind


def test_data_parallel_and_vit_patch_dropout_are_refused():
    model, _ = _model("vit")
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        fpt.attach(nn.DataParallel(model))
    torch.manual_seed(0)
    dropping = VisionTransformer(img_size=32, patch_drop_rate=0.25, **SMALL)
    with pytest.raises(ValueError, match="patch_drop_rate=0.25"):
        fpt.attach(dropping)
    with pytest.raises(ValueError, match="cannot be matched to their patch labels"):
        fpt.attach(dropping, contrastive_weight=0, mixing_weight=1.0)
    fpt.attach(dropping, contrastive_weight=0).remove()  # the cosine loss alone works on the kept patches


def test_import_without_timm_says_pip_install_timm():
    code = "import sys; sys.modules['timm'] = None\nimport fastpatchdiv\nimport fastpatchdiv.timm"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "ImportError" in out.stderr and "pip install timm" in out.stderr, out.stderr[-2000:]


def test_readme_trainer_examples_run():
    text = README.read_text()
    start = text.index("## Use it in your trainer")
    section = text[start : text.index("\n## ", start + 1)]
    examples = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(examples) == 3, "the section shows the two-line loop, the mixing loss, the Hugging Face Trainer"
    compile(examples[2], "README.md", "exec")  # needs a Trainer to run: tests/test_families.py runs its body
    namespace: dict = {}
    exec(compile(examples[0], "README.md", "exec"), namespace)
    assert namespace["loss"].isfinite()
    assert set(namespace["div"].losses()) == {"cosine", "contrastive"}
    namespace["div"].remove()
    # The mixing example continues the first one.
    exec(compile(examples[1], "README.md", "exec"), namespace)
    assert namespace["loss"].isfinite()
    assert set(namespace["div"].losses()) == {"cosine", "contrastive", "mixing"}
    head = namespace["div"].mixing.head
    assert any(p is head.weight for group in namespace["optimizer"].param_groups for p in group["params"])
