"""fastpatchdiv.attach on every registry family beyond timm's ViTs, against float64 references.

Families: timm Swin and SwinV2 (NHWC, hierarchical), Hugging Face ViT / DeiT / Dinov2 (with and without
registers) / Swin built from configs (no download), torchvision's VisionTransformer, and the generic
TokenSpec. The references take each family's tokens without hooks and run ``fastpatchdiv.reference``.
Also the bug-hunt kinds that can occur on every family: a frozen backbone (9), an interrupted forward
(10), ``forward_features`` + ``forward_head`` (11, timm) and a meta-device model (13).
"""

import importlib
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("timm")

from timm.models.swin_transformer import SwinTransformer  # noqa: E402
from timm.models.swin_transformer_v2 import SwinTransformerV2  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

import fastpatchdiv  # noqa: E402
from fastpatchdiv import TokenSpec  # noqa: E402
from fastpatchdiv.reference import mixing_loss_reference  # noqa: E402
from tests.helpers import assert_close  # noqa: E402
from tests.test_timm import LOSS_OPTIONS, _reference  # noqa: E402

F32 = torch.float32
SWIN = dict(
    img_size=32,
    patch_size=4,
    window_size=4,
    embed_dim=16,
    depths=(1, 1),
    num_heads=(1, 2),
    num_classes=10,
    drop_path_rate=0.0,
)
VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=10)


def _transformers():
    """transformers, after the installed PyPI package "kernels" it imports: the repo's top-level kernels/
    (installed as fastpatchdiv.kernels) shadows it when the repo root is on sys.path, as under pytest."""
    if "kernels" not in sys.modules:
        saved, root = sys.path[:], str(Path(__file__).resolve().parents[1])
        sys.path[:] = [p for p in sys.path if p not in ("", ".", root)]
        try:
            importlib.import_module("kernels")
        except ImportError:
            pass
        finally:
            sys.path[:] = saved
    return pytest.importorskip("transformers")


def _hf(name):
    transformers = _transformers()
    common = dict(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_labels=10
    )
    if name == "hf_swin":
        config = transformers.SwinConfig(
            image_size=32,
            patch_size=4,
            embed_dim=16,
            depths=[1, 1],
            num_heads=[1, 2],
            window_size=4,
            num_labels=10,
            drop_path_rate=0.0,
        )
        return transformers.SwinForImageClassification(config)
    if name == "hf_vit":
        return transformers.ViTForImageClassification(transformers.ViTConfig(intermediate_size=64, **common))
    if name == "hf_deit":
        return transformers.DeiTForImageClassification(transformers.DeiTConfig(intermediate_size=64, **common))
    if name == "hf_dinov2":
        return transformers.Dinov2ForImageClassification(transformers.Dinov2Config(mlp_ratio=2, **common))
    config = transformers.Dinov2WithRegistersConfig(mlp_ratio=2, num_register_tokens=2, **common)
    return transformers.Dinov2WithRegistersForImageClassification(config)


def _torchvision():
    vision_transformer = pytest.importorskip("torchvision.models.vision_transformer")
    return vision_transformer.VisionTransformer(
        image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
    )


BUILDERS = {
    "timm_vit_registers": lambda: VisionTransformer(class_token=False, reg_tokens=2, global_pool="avg", **VIT),
    "timm_swin": lambda: SwinTransformer(**SWIN),
    "timm_swinv2": lambda: SwinTransformerV2(**SWIN),
    "hf_vit": lambda: _hf("hf_vit"),
    "hf_deit": lambda: _hf("hf_deit"),
    "hf_dinov2": lambda: _hf("hf_dinov2"),
    "hf_dinov2_registers": lambda: _hf("hf_dinov2_registers"),
    "hf_swin": lambda: _hf("hf_swin"),
    "torchvision": _torchvision,
    "tokenspec": lambda: VisionTransformer(**VIT),
}
ALL = list(BUILDERS)
SPEC = TokenSpec(first="patch_embed", last="norm", num_prefix_tokens=1, dim=32, num_classes=10, patch_size=8)


def _model(name, seed=0):
    torch.manual_seed(seed)
    return BUILDERS[name]().train(), torch.randn(3, 3, 32, 32)


