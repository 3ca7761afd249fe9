"""Artefacts generated from the record list, never typed: results.json, results.md and PNG plots."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from matplotlib.figure import Figure  # the object API: no pyplot state, no GUI backend
from matplotlib.patches import Patch
from matplotlib.ticker import NullLocator

from benchmarks.cases import MODES, OPS, PROVIDERS

BASELINES = ("torch", "torch.compile")
SHORT = {"ok": "", "oom": "OOM", "skipped": "skip", "error": "error"}
COLORS = {"fastpatchdiv": "C0", "torch": "C1", "torch.compile": "C2"}


def write_all(records: list[dict], out: Path, config: dict) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"config": config, "records": records}, indent=1) + "\n")
    pngs = plots(records, out)
    (out / "results.md").write_text(markdown(records, config, [p.name for p in pngs]))
    (out / "summary.md").write_text("\n".join(summary(records)))
    return [out / "results.json", out / "results.md", out / "summary.md", *pngs]


# ----------------------------------------------------------------------------------------------------
# Indexing
# ----------------------------------------------------------------------------------------------------


def _case_records(records):
    return [r for r in records if r["op"] in OPS]


def _ordered(values, order):
    return sorted(set(values), key=lambda v: (order.index(v) if v in order else len(order), v))


def _index(records) -> dict:
    """(op, mode, dtype, D, provider, metric, N) -> record."""
    return {
        (r["op"], r["mode"], r["dtype"], r["D"], r["provider"], r["metric"], r["N"]): r for r in _case_records(records)
    }


def _sections(records):
    """(op, dtype, D) combinations present, in registry order."""
    recs = _case_records(records)
    ops = _ordered([r["op"] for r in recs], list(OPS))
    return [
        (op, dt, d)
        for op in ops
        for dt in sorted({r["dtype"] for r in recs if r["op"] == op})
        for d in sorted({r["D"] for r in recs if r["op"] == op and r["dtype"] == dt})
    ]


# ----------------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------------


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 1:
        return f"{v:.3g}"
    return f"{v:.2g}"


def _cell(r: dict | None, spread: bool = False) -> str:
    if r is None:
        return ""
    if r["status"] != "ok":
        return SHORT.get(r["status"], r["status"]) + "*"
    text = _fmt(r["median"])
    return f"{text} ({_fmt(r['p20'])}–{_fmt(r['p80'])})" if spread and r["p20"] != r["p80"] else text


def _ratio(num: dict | None, den: dict | None) -> str:
    if (
        not num
        or not den
        or num["status"] != "ok"
        or den["status"] != "ok"
        or not den["median"]
        or num["median"] is None
    ):
        return ""
    return _fmt(num["median"] / den["median"]) + "×"


def _header(records, config) -> list[str]:
    env = records[0] if records else {}
    peaks = [r for r in records if r["op"].startswith("peak-")]
    lines = [
        f"# fastpatchdiv benchmarks: {env.get('device_name', '?')}",
        "",
        f"- Machine: {env.get('device_name')} ({env.get('device')})",
        f"- Versions: torch {env.get('torch_version')}, triton {env.get('triton_version')}, "
        f"fastpatchdiv {env.get('fastpatchdiv_version')} (git {env.get('git_commit')})",
        f"- Date: {env.get('date')}; run took {config.get('elapsed_s', '?')} s; load average at start "
        f"{config.get('load_average_at_start', '?')}",
        f"- Command: `{config.get('command', '')}`",
        f"- Shapes: B·N = {config.get('tokens')} patch tokens per case (B = max(1, {config.get('tokens')} // N)); "
        "inputs ~ N(0, D^-1/2); `first` detached, `last` requires grad",
    ]
    for r in peaks:
        what = "Matmul rate" if r["op"] == "peak-matmul" else "Copy bandwidth"
        lines.append(
            f"- {what} ({r['dtype']}, {r['note']}): {_fmt(r['median'])} {r['unit']}"
            f" (p20–p80 {_fmt(r['p20'])}–{_fmt(r['p80'])})"
        )
    backends = sorted({r["backend"] for r in _case_records(records) if r["provider"] == "fastpatchdiv"})
    lines += [
        f'- fastpatchdiv path (backend="auto"): {", ".join(backends)}',
        f"- Timing: {config.get('timing', '')}",
        f"- Memory: {config.get('memory', '')}",
        "",
        "Time in ms as median (p20–p80). Speed-up = baseline time / fastpatchdiv time; saving = baseline "
        "peak memory / fastpatchdiv peak memory (both above the inputs). Throughput counts only the work the op needs "
        "(2·MACs for cosine and contrastive-all; minimal bytes for the O(N·D) ops), against the ceilings above. "
        "A `*` marks a case that did not run; the reason is listed under its table.",
        "",
    ]
    return lines


def _table(idx, op, mode, dtype, d, providers, ns) -> list[str]:
    """Two tables, rows N: time (+ speed-ups, throughput), then peak memory (+ savings)."""
    get = lambda p, m, n: idx.get((op, mode, dtype, d, p, m, n))  # noqa: E731
    unit = next((r["unit"] for n in ns for p in providers if (r := get(p, "throughput", n))), "")
    vs = [p for p in BASELINES if p in providers] if "fastpatchdiv" in providers else []
    rows = [n for n in ns if any(get(p, "time", n) for p in providers)]
    fpd = "fastpatchdiv"

    def speed(p, n, metric):
        return _ratio(get(p, metric, n), get(fpd, metric, n))

    def rate(p, n):
        thr, roof = get(p, "throughput", n), get(p, "roofline", n)
        if not thr:
            return ""
        ok = thr["status"] == "ok" and roof and roof["status"] == "ok"
        return _cell(thr) + (f" ({_fmt(100 * roof['median'])}%)" if ok else "")

    def batch(n):
        return str(next(r["B"] for p in providers if (r := get(p, "time", n))))

    time_cols = ["N", "B"] + [f"{p} ms" for p in providers] + [f"speed-up vs {p}" for p in vs]
    time_cols += [f"{p} {unit} (% of peak)" for p in providers]
    mem_cols = ["N", "B"] + [f"{p} MiB" for p in providers] + [f"saving vs {p}" for p in vs]
    lines = ["| " + " | ".join(time_cols) + " |", "|" + "---|" * len(time_cols)]
    for n in rows:
        cells = [str(n), batch(n)] + [_cell(get(p, "time", n), spread=True) for p in providers]
        cells += [speed(p, n, "time") for p in vs] + [rate(p, n) for p in providers]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| " + " | ".join(mem_cols) + " |", "|" + "---|" * len(mem_cols)]
    for n in rows:
        cells = (
            [str(n), batch(n)] + [_cell(get(p, "memory", n)) for p in providers] + [speed(p, n, "memory") for p in vs]
        )
        lines.append("| " + " | ".join(cells) + " |")
    notes = defaultdict(list)  # one line per distinct reason a case did not run
    for n in rows:
        for p in providers:
            t, m = get(p, "time", n), get(p, "memory", n)
            if t and t["status"] != "ok":
                notes[(p, "", t["note"])].append(n)
            elif m and m["status"] != "ok":
                notes[(p, " memory", m["note"])].append(n)
    over = sorted(
        {p for n in rows for p in providers if (r := get(p, "roofline", n)) and r["status"] == "ok" and r["median"] > 1}
    )
    lines += [""] if notes or over else []
    lines += [
        f"\\* {p}{what}, N = {', '.join(map(str, n_list))}: {note}  " for (p, what, note), n_list in notes.items()
    ]
    if over:
        lines.append(
            f"Above 100% of peak ({', '.join(over)}): this mode did less than the work counted for it, "
            "because the implementation does that work in another mode (e.g. a gradient formed during the "
            "forward); compare the full mode.  "
        )
    return lines + [""]


SUMMARY_NS = (196, 1024, 4096, 16384, 65536)


def summary(records: list[dict]) -> list[str]:
    """The table a reader looks at first: forward + backward at the smallest D, one row per op and N of
    SUMMARY_NS (every N when the run has none of them), every provider's time, fastpatchdiv's speed-up,
    peak memory and fraction of peak.
    README.md embeds it verbatim (tests/test_readme.py checks that it matches the committed file)."""
    recs = [r for r in _case_records(records) if r["mode"] == "full"]
    if not recs:
        return []
    idx = _index(records)
    providers = _ordered([r["provider"] for r in recs], list(PROVIDERS))
    vs = [p for p in BASELINES if p in providers]
    d = min(r["D"] for r in recs)
    ns = sorted({r["N"] for r in recs})
    ns = [n for n in ns if n in SUMMARY_NS] or ns  # a filtered or --quick run shows what it has
    env = recs[0]
    lines = []
    for dtype in _ordered([r["dtype"] for r in recs], ["bf16", "fp32", "fp16"]):
        get = lambda op, p, m, n, dtype=dtype: idx.get((op, "full", dtype, d, p, m, n))  # noqa: E731
        lines += [
            f"Forward + backward, {dtype}, D = {d}, on {env['device_name']} (torch {env['torch_version']}, "
            f"triton {env['triton_version']}, {env['date'][:10]}). Time in ms (median); speed-up = baseline time / "
            "fastpatchdiv time; memory = peak above the inputs.",
            "",
            "| op | N | B | "
            + " | ".join(f"{p} ms" for p in providers)
            + "".join(f" | speed-up vs {p}" for p in vs)
            + " | peak MiB "
            + " / ".join(providers)
            + " | fastpatchdiv % of peak |",
            "|" + "---|" * (5 + len(providers) + len(vs)),
        ]
        notes = defaultdict(list)
        for op in _ordered([r["op"] for r in recs], list(OPS)):
            for n in ns:
                if not get(op, "fastpatchdiv", "time", n):
                    continue
                times = [get(op, p, "time", n) for p in providers]
                for p, t in zip(providers, times, strict=True):
                    if t and t["status"] != "ok":
                        notes[(p, t["note"])].append(f"{op} N={n}")
                roof = get(op, "fastpatchdiv", "roofline", n)
                cells = [op, str(n), str(times[0]["B"])] + [_cell(t) for t in times]
                cells += [_ratio(get(op, p, "time", n), get(op, "fastpatchdiv", "time", n)) for p in vs]
                cells.append(" / ".join(_cell(get(op, p, "memory", n)) or "–" for p in providers))
                cells.append(f"{_fmt(100 * roof['median'])}%" if roof and roof["status"] == "ok" else "")
                lines.append("| " + " | ".join(cells) + " |")
        lines += [""] + [f"\\* {p}, {', '.join(where)}: {note}  " for (p, note), where in notes.items()]
        over = any(
            (r := get(op, "fastpatchdiv", "roofline", n)) and r["status"] == "ok" and r["median"] > 1
            for op in OPS
            for n in ns
        )
        if over:
            lines.append(
                "Above 100% of peak: fastpatchdiv did less work than the count it is charged (the "
                "backward's recomputation is counted, and a path that forms the gradient during the "
                "forward skips it).  "
            )
        lines += [""]
    return lines


def markdown(records: list[dict], config: dict, pngs: list[str] = ()) -> str:
    lines = _header(records, config)
    if table := summary(records):
        lines += ["## Summary", ""] + table
    idx = _index(records)
    recs = _case_records(records)
    providers = _ordered([r["provider"] for r in recs], list(PROVIDERS))
    for op, dtype, d in _sections(records):
        mine = [r for r in recs if (r["op"], r["dtype"], r["D"]) == (op, dtype, d)]
        kind = "compute-bound, O(N²·D)" if OPS[op].compute_bound else "memory-bound, O(N·D)"
        lines += [f"## {op} · {dtype} · D={d} ({kind})", ""]
        for mode in _ordered([r["mode"] for r in mine], list(MODES)):
            lines += [f"### {mode}", ""]
            lines += _table(idx, op, mode, dtype, d, providers, sorted({r["N"] for r in mine if r["mode"] == mode}))
    if pngs:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in pngs] + [""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------


def _failure_label(points: list[dict]) -> str:
    bad = [r for r in points if r["status"] != "ok"]
    if not bad:
        return ""
    by_status = defaultdict(list)
    for r in bad:
        by_status[SHORT.get(r["status"], r["status"])].append(r["N"])
    return " (" + "; ".join(f"{s} N={','.join(map(str, ns))}" for s, ns in by_status.items()) + ")"


def _grid(records, metric, dtype, d, path) -> None:
    recs = [r for r in _case_records(records) if r["metric"] == metric and r["dtype"] == dtype and r["D"] == d]
    ops = _ordered([r["op"] for r in recs], list(OPS))
    modes = _ordered([r["mode"] for r in recs], list(MODES))
    fig = Figure(figsize=(4.2 * len(modes), 3.3 * len(ops)))
    axes = fig.subplots(len(ops), len(modes), squeeze=False)
    unit = "ms" if metric == "time" else "MiB above inputs"
    for (i, op), (j, mode) in ((a, b) for a in enumerate(ops) for b in enumerate(modes)):
        ax = axes[i][j]
        ns = set()
        for p in _ordered([r["provider"] for r in recs], list(PROVIDERS)):
            points = sorted(
                (r for r in recs if (r["op"], r["mode"], r["provider"]) == (op, mode, p)), key=lambda r: r["N"]
            )
            ok = [r for r in points if r["status"] == "ok" and r["median"] and r["median"] > 0]
            ns.update(r["N"] for r in points)
            label = p + _failure_label(points)
            if ok:
                x = [r["N"] for r in ok]
                ax.plot(x, [r["median"] for r in ok], "o-", color=COLORS.get(p), label=label, ms=3)
                ax.fill_between(x, [r["p20"] for r in ok], [r["p80"] for r in ok], color=COLORS.get(p), alpha=0.2)
            else:
                ax.plot([], [], "o-", color=COLORS.get(p), label=label)
        ax.set_xscale("log")
        if ax.has_data() and any(line.get_xdata().size for line in ax.get_lines()):
            ax.set_yscale("log")
        ax.set_xticks(sorted(ns), [str(n) for n in sorted(ns)], rotation=45, fontsize=7)
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_title(f"{op} · {mode}", fontsize=9)
        ax.set_xlabel("N (patches)", fontsize=8)
        ax.set_ylabel(f"{metric} ({unit})", fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(
        f"{metric} vs N · {dtype} · D={d} · B·N constant · {recs[0]['device_name'] if recs else ''}", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _roofline_bars(records, dtype, d, path) -> None:
    """Per op and mode, every provider's fraction of the measured ceiling at the largest N where
    fastpatchdiv ran (or, lacking it, the largest N anyone ran)."""
    recs = [r for r in _case_records(records) if r["metric"] == "roofline" and r["dtype"] == dtype and r["D"] == d]
    providers = _ordered([r["provider"] for r in recs], list(PROVIDERS))
    groups = []
    for op in _ordered([r["op"] for r in recs], list(OPS)):
        for mode in _ordered([r["mode"] for r in recs if r["op"] == op], list(MODES)):
            mine = [r for r in recs if (r["op"], r["mode"]) == (op, mode)]
            ok = [r for r in mine if r["status"] == "ok"]
            fpd = [r["N"] for r in ok if r["provider"] == "fastpatchdiv"]
            n = max(fpd or [r["N"] for r in ok] or [max(r["N"] for r in mine)])
            groups.append((op, mode, n, {r["provider"]: r for r in mine if r["N"] == n}))
    fig = Figure(figsize=(max(6, 1.1 * len(groups) + 2), 4.5))
    ax = fig.subplots()
    width = 0.8 / max(1, len(providers))
    for k, p in enumerate(providers):
        for g, (op, _mode, _n, by_p) in enumerate(groups):
            r = by_p.get(p)
            x = g + (k - (len(providers) - 1) / 2) * width
            hatch = None if OPS[op].compute_bound else "//"
            if r and r["status"] == "ok":
                ax.bar(
                    x,
                    r["median"],
                    width,
                    color=COLORS.get(p),
                    hatch=hatch,
                    edgecolor="white",
                    yerr=[[r["median"] - r["p20"]], [r["p80"] - r["median"]]],
                    capsize=2,
                )
            elif r:
                ax.text(x, 0, SHORT.get(r["status"], r["status"]), rotation=90, ha="center", va="bottom", fontsize=6)
    ax.legend(handles=[Patch(color=COLORS.get(p), label=p) for p in providers], fontsize=7)
    ax.set_xticks(range(len(groups)), [f"{op}\n{mode}\nN={n}" for op, mode, n, _ in groups], fontsize=7)
    ax.set_ylabel("fraction of measured ceiling")
    ax.set_title(
        f"Roofline · {dtype} · D={d}: solid = of matmul rate (O(N²·D) ops), hatched = of copy bandwidth (O(N·D) ops)",
        fontsize=8,
    )
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plots(records: list[dict], out: Path) -> list[Path]:
    paths = []
    for dtype, d in sorted({(r["dtype"], r["D"]) for r in _case_records(records)}):
        for metric in ("time", "memory"):
            paths.append(out / f"{metric}_{dtype}_D{d}.png")
            _grid(records, metric, dtype, d, paths[-1])
        paths.append(out / f"roofline_{dtype}_D{d}.png")
        _roofline_bars(records, dtype, d, paths[-1])
    return paths
