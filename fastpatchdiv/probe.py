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
        ValueError: an image tensor of the wrong rank.

    Example:
        >>> model = timm.create_model("vit_tiny_patch16_224", dynamic_img_size=True).eval()
        >>> layer_similarity(model, torch.randn(2, 3, 224, 224)).shape
        torch.Size([12, 2])
    """
    check_vit(model)
    param = next(model.parameters())
    batches = _image_batches(images, batch_size)
    model.eval()
    columns = []
    with torch.inference_mode():
        for x in tqdm(batches, desc="forward", unit="batch", disable=not progress, leave=False):
            tokens = model.forward_intermediates(
                x.to(device=param.device, dtype=param.dtype), indices=None, output_fmt="NLC", intermediates_only=True
            )
            columns.append(torch.stack([patch_cosine_loss(t, reduction="none").cpu() for t in tokens]))
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

    Raises:
        FileNotFoundError: a path does not exist, or a folder holds no image file.
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
            with Image.open(file) as image:
                out.append((file.name, image.convert("RGB")))
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


def load_checkpoint(model: torch.nn.Module, path: str | Path) -> tuple[list[str], list[str]]:
    """Load a local state dict into ``model``; return its (missing, unexpected) keys.

    ``torch.load(path, map_location="cpu", weights_only=True)``, so no pickled code runs. Accepts a
    bare state dict or one under "model" or "state_dict" (training checkpoints), strips DDP and
    torch.compile prefixes (timm's ``clean_state_dict``) and passes it through the model family's own
    ``checkpoint_filter_fn`` where timm has one (it resamples a position embedding saved at another
    image size). Loads with ``strict=False`` and returns what did not match, for the caller to report.

    Raises:
        ValueError: the file holds no state dict, or none of its keys is one of the model's.
    """
    from timm.models import clean_state_dict

    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}")
    state = clean_state_dict(dict(state))
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, model)
    result = model.load_state_dict(state, strict=False)
    own = set(model.state_dict())
    if not own & set(state):
        raise ValueError(
            f"{path}: none of its {len(state)} keys (e.g. {next(iter(state), None)!r}) is a key of"
            f" {type(model).__name__} (e.g. {next(iter(own))!r}): a checkpoint of another model?"
        )
    return list(result.missing_keys), list(result.unexpected_keys)


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
        type=int,
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


def main(argv: Sequence[str] | None = None) -> dict:
    """Command-line entry point; returns what it wrote to similarity.json."""
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
    results, curves = [], {}
    for name, checkpoint in tqdm(runs, desc="models", unit="model", disable=len(runs) < 2):
        try:
            model, dynamic = create_vit(name, args.seed)
        except (TypeError, RuntimeError) as exc:
            parser.error(f"--model {name}: {exc}")
        missing = unexpected = []
        if checkpoint is not None:
            try:
                missing, unexpected = load_checkpoint(model, checkpoint)
            except (ValueError, OSError, RuntimeError, pickle.UnpicklingError) as exc:
                parser.error(f"--checkpoint {checkpoint}: {exc}")
            for what, keys in (("missing", missing), ("unexpected", unexpected)):
                if keys:
                    print(f"warning: {checkpoint}: {len(keys)} {what} keys: {', '.join(keys[:8])}", file=sys.stderr)
        fixed = None
        if not dynamic:
            fixed = resolve_data_config(model=model)["input_size"][1:]
            if args.img_size is not None and (args.img_size, args.img_size) != tuple(fixed):
                parser.error(f"--model {name} takes a fixed input size {fixed[0]} x {fixed[1]}, not --img-size")
            print(f"note: {name} has no dynamic_img_size: images are resized to {fixed[0]} x {fixed[1]}")
        size = tuple(fixed) if fixed is not None else args.img_size
        model.to(args.device)
        tensors = [preprocess(model, image, size) for _, image in named_images]
        sim = layer_similarity(model, tensors, progress=len(tensors) > 1)
        mean, std = sim.mean(dim=1), _std(sim)
        label = name if checkpoint is None else f"{name} ({Path(checkpoint).name})"
        if checkpoint is None:
            label += f" (random init, seed {args.seed})"
        patches = [model.patch_embed.dynamic_feat_size(t.shape[-2:]) for t in tensors] if dynamic else None
        n_patches = [h * w for h, w in patches] if patches else [model.patch_embed.num_patches] * len(tensors)
        curves[label] = (mean.tolist(), std.tolist())
        results.append(
            {
                "label": label,
                "model": name,
                "checkpoint": checkpoint,
                "init": "checkpoint" if checkpoint else f"random (seed {args.seed})",
                "missing_keys": missing,
                "unexpected_keys": unexpected,
                "num_prefix_tokens": model.num_prefix_tokens,
                "input_sizes": [list(t.shape[-2:]) for t in tensors],
                "patches": n_patches,
                "mean": mean.tolist(),
                "std": std.tolist(),
                "per_image": sim.T.tolist(),
            }
        )
        print(_table(label, mean, std, len(tensors), n_patches))

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