def _attach(name, model, **kwargs):
    return fastpatchdiv.attach(model, **kwargs, **({"tokens": SPEC} if name == "tokenspec" else {}))


def _logits(model, x):
    out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


def _tokens_by_hand(name, model, x):
    """(first, last) of each family without hooks, (B, N, D) patch tokens."""
    if name.startswith("timm_swin"):
        h = model.patch_embed(x)
        for stage in model.layers[:-1]:
            h = stage(h)
        return model.layers[-1].downsample(h).flatten(1, 2), model.forward_features(x).flatten(1, 2)
    if name == "hf_swin":
        out = model.base_model(x, output_hidden_states=True)
        return out.hidden_states[-2], out.last_hidden_state
    if name.startswith("hf_"):
        base = model.base_model
        prefix = {"hf_deit": 2, "hf_dinov2_registers": 3}.get(name, 1)
        return base.embeddings.patch_embeddings(x), base(x).last_hidden_state[:, prefix:]
    if name == "torchvision":
        seq = model._process_input(x)
        seq = torch.cat([model.class_token.expand(x.shape[0], -1, -1), seq], dim=1)
        return model.conv_proj(x).flatten(2).transpose(1, 2), model.encoder(seq)[:, 1:]
    return model.patch_embed(x), model.forward_features(x)[:, model.num_prefix_tokens :]


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ALL)
def test_loss_and_gradients_match_reference(name):
    model, x = _model(name)
    div = _attach(name, model, cosine_weight=1.0, contrastive_weight=0.5, **LOSS_OPTIONS)
    model(x)
    loss = div.loss()
    loss.backward()
    got, parts = _grads(model), div.losses()
    div.remove()
    model.zero_grad()
    first, last = _tokens_by_hand(name, model, x)
    assert first.shape == last.shape  # paired tokens: same grid and width (Swin: the last stage's)
    expected, expected_parts = _reference(first, last, cosine_weight=1.0, contrastive_weight=0.5, **LOSS_OPTIONS)
    expected.backward()
    assert_close(loss, expected, F32, f"{name} loss")
    for key in ("cosine", "contrastive"):
        assert_close(parts[key], expected_parts[key], F32, f"{name} {key}")
    want = _grads(model)
    assert set(got) == set(want) and got
    for key, g in got.items():
        assert_close(g, want[key], F32, f"{name} d/d{key}")


@pytest.mark.parametrize("name", ["timm_swin", "hf_swin", "torchvision", "hf_vit"])
def test_window_negatives_take_the_last_tokens_grid(name):
    model, x = _model(name)
    div = _attach(name, model, contrastive_weight=1.0, cosine_weight=0.0, negatives="window", window=3, normalize=True)
    model(x)
    loss = div.loss()
    first, last = _tokens_by_hand(name, model, x)
    grid = (4, 4)
    assert last.shape[1] == 16
    expected, _ = _reference(first, last, cosine_weight=0.0, negatives="window", window=3, grid=grid, normalize=True)
    assert_close(loss, expected, F32, f"{name} window loss")


def _patch_targets(div, x):
    gen = torch.Generator().manual_seed(3)
    return div.cutmix(x, torch.arange(x.shape[0]), generator=gen)


@pytest.mark.parametrize("name", ALL)
def test_mixing_with_cutmix_and_label_smoothing_matches_reference(name):
    model, x = _model(name)
    div = _attach(name, model, cosine_weight=0.0, contrastive_weight=0.0, mixing_weight=0.5, label_smoothing=0.1)
    mixed, patch_targets, soft = _patch_targets(div, x)
    assert patch_targets.shape == (3, 16)  # one label per last-layer token (Swin: its last stage's 4 x 4 grid)
    loss = div.loss(patch_targets=patch_targets) if _logits(model, mixed) is not None else None
    head = div.mixing.head
    _, last = _tokens_by_hand(name, model, mixed)
    bias = head.bias.double()
    expected = 0.5 * mixing_loss_reference(
        last.double(), head.weight.double(), bias, patch_targets, label_smoothing=0.1
    )
    assert_close(loss, expected.mean(), F32, f"{name} mixing loss")


