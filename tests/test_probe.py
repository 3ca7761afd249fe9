"""The over-smoothing probe (fastpatchdiv.probe): numbers against a float64 oracle, CLI files, refusals."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

from fastpatchdiv.probe import (
    CheckpointKeys,
    check_vit,
    layer_similarity,
    load_checkpoint,
    load_images,
    main,
    preprocess,
)
from fastpatchdiv.reference import cosine_loss_reference
from tests.helpers import assert_close

ROOT = Path(__file__).resolve().parent.parent
SMALL = dict(patch_size=4, img_size=32, embed_dim=32, depth=3, num_heads=2, dynamic_img_size=True, dynamic_img_pad=True)


def _small_vit(**kwargs) -> torch.nn.Module:
    # a class token and two register tokens: three prefix tokens the probe must drop
    return timm.create_model("vit_tiny_patch16_224", reg_tokens=2, **{**SMALL, **kwargs}).eval()


def _reference(model: torch.nn.Module, images: list[torch.Tensor]) -> torch.Tensor:
    """(L, B) per-block mean |cos| from a float64 copy of the model: block outputs caught by hooks, N x N formula."""
    model64 = _small_vit()
    model64.load_state_dict(model.state_dict())
    model64.double()
    outputs: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for b in model64.blocks]
    columns = []
    with torch.no_grad():
        for image in images:
            outputs.clear()
            model64(image.double().unsqueeze(0))
            columns.append(torch.stack([cosine_loss_reference(t[:, model64.num_prefix_tokens :]) for t in outputs]))
    for h in hooks:
        h.remove()
    return torch.cat(columns, dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layer_similarity_matches_float64_reference(dtype):
    model = _small_vit().to(dtype)
    # Sizes that are not multiples of the patch (padded) and differ between images. The last has
    # 34 x 35 = 1,190 patches (past one tile of the loss, as real photos are) and is nearly flat, so its
    # tokens are nearly parallel (mean |cos| ~0.98): the over-smoothed regime, where float32 sums of
    # |cos| lose digits first.
    images = [
        torch.randn(3, 36, 44),
        torch.randn(3, 32, 32),
        torch.randn(3, 29, 50),
        0.5 + 0.05 * torch.randn(3, 136, 139),
    ]
    got = layer_similarity(model, images)
    assert got.shape == (3, 4) and got.dtype == dtype
    assert got[:, -1].min() > 0.9
    assert_close(got, _reference(model, images), dtype, "per-block mean |cos|")


def test_layer_similarity_batches_a_4d_tensor_like_single_images():
    model = _small_vit()
    images = torch.randn(5, 3, 32, 40)
    batched = layer_similarity(model, images, batch_size=2)
    assert_close(batched, layer_similarity(model, list(images)), torch.float32, "batched vs one at a time")


def test_probe_refuses_a_non_vit():
    with pytest.raises(TypeError, match=r"ResNet is not a ViT the probe supports: it lacks .*forward_intermediates"):
        check_vit(timm.create_model("test_resnet"))
    with pytest.raises(TypeError, match="num_prefix_tokens"):
        layer_similarity(torch.nn.Linear(3, 3), torch.randn(1, 3, 8, 8))


def test_cli_refuses_a_non_vit(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "test_resnet", "--img-size", "32", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--model test_resnet: ResNet is not a ViT the probe supports" in capsys.readouterr().err
    assert not (tmp_path / "similarity.json").exists()


@pytest.mark.slow
def test_cli_default_images_writes_table_plot_and_json(tmp_path):
    """The acceptance command (vit_tiny_patch16_224 on the default sample photos), at --img-size 64 to stay fast."""
    proc = subprocess.run(
        [sys.executable, "-m", "fastpatchdiv.probe", "--model", "vit_tiny_patch16_224", "--img-size", "64"]
        + ["--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert "layer  mean |cos|" in proc.stdout and "2 image(s), 16 patches each" in proc.stdout
    record = json.loads((tmp_path / "similarity.json").read_text())
    assert record["images"] == ["china.jpg", "flower.jpg"] and record["image_sizes"] == [[427, 640]] * 2
    (run,) = record["runs"]
    assert run["init"] == "random (seed 0)" and run["patches"] == [16, 16]
    assert len(run["mean"]) == len(run["std"]) == 12 and len(run["per_image"]) == 2
    assert all(0 <= m <= 1 for m in run["mean"])
    assert (tmp_path / "similarity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_default_size_is_the_images_own(tmp_path):
    model, image = _small_vit(), Image.new("RGB", (50, 29), (200, 10, 30))
    assert preprocess(model, image).shape == (3, 29, 50)
    assert preprocess(model, image, 16).shape == (3, 16, 16)
    # normalised with the model's pretrained_cfg mean/std (vit_tiny: 0.5, 0.5)
    assert_close(preprocess(model, image)[:, 0, 0], torch.tensor([200, 10, 30]) / 255 * 2 - 1, torch.float32)


def test_checkpoints_one_line_each_and_folder_of_images(tmp_path):
    """Two checkpoints of one model name: each gives the numbers of the weights it holds."""
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = timm.create_model("test_vit")
        torch.save({"model": model.state_dict(), "epoch": 3}, tmp_path / f"seed{seed}.pth")
    folder = tmp_path / "images"
    folder.mkdir()
    for i, size in enumerate([(40, 30), (33, 47)]):
        Image.fromarray(torch.randint(0, 256, (*size, 3), dtype=torch.uint8).numpy()).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    args = ["--model", "test_vit", "--images", str(folder), "--out", str(out)]
    record = main([*args, "--checkpoint", str(tmp_path / "seed1.pth"), "--checkpoint", str(tmp_path / "seed2.pth")])
    assert record["images"] == ["0.png", "1.png"] and record["image_sizes"] == [[40, 30], [33, 47]]
    a, b = record["runs"]
    assert a["label"] == "test_vit (seed1.pth)" and a["init"] == "checkpoint"
    assert a["missing_keys"] == a["unexpected_keys"] == [] and a["patches"] == [6, 9]
    assert a["mean"] != b["mean"]
    random_seed1 = main([*args, "--seed", "1"])["runs"][0]
    assert random_seed1["per_image"] == a["per_image"]
    assert json.loads((out / "similarity.json").read_text())["runs"][0]["init"] == "random (seed 1)"


def test_load_checkpoint_prefixes_resampling_and_refusals(tmp_path):
    small = _small_vit(img_size=16)  # 4 x 4 position grid, saved under DDP's "module." prefix
    torch.save({"state_dict": {f"module.{k}": v for k, v in small.state_dict().items()}}, tmp_path / "ddp.pth")
    target = _small_vit()  # 8 x 8 grid: timm's checkpoint_filter_fn resamples the position embedding
    assert load_checkpoint(target, tmp_path / "ddp.pth") == ([], [], ["head.weight", "head.bias"])
    assert_close(target.blocks[0].attn.qkv.weight, small.blocks[0].attn.qkv.weight, torch.float32)

    torch.save(timm.create_model("test_resnet").state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(ValueError, match="none of its .* keys .* is a key of VisionTransformer"):
        load_checkpoint(target, tmp_path / "resnet.pth")
    torch.save(_small_vit(embed_dim=48).state_dict(), tmp_path / "wide.pth")  # another model size
    with pytest.raises(ValueError, match="other shapes than VisionTransformer's .* pass the --model"):
        load_checkpoint(target, tmp_path / "wide.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="expected a state dict"):
        load_checkpoint(target, tmp_path / "list.pth")
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "pickled.pth")  # a module: needs unpickling code
    # timm's loader refuses it and names the class; no pickled code runs
    with pytest.raises(RuntimeError, match="weights_only=True blocked .*torch.nn.modules.linear.Linear"):
        load_checkpoint(target, tmp_path / "pickled.pth")


def test_load_images_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such image file or folder"):
        load_images([tmp_path / "missing.jpg"])
    with pytest.raises(FileNotFoundError, match="no image file"):
        load_images([tmp_path])


def test_mismatched_model_and_checkpoint_counts_and_unknown_names(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["--model", "test_vit", "--model", "test_vit2", *["--checkpoint", "x"] * 3])
    assert "2 --model and 3 --checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", "test_vit", "--model", "vit_nonesuch", "--out", str(tmp_path)])
    assert "timm has no model 'vit_nonesuch'" in capsys.readouterr().err


def test_fixed_size_family_is_resized_to_its_input_size(capsys, tmp_path):
    """A ViT family without timm's dynamic_img_size (here VisionTransformerRelPos) runs at its own input size."""
    Image.new("RGB", (50, 29)).save(tmp_path / "a.png")
    args = ["--model", "test_vit_relpos", "--images", str(tmp_path / "a.png"), "--out", str(tmp_path)]
    (run,) = main(args)["runs"]
    assert run["input_sizes"] == [[160, 160]] and run["patches"] == [100] and run["num_prefix_tokens"] == 0
    assert "no dynamic_img_size: images are resized to 160 x 160" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([*args, "--img-size", "32"])
    assert "takes a fixed input size 160 x 160, not --img-size" in capsys.readouterr().err


