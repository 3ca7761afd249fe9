"""Artefacts generated from the records, never typed: results.json, results.md, summary.md and PNG plots."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from matplotlib.figure import Figure  # the object API: no pyplot state, no GUI backend

from benchmarks.cases import AUTOCAST, MODES, OPS, PROVIDERS, compute_dtype

SHORT = {"oom": "OOM", "skipped": "skip", "error": "error"}
COLORS = {"fastpatchdiv": "C0", "torch": "C1", "torch.compile": "C2", "keops": "C3", "inf-cl": "C4"}
FLAG = "⚠"
FLAG_NOTE = (
    f"{FLAG} above 100% of the ceiling: an anomaly, not a result (the cost model counts more work than the path "
    "did, or the ceiling was measured under load; benchmarks/README.md)."
)


def write_all(records: list[dict], out: Path, config: dict) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"config": config, "records": records}, indent=1) + "\n")
    keys = sorted({(m, r["dtype"], r["D"]) for r in _cases(records) for m in ("time", "memory", "roofline")})
    pngs = [out / f"{metric}_{dtype}_D{d}.png" for metric, dtype, d in keys]
    table = summary(records)
    (out / "results.md").write_text(markdown(records, config, [p.name for p in pngs], table))
    (out / "summary.md").write_text("\n".join(table))
    for (metric, dtype, d), path in zip(keys, pngs, strict=True):  # last: the tables survive a plotting error
        _grid(records, metric, dtype, d, path)
    return [out / "results.json", out / "results.md", out / "summary.md", *pngs]


DTYPE_ORDER = ["fp32", "bf16", "fp16", *AUTOCAST]


def autocast_note(dtype: str) -> str:
    """For an "amp-*" dtype, a sentence saying what its inputs and autocast were; else ""."""
    if dtype not in AUTOCAST:
        return ""
    low = compute_dtype(dtype)
    return (
        f" {dtype}: every provider's loss under torch.autocast({low}), its backward outside; `last` (cosine: its "
        f"input) in fp32 as a ViT's final LayerNorm gives it under autocast, `first` in {low} as the patch "
        f"embedding gives it; % of peak of the {low} matmul rate."
    )


def _cases(records, **match) -> list[dict]:
    return [r for r in records if r["op"] in OPS and all(r[k] == v for k, v in match.items())]


def _ordered(values, order) -> list:
    return sorted(set(values), key=lambda v: (order.index(v) if v in order else len(order), v))


def _fmt(v: float) -> str:
    return "0" if v == 0 else f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}" if abs(v) >= 1 else f"{v:.2g}"


def _cell(r: dict | None, spread: bool = False) -> str:
    """A value, or why there is none: "OOM*", "skip*", "CUDA only*" (a short reason is shown whole)."""
    if r is None:
        return ""
    if r["status"] == "n/a":
        return "n/a"
    if r["status"] != "ok":
        return (r["note"] if len(r["note"]) <= 12 else SHORT.get(r["status"], r["status"])) + "*"
    if r["metric"] == "roofline":
        return f"{_fmt(100 * r['median'])}%" + (FLAG if r["median"] > 1 else "")
    text = _fmt(r["median"])
    return f"{text} ({_fmt(r['p20'])}–{_fmt(r['p80'])})" if spread and r["p20"] != r["p80"] else text


def _ratio(num: dict | None, den: dict | None) -> str:
    ok = num and den and num["status"] == den["status"] == "ok" and den["median"]
    return _fmt(num["median"] / den["median"]) + "×" if ok else ""


class Rows:
    """The one row builder of every table: cells per N for an (op, mode, dtype, D), and the footnotes of the
    cases that did not run (one line per provider and reason) and of flagged anomalies."""

    def __init__(self, records: list[dict]):
        self.idx = {(r["op"], r["mode"], r["dtype"], r["D"], r["provider"], r["metric"], r["N"]): r for r in records}
        self.notes: dict[tuple, dict] = defaultdict(dict)
        self.flagged = False

    def get(self, key: tuple, provider: str, metric: str, n: int) -> dict | None:
        return self.idx.get((*key, provider, metric, n))

    def row(self, key: tuple, n: int, providers: list[str], cols: str, where: str = "N") -> list[str]:
        """``cols`` letters: t = times, T = times with p20–p80, s = speed-ups vs the others, m = memory,
        M = memory joined by " / ", v = memory savings, r = rate (% of peak), f = fastpatchdiv's % of peak."""
        get = lambda p, m: self.get(key, p, m, n)  # noqa: E731
        others = [p for p in providers if p != "fastpatchdiv"]
        for p in providers:
            t, m, roof = get(p, "time"), get(p, "memory"), get(p, "roofline")
            ran = t and t["status"] == "ok"
            rated = ("r" in cols or ("f" in cols and p == "fastpatchdiv")) and ran  # e.g. no ceiling of its dtype
            for r, what in ((t, ""), (m if ran else None, " memory"), (roof if rated else None, " % of peak")):
                if r and r["status"] not in ("ok", "n/a"):
                    self.notes[(p + what, r["note"])].setdefault(where, []).append(str(n))
        cells = []
        for c in cols:
            if c in "tT":
                cells += [_cell(get(p, "time"), spread=c == "T") for p in providers]
            elif c in "sv":
                metric = "time" if c == "s" else "memory"
                cells += [_ratio(get(p, metric), get("fastpatchdiv", metric)) for p in others]
            elif c == "m":
                cells += [_cell(get(p, "memory")) for p in providers]
            elif c == "M":
                cells.append(" / ".join(_cell(get(p, "memory")) or "–" for p in providers))
            else:
                rated = [p for p in providers if c == "r" or p == "fastpatchdiv"]
                for p in rated:
                    thr, roof = get(p, "throughput"), get(p, "roofline")
                    self.flagged |= bool(roof and roof["status"] == "ok" and roof["median"] > 1)
                    rate = _cell(thr) if c == "r" and thr and thr["status"] == "ok" else ""
                    cells.append(f"{rate} ({_cell(roof)})" if rate else _cell(roof))
        return cells

    def footnotes(self) -> list[str]:
        at = lambda where: "; ".join(f"{w}={', '.join(dict.fromkeys(ns))}" for w, ns in where.items())  # noqa: E731
        lines = [f"\\* {p}, {at(where)}: {note}  " for (p, note), where in self.notes.items()]
        lines += [FLAG_NOTE] if self.flagged else []
        self.notes.clear()
        self.flagged = False
        return lines


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _compile_notes(records) -> list[str]:
    what = "s more than its next call (compilation, cached on disk; not in the timings)"
    first = "First call of {provider} for {op} ({dtype}, D = {D}): {median:.3g} " + what + "  "
    return [first.format(**r) for r in _cases(records, metric="compile")]


