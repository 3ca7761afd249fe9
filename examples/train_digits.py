"""Train a small, deep timm ViT on scikit-learn's handwritten digits, with and without patch diversification.

The data are scikit-learn's bundled ``load_digits`` (1,797 real 8 x 8 grey images of the digits 0-9,
no download): a fixed stratified split of 1,347 training and 450 held-out images. The model is a
timm VisionTransformer, 12 blocks deep and 32 wide, with 2 x 2 patches (16 patch tokens and a class
token). Each seed trains it twice from the same initialisation, with the same batches and schedule:

- baseline: cross-entropy only;
- diversity: cross-entropy + ``cosine_weight · patch_cosine_loss(last)`` +
  ``contrastive_weight · patch_contrastive_loss(first, last)`` (Gong et al. 2021, arXiv 2104.12753;
  first = patch-embedding output, last = final-norm output without the class token), added to the
  model's own forward by ``fastpatchdiv.timm.attach``.

With ``--mixing-weight W`` (default 0) both runs train on CutMix batches (``fastpatchdiv.cutmix_patches``
on the 2 x 2 patch grid; the cross-entropy takes the mixed images' soft labels) and the diversity run adds
``W · patch_mixing_loss``: a linear patch head, owned by the ``attach`` object and optimised with the
model, classifies every last-layer patch token as the digit its pixels came from.

It reports held-out accuracy, the training loss per epoch and the mean |cos| between patch tokens
after every block on the held-out images (:func:`fastpatchdiv.probe.layer_similarity`), mean ± std
over seeds, and writes ``results.json``, ``results.md``, ``similarity.png`` and ``loss.png``::

    python examples/train_digits.py                      # the committed run: 3 seeds, examples/results/
    python examples/train_digits.py --quick --out /tmp/d  # a few steps (CI)
    python examples/train_digits.py --mixing-weight 0.5 --out /tmp/mix  # + CutMix and the patch mixing loss
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm.auto import tqdm

import fastpatchdiv.timm
from fastpatchdiv import cutmix_patches
from fastpatchdiv.probe import layer_similarity, plot_similarity

RESULTS = Path(__file__).resolve().parent / "results"
# 12 blocks on 16 patch tokens: deep for the data, the regime where the paper sees tokens collapse.
MODEL = dict(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=32, depth=12, num_heads=2)
RUNS = ("baseline", "diversity")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def digits(test_size: float = 0.25) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): (n, 1, 8, 8) float32 standardised with the training pixels' mean/std."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(data.target)
    train, test = train_test_split(range(len(y)), test_size=test_size, random_state=0, stratify=data.target)
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return x[train], y[train], x[test], y[test]


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.inference_mode():
        return (model(x).argmax(dim=1) == y).float().mean().item()


def train_one(
    args, seed: int, run: str, data, total_steps: int, bar, similarity_init: list[float] | None = None
) -> dict:
    """Train one model; the baseline and the diversity run of a seed share init, batches and schedule.

    ``similarity_init``: the seed's probe of the initial weights, when an earlier run of the seed already
    took it (None: probe the fresh model here).
    """
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", **MODEL)
    if similarity_init is None:
        similarity_init = layer_similarity(model, x_test, batch_size=512).mean(dim=1).tolist()
    weights = (args.cosine_weight, args.contrastive_weight, args.mixing_weight) if run == "diversity" else (0, 0, 0)
    cosine_weight, contrastive_weight, mixing_weight = weights
    cutmix = args.mixing_weight > 0  # both runs of a seed see the same mixed batches

    # Both runs go through attach: with every weight 0 its loss() is a zero, so the loops are identical.
    div = fastpatchdiv.timm.attach(
        model,
        cosine_weight=cosine_weight,
        contrastive_weight=contrastive_weight,
        mixing_weight=mixing_weight,
        negatives=args.negatives,
    )

    # div's parameters: the mixing loss's patch head (none when it is off).
    params = [*model.parameters(), *div.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=total_steps, pct_start=0.1)
    order = torch.Generator().manual_seed(seed)
    mixes = torch.Generator().manual_seed(seed)
    patch_size = model.patch_embed.patch_size
    curve = {"ce": [], "total": [], "test_accuracy": []}
    step = 0
    start = time.perf_counter()
    while step < total_steps:
        model.train()
        ce_sum = total_sum = seen = 0.0
        for batch in torch.randperm(len(y_train), generator=order).split(args.batch_size):
            if step == total_steps:
                break
            images, targets = x_train[batch], y_train[batch]
            if cutmix:
                images, patch_targets, targets = cutmix_patches(
                    images, targets, patch_size, num_classes=MODEL["num_classes"], generator=mixes
                )
            ce = F.cross_entropy(model(images), targets)  # targets: (B,) labels, or CutMix's (B, C) soft labels
            loss = ce + (div.loss(patch_targets=patch_targets) if mixing_weight > 0 else div.loss())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            ce_sum += ce.item() * len(batch)
            total_sum += loss.item() * len(batch)
            seen += len(batch)
            bar.update()
            bar.set_postfix_str(f"seed {seed} {run} ce {ce.item():.3f}")
        curve["ce"].append(ce_sum / seen)
        curve["total"].append(total_sum / seen)
        curve["test_accuracy"].append(accuracy(model, x_test, y_test))
    div.remove()
    return {
        "seed": seed,
        "run": run,
        "cosine_weight": cosine_weight,
        "contrastive_weight": contrastive_weight,
        "mixing_weight": mixing_weight,
        "cutmix": cutmix,
        "final_losses": {name: value.item() for name, value in div.losses().items()},
        "steps": step,
        "seconds": round(time.perf_counter() - start, 1),
        "test_accuracy": curve["test_accuracy"][-1],
        "curve": curve,
        # per block, mean over held-out images, before the final norm (as the probe reads it)
        "similarity": layer_similarity(model, x_test, batch_size=512).mean(dim=1).tolist(),
        "similarity_init": similarity_init,
    }


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' if count != 1 else ''}"


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _per_index(rows: list[list[float]]) -> tuple[list[float], list[float]]:
    columns = list(zip(*rows, strict=True))
    pairs = [_mean_std(list(c)) for c in columns]
    return [m for m, _ in pairs], [s for _, s in pairs]


def summarise(records: list[dict]) -> dict:
    summary = {}
    for run in RUNS:
        rs = [r for r in records if r["run"] == run]
        summary[run] = {
            "test_accuracy": _mean_std([r["test_accuracy"] for r in rs]),
            "last_similarity": _mean_std([r["similarity"][-1] for r in rs]),
            "final_ce": _mean_std([r["curve"]["ce"][-1] for r in rs]),
            "similarity": _per_index([r["similarity"] for r in rs]),
            "ce": _per_index([r["curve"]["ce"] for r in rs]),
            "test_accuracy_curve": _per_index([r["curve"]["test_accuracy"] for r in rs]),
        }
    summary["init"] = {"similarity": _per_index([r["similarity_init"] for r in records if r["run"] == "baseline"])}
    return summary


def markdown(summary: dict, args, meta: dict) -> str:
    b, d = summary["baseline"], summary["diversity"]
    init_mean, init_std = summary["init"]["similarity"]
    n = len(args.seeds)
    mixing = getattr(args, "mixing_weight", 0.0)  # absent from runs made before the option existed
    data_note = ""
    if mixing:
        data_note = " Both runs train on CutMix batches mixed on the patch grid (cross-entropy on the soft labels)."
    mixing_note = f", mixing {mixing:g}" if mixing else ""

    def pm(pair, scale=1.0, digits=3):
        return f"{pair[0] * scale:.{digits}f} ± {pair[1] * scale:.{digits}f}"

    lines = [
        f"Digits (scikit-learn `load_digits`: {meta['train']:,} training / {meta['test']:,} held-out 8 x 8 images),"
        f" timm ViT, {MODEL['depth']} blocks, width {MODEL['embed_dim']}, {MODEL['num_heads']} heads,"
        f" {MODEL['patch_size']} x {MODEL['patch_size']} patches ({meta['patches']} patch tokens + class token);"
        f" AdamW, lr {args.lr:g} (one-cycle), batch {args.batch_size}, {_n(meta['epochs'], 'epoch')}"
        f" ({meta['steps']} steps); mean ± std over {_n(n, 'seed')} ({', '.join(map(str, args.seeds))})."
        f" {meta['machine']}, {meta['seconds']:.0f} s"
        f" for all {2 * n} runs (load average {meta['load_before']:.1f} before, {meta['load_after']:.1f} after)."
        f"{data_note}",
        "",
        "| run | held-out accuracy (%) | last-block mean \\|cos\\| | final training cross-entropy |",
        "|---|---|---|---|",
        f"| baseline (cross-entropy) | {pm(b['test_accuracy'], 100, 1)} | {pm(b['last_similarity'])} |"
        f" {pm(b['final_ce'])} |",
        f"| + diversity (cosine {args.cosine_weight:g}, contrastive {args.contrastive_weight:g},"
        f" {args.negatives} negatives{mixing_note}) | {pm(d['test_accuracy'], 100, 1)} | {pm(d['last_similarity'])} |"
        f" {pm(d['final_ce'])} |",
        "",
        "At initialisation (the same weights for both runs of a seed) the last block's mean \\|cos\\| is"
        f" {pm((init_mean[-1], init_std[-1]))}.",
    ]
    return "\n".join(lines) + "\n"


def plot_loss(summary: dict, path: Path, n_seeds: int) -> None:
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    for run, label in (("baseline", "baseline"), ("diversity", "+ diversity losses")):
        for ax, key, scale in ((ax_loss, "ce", 1.0), (ax_acc, "test_accuracy_curve", 100.0)):
            mean, std = summary[run][key]
            epochs = range(1, len(mean) + 1)
            (line,) = ax.plot(epochs, [m * scale for m in mean], marker="o", markersize=3, label=label)
            lo = [(m - s) * scale for m, s in zip(mean, std, strict=True)]
            hi = [(m + s) * scale for m, s in zip(mean, std, strict=True)]
            ax.fill_between(epochs, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    title = f"Training loss (band: std over {_n(n_seeds, 'seed')})"
    ax_loss.set(xlabel="epoch", ylabel="training cross-entropy", title=title)
    ax_acc.set(xlabel="epoch", ylabel="held-out accuracy (%)", title="Held-out accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="a baseline and a diversity run each")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak of the one-cycle schedule (10%% warm-up)")
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--cosine-weight", type=float, default=1.0)
    parser.add_argument("--contrastive-weight", type=float, default=0.5)
    parser.add_argument("--negatives", default="mean", choices=["mean", "window", "all"])
    parser.add_argument(
        "--mixing-weight",
        type=float,
        default=0.0,
        help="weight of the patch mixing loss in the diversity run (default 0: off); > 0 also trains both runs on"
        " CutMix batches",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: this model's ops are tiny, and on a loaded machine a second thread waits"
        " on the first and is several times slower)",
    )
    parser.add_argument("--quick", action="store_true", help="one seed, a few steps: a smoke test (CI)")
    parser.add_argument(
        "--replot", type=Path, metavar="RESULTS_JSON", help="no training: rewrite the table and plots beside it"
    )
    parser.add_argument("--out", type=Path, help="output folder (default examples/results; --quick: ./digits-quick)")
    args = parser.parse_args(argv)
    args.max_steps = 0
    if args.quick:
        args.seeds, args.max_steps = args.seeds[:1], 3
    if args.out is None:
        args.out = Path("digits-quick") if args.quick else RESULTS
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.replot is not None:
        record = json.loads(args.replot.read_text())
        write_report(record, args.replot.parent)
        return record
    torch.set_num_threads(args.threads)
    data = digits()
    x_train, y_train, x_test, _ = data
    steps_per_epoch = math.ceil(len(y_train) / args.batch_size)
    # one step count for the progress bar, every run's loop and schedule, and the report
    steps = args.max_steps or args.epochs * steps_per_epoch
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    records = []
    with tqdm(total=steps * 2 * len(args.seeds), desc="train", unit="step") as bar:
        for seed in args.seeds:
            similarity_init = None
            for run in RUNS:
                records.append(train_one(args, seed, run, data, steps, bar, similarity_init))
                # the seed's runs start from the same weights: probe them once, in its first run
                similarity_init = records[-1]["similarity_init"]
    meta = {
        "train": len(y_train),
        "test": len(x_test),
        "patches": (MODEL["img_size"] // MODEL["patch_size"]) ** 2,
        "epochs": math.ceil(steps / steps_per_epoch),
        "steps": steps,
        "seconds": time.perf_counter() - start,
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "machine": f"{cpu_name()} CPU ({_n(args.threads, 'thread')}, {os.cpu_count()} cores)",
        "torch": torch.__version__,
        "timm": timm.__version__,
    }
    summary = summarise(records)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "model": MODEL,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "meta": meta,
        "summary": summary,
        "runs": records,
    }
    (args.out / "results.json").write_text(json.dumps(record, indent=1) + "\n")
    write_report(record, args.out)
    return record


def write_report(record: dict, out: Path) -> None:
    """results.md, similarity.png and loss.png from a results.json record."""
    summary, args, meta = record["summary"], argparse.Namespace(**record["args"]), record["meta"]
    (out / "results.md").write_text(markdown(summary, args, meta))
    n = len(args.seeds)
    # same colours as loss.png: baseline first, then diversity
    curves = {
        "baseline (trained)": summary["baseline"]["similarity"],
        "+ diversity losses (trained)": summary["diversity"]["similarity"],
        "at initialisation": summary["init"]["similarity"],
    }
    title = "Digits ViT: held-out patch similarity"
    plot_similarity(curves, out / "similarity.png", title=title, band=f"std over {_n(n, 'seed')}")
    plot_loss(summary, out / "loss.png", n)
    print((out / "results.md").read_text())
    print(f"wrote {out}/results.md, similarity.png, loss.png")


if __name__ == "__main__":
    main()