def _save_train_py_checkpoint(folder: Path, model: torch.nn.Module, name: str) -> Path:
    """A checkpoint as timm's train.py writes it: timm's CheckpointSaver, args an argparse.Namespace, an EMA."""
    from timm.utils import CheckpointSaver, ModelEmaV3

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()  # optimizer state of tensors, as after a real epoch
    args = argparse.Namespace(model=name, num_classes=model.num_classes, lr=1e-3, amp=True, smoothing=0.1)
    ema = ModelEmaV3(model, decay=0.5)
    saver = CheckpointSaver(model, optimizer, args=args, model_ema=ema, checkpoint_dir=str(folder), max_history=1)
    saver.save_checkpoint(epoch=3, metric=12.5)
    return folder / "last.pth.tar"


@pytest.mark.parametrize("num_classes", [1000, 10])
def test_load_checkpoint_of_timm_train_py_with_any_head(tmp_path, num_classes):
    """Issue 19 kind 14: train.py's checkpoint (args an argparse.Namespace) and another num_classes both load."""
    trained = _small_vit(num_classes=num_classes)
    path = _save_train_py_checkpoint(tmp_path, trained, "vit_tiny_patch16_224")
    saved = torch.load(path, map_location="cpu", weights_only=False)
    assert isinstance(saved["args"], argparse.Namespace) and {"state_dict", "state_dict_ema", "epoch"} <= set(saved)
    with pytest.raises(Exception, match="argparse.Namespace"):  # what the probe tripped on before
        torch.load(path, map_location="cpu", weights_only=True)

    target = _small_vit()  # num_classes 1000: the same head as the checkpoint's or not
    head_before = target.head.weight.clone()
    keys = load_checkpoint(target, path)
    assert isinstance(keys, CheckpointKeys)
    assert keys == ([], [], ["head.weight", "head.bias"])
    # the training weights ("state_dict"), not the EMA's, and the model's own head left as it was
    for got, want in zip(target.blocks.parameters(), trained.blocks.parameters(), strict=True):
        assert torch.equal(got, want)
    assert torch.equal(target.head.weight, head_before)