def summary(records: list[dict]) -> list[str]:
    """The table a reader looks at first: forward + backward at the smallest D, a row per op and N, every
    provider's time, fastpatchdiv's speed-up over each of the others, peak memory and % of peak.
    README.md embeds it verbatim (tests/test_readme.py checks that it matches the committed file)."""
    recs = _cases(records, mode="full")
    if not recs:
        return []
    d, env, rows = min(r["D"] for r in recs), recs[0], Rows(records)
    providers = _ordered([r["provider"] for r in recs], PROVIDERS)
    ns = sorted({r["N"] for r in recs})
    lines = []
    for dtype in _ordered([r["dtype"] for r in recs], DTYPE_ORDER):
        lines += [
            f"Forward + backward, {dtype}, D = {d}, on {env['device_name']} (torch {env['torch_version']}, triton "
            f"{env['triton_version']}, {env['date'][:10]}). Time in ms (median); speed-up = other's time / "
            "fastpatchdiv's; memory = peak above the inputs; % of peak = of the best matmul rate (O(N·D) ops: copy "
            "bandwidth) measured in the run, for the work fastpatchdiv's path does." + autocast_note(dtype),
            "",
        ]
        header = ["op", "N", "B"] + [f"{p} ms" for p in providers] + [f"speed-up vs {p}" for p in providers[1:]]
        body = []
        for op in _ordered([r["op"] for r in recs], list(OPS)):
            for n in ns:
                first = rows.get((op, "full", dtype, d), "fastpatchdiv", "time", n)
                if first:
                    cells = rows.row((op, "full", dtype, d), n, providers, "tsMf", where=f"{op} N")
                    body.append([op, str(n), str(first["B"])] + cells)
        header += ["peak MiB " + " / ".join(providers), "fastpatchdiv % of peak"]
        lines += _table(header, body) + [""] + rows.footnotes() + _compile_notes(_cases(records, D=d)) + [""]
    return lines