@pytest.mark.parametrize("name", ["timm_vit_registers", "timm_swin", "hf_vit", "hf_swin", "torchvision", "tokenspec"])
def test_frozen_backbone_trains_the_mixing_head(name):
    """Kind 9: only the classifier trains: no error, the diversity parts are constants, the patch head trains."""
    model, x = _model(name)
    for p in model.parameters():
        p.requires_grad_(False)
    classifier = {"timm_swin": "head", "hf_vit": "classifier", "hf_swin": "classifier"}.get(name, "heads")
    classifier = "head" if name in ("tokenspec", "timm_vit_registers") else classifier
    for p in model.get_submodule(classifier).parameters():
        p.requires_grad_(True)
    div = _attach(name, model, cosine_weight=1.0, contrastive_weight=0.5, mixing_weight=0.5)
    mixed, patch_targets, soft = _patch_targets(div, x)
    loss = F.cross_entropy(_logits(model, mixed), soft) + div.loss(patch_targets=patch_targets)
    loss.backward()
    assert div.mixing.head.weight.grad.abs().sum() > 0
    assert not div.losses()["cosine"].requires_grad and div.losses()["cosine"] > 0


class _Interrupt:
    """A forward hook that raises KeyboardInterrupt once (an interrupt in the middle of a forward)."""

    def __init__(self, module):
        self.handle = module.register_forward_hook(self)

    def __call__(self, *args):
        self.handle.remove()
        raise KeyboardInterrupt


@pytest.mark.parametrize("name", ALL)
def test_an_interrupted_forward_does_not_leave_div_stuck(name):
    """Kind 10: KeyboardInterrupt inside the model's forward (the root's always_call hook does not run)."""
    model, x = _model(name)
    div = _attach(name, model, cosine_weight=1.0, contrastive_weight=0.0)
    _Interrupt(div._recorder.wiring.last.module)
    with pytest.raises(KeyboardInterrupt):
        model(x)
    with pytest.raises(RuntimeError, match="did not finish"):
        div.loss()
    _Interrupt(div._recorder.wiring.start)
    with pytest.raises(KeyboardInterrupt):
        model(x)
    model(x)  # the next forward is recorded
    _, last = _tokens_by_hand(name, model, x)
    expected, _ = _reference(last, last, cosine_weight=1.0, contrastive_weight=0.0)
    assert_close(div.loss(), expected, F32, f"{name} loss after an interrupt")


@pytest.mark.parametrize("name", ["timm_vit_registers", "timm_swin", "timm_swinv2", "tokenspec"])
def test_forward_features_then_forward_head_is_recorded(name):
    """Kind 11: timm's FeatureDistillationTask runs forward_features + forward_head, not model(x)."""
    model, x = _model(name)
    div = _attach(name, model, cosine_weight=1.0, contrastive_weight=0.5, **LOSS_OPTIONS)
    model(x)
    via_call = div.loss()
    features = model.forward_features(x)
    model.forward_head(features)
    assert_close(div.loss(), via_call, F32, f"{name} forward_features loss")
    with pytest.raises(RuntimeError, match="already called"):
        div.loss()
    model.eval()
    model.forward_features(x)
    with pytest.raises(RuntimeError, match="eval mode"):
        div.loss()


@pytest.mark.parametrize("name", ["timm_vit_registers", "timm_swin", "hf_vit", "torchvision", "tokenspec"])
def test_meta_device_model_then_to_empty(name):
    """Kind 13: built on meta, attached with the mixing loss, then to_empty + weights: the head is real."""
    real, x = _model(name)
    with torch.device("meta"):
        model = BUILDERS[name]().train()
    div = _attach(name, model, cosine_weight=1.0, contrastive_weight=0.5, mixing_weight=0.5, **LOSS_OPTIONS)
    assert not div.mixing.head.weight.is_meta
    div.to("cpu")  # what the old error advised: works
    model.to_empty(device="cpu")
    model.load_state_dict(real.state_dict())
    for module in model.modules():  # the buffers a state dict does not hold (Swin's relative position index)
        if hasattr(module, "init_non_persistent_buffers"):
            module.init_non_persistent_buffers()
    mixed, patch_targets, _ = _patch_targets(div, x)
    model(mixed)
    loss = div.loss(patch_targets=patch_targets)
    first, last = _tokens_by_hand(name, model, mixed)
    others, _ = _reference(first, last, cosine_weight=1.0, contrastive_weight=0.5, **LOSS_OPTIONS)
    head = div.mixing.head
    mixing = mixing_loss_reference(last.double(), head.weight.double(), head.bias.double(), patch_targets).mean()
    assert_close(loss, others + 0.5 * mixing, F32, f"{name} meta loss")