def test_cli_reads_a_train_py_checkpoint_of_another_head(capsys, tmp_path):
    torch.manual_seed(0)
    path = _save_train_py_checkpoint(tmp_path, timm.create_model("test_vit", num_classes=7), "test_vit")
    Image.new("RGB", (40, 36), (90, 30, 200)).save(tmp_path / "a.png")
    args = ["--model", "test_vit", "--images", str(tmp_path / "a.png"), "--out", str(tmp_path / "out")]
    (run,) = main([*args, "--checkpoint", str(path)])["runs"]
    assert run["init"] == "checkpoint" and run["missing_keys"] == run["unexpected_keys"] == []
    assert run["head_keys_not_loaded"] == ["head.weight", "head.bias"]
    assert "classifier head not loaded (the probe does not use it): head.weight, head.bias" in capsys.readouterr().out


def _cli_error(capsys, argv: list[str]) -> str:
    """Run the CLI expecting argparse's exit 2; return its one stderr line of error."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if "error:" in line]
    return line


def test_cli_bad_checkpoint_files_are_one_line_errors(capsys, tmp_path):
    Image.new("RGB", (40, 36)).save(tmp_path / "a.png")
    base = ["--model", "test_vit", "--images", str(tmp_path / "a.png"), "--out", str(tmp_path / "out")]
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "text.pth").write_text("epoch: 3\nweights: elsewhere\n")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    torch.save(timm.create_model("test_vit").state_dict(), tmp_path / "full.pth")
    whole = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(whole[: len(whole) // 2])  # an interrupted save or copy
    expected = {
        "empty.pth": "empty.pth: the file is empty (0 bytes), not a checkpoint",
        "text.pth": "text.pth: not a PyTorch checkpoint (neither a zip archive nor a pickle: it starts b'epoch: 3",
        "cut.pth": "--checkpoint " + str(tmp_path / "cut.pth") + ": PytorchStreamReader failed reading zip archive",
        "tensor.pth": "tensor.pth: expected a state dict (name -> tensor)",
        "missing.pth": "missing.pth: no such checkpoint file",
    }
    for name, message in expected.items():
        assert message in _cli_error(capsys, [*base, "--checkpoint", str(tmp_path / name)]), name
    assert not (tmp_path / "out" / "similarity.json").exists()


def test_cli_bad_image_size_and_files_are_one_line_errors(capsys, tmp_path):
    base = ["--model", "test_vit", "--out", str(tmp_path / "out")]
    for size in ("0", "-16"):
        assert f"argument --img-size: must be a positive number of pixels, got {size}" in _cli_error(
            capsys, [*base, "--img-size", size]
        )
    (tmp_path / "fake.png").write_text("not an image")
    line = _cli_error(capsys, [*base, "--images", str(tmp_path / "fake.png")])
    assert f"{tmp_path / 'fake.png'}: not an image file PIL can read" in line
    # 12 x 10 px is one 16-px patch once padded; 40 x 20 is 3 x 2 patches
    Image.new("RGB", (12, 10)).save(tmp_path / "tiny.png")
    Image.new("RGB", (40, 20)).save(tmp_path / "ok.png")
    line = _cli_error(capsys, [*base, "--images", str(tmp_path / "ok.png"), str(tmp_path / "tiny.png")])
    assert "fewer than 2 patches (the similarity needs a pair) in tiny.png (1 patch)" in line
    assert "ok.png" not in line
    line = _cli_error(capsys, [*base, "--images", str(tmp_path / "ok.png"), "--img-size", "8"])
    assert "in ok.png (1 patch): use larger images or a larger --img-size than 8" in line


def test_layer_similarity_refuses_an_image_of_one_patch():
    with pytest.raises(ValueError, match=r"images\[1\] \(3 x 4 px\) gives 1 patch token\(s\)"):
        layer_similarity(_small_vit(), [torch.randn(3, 8, 8), torch.randn(3, 3, 4)])