def markdown(records: list[dict], config: dict, pngs: list[str] = (), table: list[str] | None = None) -> str:
    """results.md; ``table``: ``summary(records)`` when the caller has it."""
    env, sw = records[0] if records else {}, config.get("sweep") or {}
    tokens, table = sw.get("tokens"), summary(records) if table is None else table
    compute_bound = ", ".join(op for op, o in OPS.items() if o.min_bytes is None)
    peaks = [r for r in records if r["op"].startswith("peak-")]
    lines = [
        f"# fastpatchdiv benchmarks: {env.get('device_name', '?')}",
        "",
        f"- Machine: {env.get('device_name')} ({env.get('device')}); torch {env.get('torch_version')}, triton "
        f"{env.get('triton_version')}, fastpatchdiv {env.get('fastpatchdiv_version')} (git {env.get('git_commit')})",
        f"- Date: {env.get('date')}; the run took {config.get('elapsed_s', '?')} s; load average at its start "
        f"{config.get('load_average_at_start', '?')}, at its end {config.get('load_average_at_end', '?')}",
        f"- Command: `{config.get('command', '')}`",
        f"- Shapes: B·N = {tokens} patch tokens per case (B = max(1, {tokens} // N)); inputs ~ N(0, D^-1/2); "
        "`first` detached, `last` requires grad",
        *(
            f"- Ceiling {r['op'][5:]} ({r['dtype']}): {_fmt(r['median'])} {r['unit']} median, {r['note']}"
            for r in peaks
        ),
        f"- Sweep: {sw.get('kind')}. CPU ({config.get('threads')} threads): 1 discarded call, then >= "
        f"{sw.get('cpu_min_reps')} calls until {sw.get('cpu_budget_s')} s (<= {sw.get('cpu_max_reps')}), a call over "
        f"{sw.get('long_call_s')} s timed once; memory: peak RSS growth in a fresh child. CUDA: do_bench "
        f"({sw.get('cuda_warmup_ms')} / {sw.get('cuda_rep_ms')} ms); max_memory_allocated. See benchmarks/README.md",
        "",
        "Time in ms as median (p20–p80). Speed-up = other's time / fastpatchdiv's; saving = other's peak memory / "
        "fastpatchdiv's (both above the inputs). Throughput counts the work each provider's path does "
        f"(benchmarks/cases.py, COST: 2·MACs for the compute-bound ops ({compute_bound}); minimal bytes for the "
        "O(N·D) ops), as a % of the best ceiling above. A `*` marks a case that did not run; the reason is under "
        "its table.",
        "",
    ]
    lines += ["## Summary", "", *table] if table else []
    rows, recs = Rows(records), _cases(records)
    for op, dtype, d in sorted({(r["op"], r["dtype"], r["D"]) for r in recs}, key=lambda k: (list(OPS).index(k[0]), k)):
        mine = _cases(records, op=op, dtype=dtype, D=d)
        providers = _ordered([r["provider"] for r in mine], PROVIDERS)
        others, batch = [p for p in providers if p != "fastpatchdiv"], {r["N"]: str(r["B"]) for r in mine}
        unit = OPS[op].rate_unit
        bound = f"compute-bound, O({OPS[op].unit_label})" if OPS[op].min_bytes is None else "memory-bound, O(N·D)"
        lines += [f"## {op} · {dtype} · D={d} ({bound})", ""]
        lines += [autocast_note(dtype).strip(), ""] if dtype in AUTOCAST else []
        for mode in _ordered([r["mode"] for r in mine], list(MODES)):
            key, ns = (op, mode, dtype, d), sorted({r["N"] for r in mine if r["mode"] == mode})
            head = ["N", "B"] + [f"{p} ms" for p in providers] + [f"speed-up vs {p}" for p in others]
            head += [f"{p} {unit} (% of peak)" for p in providers]
            times = _table(head, [[str(n), batch[n]] + rows.row(key, n, providers, "Tsr") for n in ns])
            head = ["N", "B"] + [f"{p} MiB" for p in providers] + [f"saving vs {p}" for p in others]
            mems = _table(head, [[str(n), batch[n]] + rows.row(key, n, providers, "mv") for n in ns])
            lines += [f"### {mode}", "", *times, "", *mems, "", *rows.footnotes(), ""]
    lines += ["## First calls", "", *notes, ""] if (notes := _compile_notes(records)) else []
    return "\n".join(lines + (["## Plots", ""] + [f"![{p}]({p})" for p in pngs] + [""] if pngs else []))


