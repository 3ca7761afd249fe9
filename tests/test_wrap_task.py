"""wrap_task: timm's own training tasks (timm.task, timm >= 1.0.23) in a loop shaped like timm's train.py.

train.py builds a task, takes ``model = task.get_trainable_module()``, builds the optimizer from it with
``create_optimizer_v2``, saves with ``CheckpointSaver(..., task=task)``, resumes with
``resume_task_checkpoint`` and calls ``task(input, target)["loss"].backward()`` each step. The tests do the
same with tiny ViTs (depth 1, 32 px, 16 patches). The 2-process DDP run is in tests/test_ddp.py.
"""

import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

timm = pytest.importorskip("timm")
pytest.importorskip("timm.task", reason="timm < 1.0.23 has no training tasks")

import torch.nn.functional as F  # noqa: E402
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402
from timm.task import (  # noqa: E402
    ClassificationTask,
    FeatureDistillationTask,
    LogitDistillationTask,
    MultiLabelClassificationTask,
    TokenDistillationTask,
    resume_task_checkpoint,
)
from timm.utils import CheckpointSaver  # noqa: E402

from fastpatchdiv import cutmix_patches  # noqa: E402
from fastpatchdiv.trainers.timm_task import TrainableWithHead, wrap_task  # noqa: E402

CLASSES, BATCH = 10, 4
OPTIONS = dict(cosine_weight=1.0, contrastive_weight=0.5, mixing_weight=0.5, normalize=True)
WEIGHTS = {"patch_cosine": 1.0, "patch_contrastive": 0.5, "patch_mixing": 0.5}


def vit(dim: int = 32, seed: int = 0):
    torch.manual_seed(seed)
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=dim, num_heads=2, num_classes=CLASSES
    )


def make_task(kind: str, seed: int = 0, smoothing: float = 0.1, **options):
    """train.py's task for ``kind``, wrapped; ``seed`` sets the student's and the patch head's init."""
    student, criterion = vit(seed=seed), LabelSmoothingCrossEntropy(smoothing)  # train.py's default criterion
    if kind == "classification":
        task = ClassificationTask(student, criterion=criterion, verbose=False)
    elif kind == "logit":
        task = LogitDistillationTask(student, vit(48, seed=7), criterion=criterion, temperature=2.0, verbose=False)
    elif kind == "token":  # a distilled DeiT: class and distillation tokens, two heads
        torch.manual_seed(seed)
        student = timm.create_model(
            "deit_tiny_distilled_patch16_224",
            img_size=32,
            patch_size=8,
            depth=1,
            embed_dim=32,
            num_heads=2,
            num_classes=CLASSES,
        )
        student.set_distilled_training(True)
        task = TokenDistillationTask(student, vit(48, seed=7), criterion=criterion, verbose=False)
    else:  # a teacher of another width: the task adds a projection, its own task state beside ours
        task = FeatureDistillationTask(student, vit(48, seed=7), criterion=criterion, verbose=False)
    torch.manual_seed(seed + 100)  # the patch head
    return wrap_task(task, **(options or OPTIONS))


def optimizer_for(task):
    """train.py: ``create_optimizer_v2(task.get_trainable_module(), **optimizer_kwargs(args))``."""
    return create_optimizer_v2(task.get_trainable_module(), "adamw", lr=1e-3, weight_decay=0.05)


def batch(step: int):
    gen = torch.Generator().manual_seed(step)
    return torch.randn(BATCH, 3, 32, 32, generator=gen), torch.randint(0, CLASSES, (BATCH,), generator=gen)


def train(task, optimizer, steps) -> list[dict]:
    """train_one_epoch's step: task(input, target), backward, optimizer step, zero_grad, EMA update."""
    task.get_trainable_module().train()
    results = []
    for step in steps:
        torch.manual_seed(1000 + step)  # the global RNG the task's patch CutMix draws from, as a resumed run's
        result = task(*batch(step))
        result["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        task.update_ema(step=step)
        results.append({k: v.detach() for k, v in result.items()})
    return results


def state(task) -> dict[str, torch.Tensor]:
    """Every trainable tensor: the model's, the distillation projection's and the patch head's."""
    return {k: v.detach().clone() for k, v in task.get_trainable_module().named_parameters()}


KINDS = ["classification", "logit", "feature", "token"]  # feature: the student runs forward_features + forward_head


@pytest.mark.parametrize("kind", KINDS)
def test_resume_is_bit_identical(kind, tmp_path):
    straight = make_task(kind)
    opt = optimizer_for(straight)
    train(straight, opt, range(4))

    first = make_task(kind)
    opt1 = optimizer_for(first)
    train(first, opt1, range(2))
    saver = CheckpointSaver(
        first.get_trainable_module(), opt1, checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path), task=first
    )
    saver.save_recovery(0, batch_idx=1)
    (path,) = glob.glob(str(tmp_path / "recovery-*.pth.tar"))
    saved = torch.load(path, weights_only=False)
    assert "fastpatchdiv" in saved["task_state"]

    resumed = make_task(kind, seed=5)  # another model and head: the checkpoint must replace both
    opt2 = optimizer_for(resumed)
    resume_task_checkpoint(resumed, path, optimizer=opt2, log_info=False)
    train(resumed, opt2, range(2, 4))

    want, got = state(straight), state(resumed)
    assert want.keys() == got.keys() and any("patch_diversity" in k for k in got)
    for name in want:
        assert torch.equal(want[name], got[name]), name


