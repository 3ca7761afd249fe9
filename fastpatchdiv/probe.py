"""Over-smoothing probe: the mean |cos| between patch tokens after every block of a timm ViT.

Gong et al. 2021 ("Vision Transformers with Patch Diversification", arXiv 2104.12753, Fig. 1) show
that a deep ViT's patch tokens grow alike with depth. This module measures that curve on any timm
ViT and any images, at the images' own resolution: each block's similarity is one call of the fused
:func:`fastpatchdiv.patch_cosine_loss` (``reduction="none"``), so thousands of patches per image cost
O(N·D) memory, never an N x N matrix.

Command line (``python -m fastpatchdiv.probe --help``)::

    python -m fastpatchdiv.probe --model vit_tiny_patch16_224 --out probe-out
    python -m fastpatchdiv.probe --model vit_small_patch16_224 --checkpoint a.pth --checkpoint b.pth

prints a table (layer, mean |cos|, std over images) per model or checkpoint and writes
``similarity.png`` (one line per model or checkpoint) and ``similarity.json``.

Needs timm, matplotlib and tqdm (``pip install "fastpatchdiv[probe]"``); scikit-learn only for the
default images.

Shape:
    images: (B, 3, H, W), normalised for the model (or a list of (3, H, W) of varying sizes); the result
    is (L, B): one mean |cos| per block and image, each from that block's (N, D) patch tokens.

Example:
    >>> from fastpatchdiv.probe import layer_similarity
    >>> layer_similarity(model, images).mean(dim=1)  # the curve of the paper's Fig. 1
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from fastpatchdiv import patch_cosine_loss

try:
    import timm
    from matplotlib.figure import Figure
    from PIL import Image
    from timm.data import create_transform, resolve_data_config
    from tqdm.auto import tqdm
except ImportError as exc:  # the package itself needs only torch and triton
    raise ImportError(
        f"fastpatchdiv.probe needs timm, matplotlib and tqdm ({exc}): pip install 'fastpatchdiv[probe]'"
    ) from exc

__all__ = [
    "CheckpointKeys",
    "check_vit",
    "layer_similarity",
    "load_checkpoint",
    "load_images",
    "main",
    "plot_similarity",
    "preprocess",
    "sample_images",
]

DEFAULT_MODEL = "vit_tiny_patch16_224"


def check_vit(model: torch.nn.Module) -> None:
    """Raise TypeError unless ``model`` is a timm ViT the probe can read block by block.

    The probe needs timm's ``forward_intermediates(x, indices=None, output_fmt="NLC")`` (every
    block's tokens as (B, N, D) with the prefix tokens removed), ``num_prefix_tokens`` and a flat
    ``blocks`` stack: timm's VisionTransformer (ViT, DeiT, ...), Eva, BEiT, CaiT, ... have them;
    convolutional and hierarchical models (ResNet, ConvNeXt, Swin) do not.
    """
    forward_intermediates = getattr(model, "forward_intermediates", None)
    missing = [
        what
        for what, ok in (
            ("forward_intermediates", forward_intermediates is not None),
            ("num_prefix_tokens", isinstance(getattr(model, "num_prefix_tokens", None), int)),
            ("blocks", isinstance(getattr(model, "blocks", None), torch.nn.Sequential | torch.nn.ModuleList)),
        )
        if not ok
    ]
    if not missing:
        import inspect

        if "output_fmt" not in inspect.signature(forward_intermediates).parameters:
            missing = ["forward_intermediates(output_fmt='NLC')"]
    if missing:
        raise TypeError(
            f"{type(model).__name__} is not a ViT the probe supports: it lacks {', '.join(missing)}. The probe reads"
            " every block's patch tokens through timm's forward_intermediates(x, indices=None, output_fmt='NLC');"
            " use a timm ViT such as vit_tiny_patch16_224, deit_small_patch16_224 or eva02_tiny_patch14_224"
        )


def _image_batches(images: torch.Tensor | Sequence[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ValueError(f"images must be (B, C, H, W) or a sequence of (C, H, W), got shape {tuple(images.shape)}")
        return list(images.split(batch_size))
    batches = []
    for i, image in enumerate(images):
        if image.dim() not in (3, 4) or (image.dim() == 4 and image.shape[0] != 1):
            raise ValueError(f"images[{i}] must be (C, H, W) or (1, C, H, W), got shape {tuple(image.shape)}")
        batches.append(image if image.dim() == 4 else image.unsqueeze(0))
    return batches


def layer_similarity(
    model: torch.nn.Module,
    images: torch.Tensor | Sequence[torch.Tensor],
    *,
    batch_size: int = 8,
    progress: bool = False,
) -> torch.Tensor:
    """Per-block, per-image mean |cos| between patch tokens of a timm ViT.

    For block l and image b with patch tokens x_1..x_N (prefix tokens dropped, before the final norm):
    ``sim[l, b] = 1/(N(N-1)) · Σ_{i≠j} |cos(x_i, x_j)|``, computed by
    ``patch_cosine_loss(tokens, reduction="none")`` without an N x N matrix. Runs under
    ``torch.inference_mode()`` and leaves ``model`` in eval mode.

    Args:
        model: a timm ViT (see :func:`check_vit`); to read images of any size, build it with
            ``dynamic_img_size=True`` (and ``dynamic_img_pad=True`` for sizes that are not a multiple of
            the patch size).
        images: preprocessed images, a (B, C, H, W) tensor (run ``batch_size`` at a time) or a sequence
            of (C, H, W) tensors that may differ in size (run one at a time). They are moved to the
            model's device and dtype.
        batch_size: images per forward pass for a 4-D tensor.
        progress: show a tqdm bar over the forward passes.

    Returns:
        (L, B) tensor, L = number of blocks, in float32 (float64 for a float64 model), on the CPU.

    Raises:
        TypeError: ``model`` is not a supported ViT.
        ValueError: an image tensor of the wrong rank, or an image with fewer than 2 patches.

    Example:
        >>> model = timm.create_model("vit_tiny_patch16_224", dynamic_img_size=True).eval()
        >>> layer_similarity(model, torch.randn(2, 3, 224, 224)).shape
        torch.Size([12, 2])
    """
    check_vit(model)
    param = next(model.parameters())
    batches = _image_batches(images, batch_size)
    model.eval()
    columns, first = [], 0
    with torch.inference_mode():
        for x in tqdm(batches, desc="forward", unit="batch", disable=not progress, leave=False):
            tokens = model.forward_intermediates(
                x.to(device=param.device, dtype=param.dtype), indices=None, output_fmt="NLC", intermediates_only=True
            )
            if tokens[0].shape[1] < 2:  # the mean over pairs i != j has no pair
                raise ValueError(
                    f"images[{first}] ({x.shape[-2]} x {x.shape[-1]} px) gives {tokens[0].shape[1]} patch token(s);"
                    " the similarity between patches needs at least 2: use a larger image"
                )
            columns.append(torch.stack([patch_cosine_loss(t, reduction="none").cpu() for t in tokens]))
            first += x.shape[0]
    return torch.cat(columns, dim=1)


def sample_images() -> list[tuple[str, Image.Image]]:
    """scikit-learn's two bundled photos (china.jpg, flower.jpg; 427 x 640 RGB) as (name, PIL image).

    Raises:
        ImportError: scikit-learn is not installed.
    """
    try:
        from sklearn.datasets import load_sample_images
    except ImportError as exc:
        raise ImportError(
            "the probe's default images are scikit-learn's sample photos: pip install scikit-learn"
            " (or 'fastpatchdiv[probe]'), or pass --images PATH..."
        ) from exc
    bunch = load_sample_images()
    return [(Path(f).name, Image.fromarray(a)) for f, a in zip(bunch.filenames, bunch.images, strict=True)]


def load_images(paths: Sequence[str | Path]) -> list[tuple[str, Image.Image]]:
    """Open image files, and every image file (by PIL's known extensions) of a folder, as RGB.

    Args:
        paths: image files and folders; a folder contributes its files with an image extension, sorted.

    Returns:
        (file name, RGB PIL image) pairs, in order.

    Raises:
        FileNotFoundError: a path does not exist, or a folder holds no image file.
        ValueError: a file PIL cannot read as an image (named).
    """
    extensions = {ext.lower() for ext in Image.registered_extensions()}
    out = []
    for path in map(Path, paths):
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in extensions)
            if not files:
                raise FileNotFoundError(f"no image file ({', '.join(sorted(extensions)[:6])}, ...) in folder {path}")
        elif path.is_file():
            files = [path]
        else:
            raise FileNotFoundError(f"no such image file or folder: {path}")
        for file in files:
            try:
                with Image.open(file) as image:
                    out.append((file.name, image.convert("RGB")))
            except OSError as exc:  # PIL's UnidentifiedImageError, a truncated file, an unreadable one
                raise ValueError(f"{file}: not an image file PIL can read ({exc})") from exc
    return out


def preprocess(
    model: torch.nn.Module, image: Image.Image, img_size: int | tuple[int, int] | None = None
) -> torch.Tensor:
    """One image -> a (3, H, W) tensor normalised with the model's ``pretrained_cfg`` mean and std.

    Through timm's ``resolve_data_config`` and ``create_transform`` (eval mode, ``crop_pct=1``):
    ``img_size=None`` keeps the image's own H x W; an int S resizes the shorter side to S and crops the
    centre S x S; an (H, W) pair resizes to H x W.
    """
    cfg = resolve_data_config(model=model)
    size = (image.height, image.width) if img_size is None else img_size
    transform = create_transform(
        input_size=size, interpolation=cfg["interpolation"], mean=cfg["mean"], std=cfg["std"], crop_pct=1.0
    )
    return transform(image)


class CheckpointKeys(NamedTuple):
    """What :func:`load_checkpoint` did not load: lists of state-dict keys.

    Attributes:
        missing: keys of the model the checkpoint lacks (they keep their random init).
        unexpected: keys of the checkpoint the model lacks.
        head: the checkpoint's classifier-head keys, never loaded: the probe reads the blocks' tokens,
            not the head, so a checkpoint trained with another ``num_classes`` loads as well.
    """

    missing: list[str]
    unexpected: list[str]
    head: list[str]


def _head_prefixes(model: torch.nn.Module) -> tuple[str, ...]:
    # timm names each family's classifier module(s) in pretrained_cfg["classifier"]: "head" for ViT and
    # Eva, ("head", "head_dist") for distilled DeiT
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head"
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    return tuple(f"{name}." for name in names)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint file, through timm's own loader; errors as ValueError/FileNotFoundError."""
    from timm.models import load_state_dict

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: the file is empty (0 bytes), not a checkpoint")
    with path.open("rb") as file:
        head = file.read(16)
    # torch.save writes a zip archive ("PK"), or with the legacy format a pickle (protocol >= 2: 0x80);
    # anything else (a text file, an image) would reach the unpickler and fail with a bare KeyError or
    # IndexError
    if path.suffix != ".safetensors" and not head.startswith((b"PK", b"\x80")):
        raise ValueError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a pickle: it starts {head!r})")
    try:
        # timm's loader: weights_only=True with argparse.Namespace allowed (train.py saves its args as
        # one), "state_dict" or "model" of a training checkpoint, DDP / torch.compile prefixes stripped,
        # .safetensors files. use_ema=False: the weights that trained, as "model" or "state_dict".
        state = load_state_dict(str(path), use_ema=False, device="cpu", weights_only=True)
    except (EOFError, IndexError, KeyError, UnicodeDecodeError, pickle.UnpicklingError) as exc:
        # what torch.load's weights-only unpickler raises on a damaged or truncated pickle
        raise ValueError(f"{path}: not a PyTorch checkpoint (torch.load failed: {type(exc).__name__} {exc})") from exc
    except AttributeError as exc:
        # timm's clean_state_dict calls .items() on whatever the file holds (a list, a tensor)
        raise ValueError(f"{path}: expected a state dict (name -> tensor), got something else ({exc})") from exc
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict (name -> tensor), got a dict of other values")
    return state