def _grid(records, metric, dtype, d, path) -> None:
    """Time, memory or fraction of the ceiling vs N, a panel per op and mode, a line per provider with its
    p20–p80 band; the legend lists the N that did not run, and a roofline panel marks 100% (above: anomaly)."""
    recs = _cases(records, metric=metric, dtype=dtype, D=d)
    ops, modes = _ordered([r["op"] for r in recs], list(OPS)), _ordered([r["mode"] for r in recs], list(MODES))
    fig = Figure(figsize=(max(5.0, 4.2 * len(modes)), 3.3 * len(ops)))
    axes = fig.subplots(len(ops), len(modes), squeeze=False)
    for (i, op), (j, mode) in ((a, b) for a in enumerate(ops) for b in enumerate(modes)):
        ax, ns, plotted = axes[i][j], sorted({r["N"] for r in recs if r["op"] == op}), metric == "roofline"
        for p in _ordered([r["provider"] for r in recs if r["op"] == op], PROVIDERS):
            points = sorted(_cases(recs, op=op, mode=mode, provider=p), key=lambda r: r["N"])
            ok = [r for r in points if r["status"] == "ok" and r["median"]]
            plotted |= bool(ok)
            bad = defaultdict(list)
            for r in points:
                if r["status"] != "ok":
                    bad[_cell(r).rstrip("*")].append(str(r["N"]))
            label = p + "".join(f" ({s} N={','.join(n)})" for s, n in bad.items())
            ax.plot([r["N"] for r in ok], [r["median"] for r in ok], "o-", color=COLORS.get(p), label=label, ms=3)
            band = ([r["N"] for r in ok], [r["p20"] for r in ok], [r["p80"] for r in ok])
            ax.fill_between(*band, color=COLORS.get(p), alpha=0.2)
        if metric == "roofline":
            ax.axhline(1.0, color="red", lw=0.8, ls="--")
        ax.set(xscale="log", yscale="log" if plotted else "linear", xlabel="N (patches)", ylabel=UNITS[metric])
        ax.set_title(f"{op} · {mode}")
        ax.set_xticks(ns, [str(n) for n in ns], rotation=45, fontsize=7, minor=False)
        ax.set_xticks([], minor=True)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(f"{metric} vs N · {dtype} · D={d} · B·N constant\n{recs[0]['device_name']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


UNITS = {
    "time": "time (ms)",
    "memory": "peak MiB above the inputs",
    "roofline": "fraction of the best ceiling\n(matmul; O(N·D) ops: copy)",
}