@pytest.mark.parametrize("kind", KINDS)
def test_result_holds_the_weighted_losses_and_their_parts(kind):
    task = make_task(kind)
    (result,) = train(task, optimizer_for(task), [0])
    assert set(WEIGHTS) <= result.keys() and {"output", "base_loss"} <= result.keys()
    assert all(result[k] > 0 for k in WEIGHTS)
    extra = sum(w * result[k] for k, w in WEIGHTS.items())
    torch.testing.assert_close(result["loss"], result["base_loss"] + extra)


def test_the_task_mixes_the_batch_and_trains_on_smoothed_soft_targets():
    task = make_task("classification", smoothing=0.2)
    assert isinstance(task.task.criterion, SoftTargetCrossEntropy)
    images, labels = batch(0)
    torch.manual_seed(3)
    result = task(images, labels)
    torch.manual_seed(3)  # the same draws, made by hand
    mixed, _, soft = cutmix_patches(images, labels, 8, num_classes=CLASSES)
    soft = soft * 0.8 + 0.2 / CLASSES
    logits = task.get_eval_model()(mixed)
    torch.testing.assert_close(result["output"], logits)
    torch.testing.assert_close(result["base_loss"], torch.sum(-soft * F.log_softmax(logits, -1), -1).mean())
    assert task.div.mixing.label_smoothing == 0.2  # the mixing loss takes the criterion's smoothing too