def load_checkpoint(model: torch.nn.Module, path: str | Path) -> CheckpointKeys:
    """Load a local checkpoint's weights into ``model``; return the keys that did not load.

    Reads the file with timm's ``timm.models.load_state_dict`` under ``weights_only=True``, so no pickled
    code runs: a bare state dict, a training checkpoint with its weights under "state_dict" or "model"
    (timm train.py's, whose ``args`` is an ``argparse.Namespace``: timm allows that one class), or a
    ``.safetensors`` file; DDP and torch.compile prefixes stripped. The state then goes through the model
    family's own ``checkpoint_filter_fn`` where timm has one (it resamples a position embedding saved at
    another image size). The classifier head is never loaded (the probe does not use it), so checkpoints
    trained with any ``num_classes`` load. Loads with ``strict=False``.

    Args:
        model: the timm model to load into.
        path: the checkpoint file.

    Returns:
        :class:`CheckpointKeys`: missing, unexpected and (ignored) head keys, for the caller to report.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is empty or no PyTorch checkpoint, holds no state dict, none of its keys
            is one of the model's, or its tensors have other shapes (a checkpoint of another model size).
        RuntimeError: the file needs pickled classes beyond tensors and ``argparse.Namespace`` (timm's
            message names them), or a damaged zip archive.
    """
    path = Path(path)
    state = _read_state_dict(path)
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, model)
    prefixes = _head_prefixes(model)
    head = [k for k in state if k.startswith(prefixes)]
    state = {k: v for k, v in state.items() if not k.startswith(prefixes)}
    own = {k for k in model.state_dict() if not k.startswith(prefixes)}
    if not own & set(state):
        raise ValueError(
            f"{path}: none of its {len(state)} keys (e.g. {next(iter(state), None)!r}) is a key of"
            f" {type(model).__name__} (e.g. {next(iter(own))!r}): a checkpoint of another model?"
        )
    shapes = model.state_dict()
    wrong = [k for k, v in state.items() if k in shapes and tuple(v.shape) != tuple(shapes[k].shape)]
    if wrong:
        k = wrong[0]
        raise ValueError(
            f"{path}: {len(wrong)} of its tensors have other shapes than {type(model).__name__}'s (e.g. {k!r}: "
            f"{tuple(state[k].shape)} against {tuple(shapes[k].shape)}): pass the --model it was trained as"
        )
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(prefixes)]
    return CheckpointKeys(missing, list(result.unexpected_keys), head)