def test_head_moves_to_the_models_dtype_at_the_first_loss():
    """Attach right after building the model, then model.to(dtype): the head follows at the first loss()."""
    model, x = _model("timm_swin")
    div = fastpatchdiv.attach(model, mixing_weight=1.0)
    weight = div.mixing.head.weight
    model.to(torch.float64)
    mixed, patch_targets, _ = _patch_targets(div, x.double())
    model(mixed)
    div.loss(patch_targets=patch_targets)
    assert div.mixing.head.weight.dtype == torch.float64
    assert div.mixing.head.weight is weight  # the same Parameter: an optimizer built before still holds it


def test_cutmix_knows_patch_size_and_classes_through_ddp(tmp_path):
    model, x = _model("timm_swin")
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        div = fastpatchdiv.attach(nn.parallel.DistributedDataParallel(model), mixing_weight=1.0)
        assert div.patch_size == (8, 8)
        mixed, patch_targets, soft = div.cutmix(x, torch.arange(3))
        assert mixed.shape == x.shape and patch_targets.shape == (3, 16) and soft.shape == (3, 10)
    finally:
        torch.distributed.destroy_process_group()


def test_tokenspec_checks_its_modules():
    model, _ = _model("tokenspec")
    with pytest.raises(ValueError, match="names no module"):
        fastpatchdiv.attach(model, tokens=TokenSpec(last="nope"))
    with pytest.raises(ValueError, match="needs the first-layer tokens"):
        fastpatchdiv.attach(model, tokens=TokenSpec(last="norm"))
    with pytest.raises(ValueError, match="not a module of the model"):
        fastpatchdiv.attach(model, tokens=TokenSpec(last=nn.LayerNorm(4)))
    fastpatchdiv.attach(model, contrastive_weight=0.0, tokens=TokenSpec(last=model.norm, num_prefix_tokens=1)).remove()


def test_precision_is_checked_and_auto_accepted():
    model, _ = _model("tokenspec")
    with pytest.raises(ValueError, match="precision must be one of"):
        fastpatchdiv.attach(model, precision="fp8")
    fastpatchdiv.attach(model, precision="auto").remove()


def test_timm_attach_is_the_same_entry_point():
    import fastpatchdiv.timm

    assert fastpatchdiv.timm.attach is fastpatchdiv.attach


def test_readme_hugging_face_trainer_compute_loss():
    """The README's Trainer subclass: its compute_loss run on a ViTForImageClassification (no Trainer built)."""
    import re
    import types

    model, x = _model("hf_vit")
    text = Path(__file__).resolve().parents[1].joinpath("README.md").read_text()
    section = text[text.index("### Hugging Face Trainer") :]
    example = re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]
    namespace = {"fastpatchdiv": fastpatchdiv}
    exec(compile(example, "README.md", "exec"), namespace)
    trainer = types.SimpleNamespace(div=fastpatchdiv.attach(model, cosine_weight=1.0, contrastive_weight=0.5))
    inputs = {"pixel_values": x, "labels": torch.tensor([1, 2, 3])}
    loss = namespace["DiversityTrainer"].compute_loss(trainer, model, inputs)
    first, last = _tokens_by_hand("hf_vit", model, x)
    expected, _ = _reference(first, last, cosine_weight=1.0, contrastive_weight=0.5)
    assert_close(loss, model(**inputs).loss.double() + expected, F32, "Trainer.compute_loss")
    model.eval()
    assert_close(namespace["DiversityTrainer"].compute_loss(trainer, model, inputs), model(**inputs).loss, F32, "eval")