def test_head_reaches_the_optimizer_in_timms_weight_decay_groups():
    task = make_task("classification")
    module = task.get_trainable_module()
    assert isinstance(module, TrainableWithHead)
    head = task.div.mixing.head
    opt = optimizer_for(task)
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    model = task.task.get_trainable_module()
    assert id(head.weight) in decay and id(head.bias) in no_decay
    assert id(model.pos_embed) in no_decay and id(model.cls_token) in no_decay  # model.no_weight_decay()
    assert decay | no_decay == {id(p) for p in module.parameters()}  # each trainable tensor once
    layered = create_optimizer_v2(module, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    scale = next(g["lr_scale"] for g in layered.param_groups if any(p is head.weight for p in g["params"]))
    assert scale == 1.0  # the last layer-decay group, with the classifier


def test_without_mixing_the_task_keeps_its_module_and_criterion():
    task = make_task("classification", cosine_weight=1.0, contrastive_weight=0.0)
    assert task.get_trainable_module() is task.task.get_trainable_module()
    assert isinstance(task.task.criterion, LabelSmoothingCrossEntropy)
    assert "fastpatchdiv" not in task.get_task_state()
    result = task(*batch(0))
    assert "patch_cosine" in result and "patch_mixing" not in result
    torch.testing.assert_close(result["loss"], result["base_loss"] + result["patch_cosine"])


def test_a_wrapped_task_is_not_wrapped_again():
    task = make_task("classification", cosine_weight=1.0, contrastive_weight=0.0)
    with pytest.raises(TypeError, match="already a wrap_task result"):
        wrap_task(task, cosine_weight=1.0)


def test_ema_and_its_checkpoint_state_are_the_wrapped_tasks():
    task = make_task("classification")
    task.setup_ema(decay=0.5)
    train(task, optimizer_for(task), range(2))
    assert task.has_ema() and task.get_trainable_module(ema=True) is task.task.get_trainable_module(ema=True)
    state = task.get_checkpoint_state(ema=True)
    assert "state_dict_ema" in state and "fastpatchdiv" not in state.get("task_state_ema", {})


def test_strict_load_refuses_a_task_state_without_the_head():
    task = make_task("feature", **OPTIONS)  # the projection's task state, no head entry
    state = dict(task.get_task_state())
    state.pop("fastpatchdiv")
    with pytest.raises(RuntimeError, match="no fastpatchdiv patch head"):
        task.load_task_state(state)
    task.load_task_state(state, strict=False)
    off = make_task("classification", cosine_weight=1.0)
    with pytest.raises(RuntimeError, match="has none"):
        off.load_task_state(make_task("classification").get_task_state())


def test_refusals():
    task = make_task("classification")
    with pytest.raises(ValueError, match="--mixup 0 --cutmix 0"):
        task(batch(0)[0], F.one_hot(batch(0)[1], CLASSES).float())
    with pytest.raises(TypeError, match="TrainingTask"):
        wrap_task(vit(), **OPTIONS)
    with pytest.raises(ValueError, match="mixing loss, which is off"):
        wrap_task(ClassificationTask(vit(), verbose=False), cosine_weight=1.0, label_smoothing=0.1)
    with pytest.raises(ValueError, match="multi-label"):
        wrap_task(MultiLabelClassificationTask(vit(), verbose=False), **OPTIONS)
    with pytest.raises(TypeError, match="soft-target"):
        wrap_task(ClassificationTask(vit(), criterion=torch.nn.MSELoss(), verbose=False), **OPTIONS)


DIFF = Path(__file__).resolve().parents[1] / "examples" / "timm_train_py.diff"


def test_train_py_diff_adds_at_most_three_lines_and_names_its_commit():
    text = DIFF.read_text()
    lines = text.splitlines()
    added = [ln for ln in lines if ln.startswith("+") and not ln.startswith("+++")]
    removed = [ln for ln in lines if ln.startswith("-") and not ln.startswith("---")]
    assert 1 <= len(added) <= 3 and not removed, added + removed
    assert re.search(r"\b[0-9a-f]{40}\b", text), "the train.py commit the diff was tested against"
    assert any("wrap_task(task" in ln for ln in added)


@pytest.mark.slow
def test_patched_train_py_trains_and_resumes(tmp_path):
    """The diff applied to timm's train.py (its path in FASTPATCHDIV_TIMM_TRAIN_PY): 1 epoch, then a resume."""
    source = os.environ.get("FASTPATCHDIV_TIMM_TRAIN_PY", "")
    if not source or not Path(source).is_file() or shutil.which("git") is None:
        pytest.skip("set FASTPATCHDIV_TIMM_TRAIN_PY to train.py of pytorch-image-models at the diff's commit")
    work = tmp_path / "timm"
    work.mkdir()
    shutil.copy(source, work / "train.py")
    subprocess.run(["git", "apply", str(DIFF)], cwd=work, check=True)
    Image = pytest.importorskip("PIL.Image")
    gen = torch.Generator().manual_seed(0)
    for split in ("train", "validation"):
        for label in ("a", "b", "c"):
            (tmp_path / "data" / split / label).mkdir(parents=True)
            for i in range(4):
                pixels = torch.randint(0, 256, (32, 32, 3), generator=gen, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(tmp_path / "data" / split / label / f"{i}.png")
    common = [sys.executable, "train.py", str(tmp_path / "data"), "--model", "vit_tiny_patch16_224"]
    common += ["--model-kwargs", "depth=1", "img_size=32", "--img-size", "32", "--num-classes", "3", "-b", "4"]
    common += ["--device", "cpu", "-j", "0", "--no-prefetcher", "--output", str(tmp_path / "out")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([*common, "--epochs", "1", "--experiment", "one"], cwd=work, env=env, capture_output=True)
    assert run.returncode == 0, run.stderr.decode()[-3000:]
    last = tmp_path / "out" / "one" / "last.pth.tar"
    head = torch.load(last, weights_only=False)["task_state"]["fastpatchdiv"]["mixing.head.weight"]
    # A resumed epoch at learning rate 0 (a fresh optimizer: the saved one carries the old rate): the head must
    # come back from the checkpoint bit for bit. test_resume_is_bit_identical covers the optimizer state.
    resume = [*common, "--epochs", "2", "--experiment", "two", "--resume", str(last)]
    resume += ["--no-resume-opt", "--lr-base", "0", "--warmup-lr", "0", "--min-lr", "0"]
    run = subprocess.run(resume, cwd=work, env=env, capture_output=True)
    assert run.returncode == 0, run.stderr.decode()[-3000:]
    again = torch.load(tmp_path / "out" / "two" / "last.pth.tar", weights_only=False)["task_state"]["fastpatchdiv"]
    assert torch.equal(again["mixing.head.weight"], head)