def create_vit(name: str, seed: int = 0) -> tuple[torch.nn.Module, bool]:
    """A randomly initialised (seeded) timm model; returns (model, reads any image size).

    Families with timm's ``dynamic_img_size`` (VisionTransformer, Eva) are built with
    ``dynamic_img_size=True, dynamic_img_pad=True``: any H x W, the bottom and right edges zero-padded
    to a multiple of the patch size, the position embedding resampled to the patch grid. Others keep
    their fixed input size.

    Raises:
        RuntimeError: timm does not know ``name``.
        TypeError: the model is not a supported ViT (:func:`check_vit`).
    """
    torch.manual_seed(seed)
    try:
        model = timm.create_model(name, pretrained=False, dynamic_img_size=True, dynamic_img_pad=True)
        dynamic = True
    except TypeError as exc:
        if "dynamic_img" not in str(exc):
            raise
        torch.manual_seed(seed)
        model = timm.create_model(name, pretrained=False)
        dynamic = False
    check_vit(model)
    return model.eval(), dynamic


def plot_similarity(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | Path,
    *,
    title: str = "Patch similarity vs depth",
    band: str = "std over images",
) -> None:
    """Plot mean |cos| against block index, one line per entry of ``curves`` (label -> (mean, std)).

    The std is drawn as a shaded band; ``band`` names it in the legend's title. Writes ``path`` (PNG).
    """
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for label, (mean, std) in curves.items():
        layers = range(1, len(mean) + 1)
        (line,) = ax.plot(layers, mean, marker="o", markersize=3, label=label)
        lo = [m - s for m, s in zip(mean, std, strict=True)]
        hi = [m + s for m, s in zip(mean, std, strict=True)]
        ax.fill_between(layers, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("block")
    ax.set_ylabel("mean |cos| between patch tokens")
    ax.set_title(title)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", title=f"band: {band}", title_fontsize="small")
    fig.savefig(path, dpi=120)


def _std(values: torch.Tensor) -> torch.Tensor:
    # sample std over images (n - 1); one image has no spread to report
    return values.std(dim=-1) if values.shape[-1] > 1 else torch.zeros(values.shape[:-1], dtype=values.dtype)


def _runs(models: list[str], checkpoints: list[str]) -> list[tuple[str, str | None]]:
    if not checkpoints:
        return [(m, None) for m in models]
    if len(models) == 1:
        return [(models[0], c) for c in checkpoints]
    if len(models) == len(checkpoints):
        return list(zip(models, checkpoints, strict=True))
    raise ValueError(
        f"{len(models)} --model and {len(checkpoints)} --checkpoint: give one model for all checkpoints,"
        " or one model per checkpoint (paired in order)"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastpatchdiv.probe",
        description=(
            "Mean |cos| between patch tokens after every block of a timm ViT (the over-smoothing curve of"
            " Gong et al. 2021, Fig. 1), computed with fastpatchdiv's fused cosine loss at the images' own"
            " resolution. Prints a table per model and writes OUT/similarity.png and OUT/similarity.json."
        ),
        epilog=(
            "Weights: the probe never downloads pretrained weights (this machine cannot reach a model hub)."
            " Without --checkpoint a model is randomly initialised, seeded by --seed. To probe trained weights,"
            " save a state dict where you can get them, e.g. torch.save(timm.create_model(NAME,"
            " pretrained=True).state_dict(), 'w.pth'), and pass --checkpoint w.pth."
        ),
    )
    parser.add_argument(
        "--model",
        action="append",
        metavar="NAME",
        help=f"timm ViT name (default {DEFAULT_MODEL}); repeat for one line per model",
    )
    parser.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="PATH",
        help="local state dict for the model, loaded with torch.load(weights_only=True); repeat for one line per"
        " checkpoint (one --model for all, or one --model per checkpoint, paired in order)",
    )
    parser.add_argument(
        "--images",
        nargs="+",
        metavar="PATH",
        help="image files or folders (default: scikit-learn's two bundled sample photos, 427 x 640)",
    )
    parser.add_argument(
        "--img-size",
        type=_positive_int,
        metavar="S",
        help="resize the shorter side to S and crop the centre S x S (default: each image at its own size: the"
        " model is built with timm's dynamic_img_size=True and dynamic_img_pad=True, so the bottom/right edges"
        " are zero-padded (after normalisation) to a multiple of the patch size and the position embedding is"
        " resampled to the patch grid; models without dynamic_img_size use their fixed input size)",
    )
    parser.add_argument("--out", default="probe-out", metavar="DIR", help="output folder (default ./probe-out)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random init (default 0)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    return parser


def _positive_int(text: str) -> int:
    # argparse turns this ValueError into "argument --img-size: invalid _positive_int value"; the
    # ArgumentTypeError's own message reads better
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of pixels, got {value}")
    return value


def _load_reported(parser: argparse.ArgumentParser, model: torch.nn.Module, checkpoint: str) -> CheckpointKeys:
    """load_checkpoint, its failures as one-line CLI errors and its unloaded keys as stderr lines."""
    try:
        keys = load_checkpoint(model, checkpoint)
    except (ValueError, OSError, RuntimeError, pickle.UnpicklingError) as exc:
        # load_checkpoint's own messages start with the path; timm's and torch's do not
        message = str(exc)
        parser.error(message if message.startswith(str(checkpoint)) else f"--checkpoint {checkpoint}: {message}")
    for what, names in (("missing", keys.missing), ("unexpected", keys.unexpected)):
        if names:
            print(f"warning: {checkpoint}: {len(names)} {what} keys: {', '.join(names[:8])}", file=sys.stderr)
    if keys.head:
        print(f"note: {checkpoint}: classifier head not loaded (the probe does not use it): {', '.join(keys.head)}")
    return keys


def _probe_run(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    run: tuple[str, str | None],
    named_images: list[tuple[str, Image.Image]],
) -> dict:
    """One model (and checkpoint) over all images: its similarity.json record; CLI errors via ``parser``."""
    name, checkpoint = run
    try:
        model, dynamic = create_vit(name, args.seed)
    except (TypeError, RuntimeError) as exc:
        parser.error(f"--model {name}: {exc}")
    keys = CheckpointKeys([], [], []) if checkpoint is None else _load_reported(parser, model, checkpoint)
    fixed = None
    if not dynamic:
        fixed = resolve_data_config(model=model)["input_size"][1:]
        if args.img_size is not None and (args.img_size, args.img_size) != tuple(fixed):
            parser.error(f"--model {name} takes a fixed input size {fixed[0]} x {fixed[1]}, not --img-size")
        print(f"note: {name} has no dynamic_img_size: images are resized to {fixed[0]} x {fixed[1]}")
    size = tuple(fixed) if fixed is not None else args.img_size
    model.to(args.device)
    tensors = [preprocess(model, image, size) for _, image in named_images]
    patches = [model.patch_embed.dynamic_feat_size(t.shape[-2:]) for t in tensors] if dynamic else None
    n_patches = [h * w for h, w in patches] if patches else [model.patch_embed.num_patches] * len(tensors)
    counts = zip((file for file, _ in named_images), n_patches, strict=True)
    few = [f"{file} ({n} patch{'' if n == 1 else 'es'})" for file, n in counts if n < 2]
    if few:  # checked before the forward, to name the files (layer_similarity knows only indices)
        parser.error(
            f"--model {name}: fewer than 2 patches (the similarity needs a pair) in {', '.join(few)}:"
            " use larger images" + (f" or a larger --img-size than {args.img_size}" if args.img_size else "")
        )
    sim = layer_similarity(model, tensors, progress=len(tensors) > 1)
    mean, std = sim.mean(dim=1), _std(sim)
    label = name if checkpoint is None else f"{name} ({Path(checkpoint).name})"
    if checkpoint is None:
        label += f" (random init, seed {args.seed})"
    print(_table(label, mean, std, len(tensors), n_patches))
    return {
        "label": label,
        "model": name,
        "checkpoint": checkpoint,
        "init": "checkpoint" if checkpoint else f"random (seed {args.seed})",
        "missing_keys": keys.missing,
        "unexpected_keys": keys.unexpected,
        "head_keys_not_loaded": keys.head,
        "num_prefix_tokens": model.num_prefix_tokens,
        "input_sizes": [list(t.shape[-2:]) for t in tensors],
        "patches": n_patches,
        "mean": mean.tolist(),
        "std": std.tolist(),
        "per_image": sim.T.tolist(),
    }


def main(argv: Sequence[str] | None = None) -> dict:
    """Command-line entry point.

    Args:
        argv: the arguments (default ``sys.argv[1:]``); ``--help`` lists them.

    Returns:
        What it wrote to OUT/similarity.json.

    Raises:
        SystemExit: status 2 with a one-line message on bad arguments or inputs (an unknown or non-ViT
            model, a checkpoint that does not load, a file that is no image, an image under 2 patches).
    """
    parser = _parser()
    args = parser.parse_args(argv)
    models = args.model or [DEFAULT_MODEL]
    unknown = [m for m in models if not timm.is_model(m)]
    if unknown:
        parser.error(f"timm has no model {', '.join(map(repr, unknown))} (see timm.list_models('vit_*'))")
    try:
        runs = _runs(models, args.checkpoint)
        named_images = load_images(args.images) if args.images else sample_images()
    except (ValueError, FileNotFoundError, ImportError) as exc:
        parser.error(str(exc))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    results = [
        _probe_run(parser, args, run, named_images)
        for run in tqdm(runs, desc="models", unit="model", disable=len(runs) < 2)
    ]
    curves = {r["label"]: (r["mean"], r["std"]) for r in results}
    record = {
        "what": "mean |cos| between patch tokens after each block (prefix tokens dropped, before the final norm)",
        "std": "sample std over images",
        "images": [name for name, _ in named_images],
        "image_sizes": [[image.height, image.width] for _, image in named_images],
        "img_size": args.img_size,
        "device": args.device,
        "seconds": round(time.perf_counter() - start, 3),
        "versions": {"torch": torch.__version__, "timm": timm.__version__},
        "runs": results,
    }
    (out / "similarity.json").write_text(json.dumps(record, indent=1) + "\n")
    plot_similarity(curves, out / "similarity.png", title=f"Patch similarity vs depth ({len(named_images)} images)")
    print(f"wrote {out / 'similarity.png'} and {out / 'similarity.json'} ({record['seconds']:.1f} s)")
    return record


def _table(label: str, mean: torch.Tensor, std: torch.Tensor, n_images: int, patches: list[int]) -> str:
    span = f"{min(patches)}-{max(patches)}" if min(patches) != max(patches) else f"{patches[0]}"
    lines = [f"{label}: {n_images} image(s), {span} patches each", f"{'layer':>5}  {'mean |cos|':>10}  {'std':>8}"]
    rows = zip(mean.tolist(), std.tolist(), strict=True)
    lines += [f"{i:>5}  {m:>10.4f}  {s:>8.4f}" for i, (m, s) in enumerate(rows, 1)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
