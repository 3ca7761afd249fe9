"""The static report's records, acceptance verdicts, static.json and static.md.

``verdicts(doc)`` is what the tests read: each verdict says what it checks, how many launches (or work
records) it checked, which failed, and whether it decides the exit status (fit, spill, errors do).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

# Multiply-adds of forward + backward per image, in units of N²·D, of a FlashAttention-shaped design
# that never recomputes a score tile per feature chunk (issue 18); the call the work record measures.
REFERENCE = {"cosine": (2.5, "need_grad=True"), "contrastive-all": (3.0, "need_a=False")}
REFERENCE_NEED_A = 4.0  # contrastive "all" with detach_first=False: dA too
WORK_SHAPE = (4096, 4)  # (N, B) of the work records
WORK_DS = (384, 768, 1024)
WORK_BOUND = 1.25
TENSOR_CORE_PRECISIONS = ("tf32", "bf16", "fp16")
FILL_TOKENS = 4096  # B·N from which every O(N²·D) launch must have a program per SM


# ------------------------------------------------------------------------------------------- records
def launch_record(ctx: dict, launch: dict, result: dict) -> dict:
    """One launch: where it runs (``ctx``), what it is (``Launch.summary()``) and what the compiler says
    about its binary (``result``)."""
    stores, loads = result.get("spill_stores"), result.get("spill_loads")
    rec = {k: ctx[k] for k in ("arch", "op")} | dict(kernel=launch["kernel"])
    rec |= {k: ctx[k] for k in ("dtype", "precision", "D", "N", "B")}
    rec |= dict(
        shared_bytes=result.get("shared_bytes"),
        shared_limit=ctx["shared_limit"],
        spills=None if stores is None else stores + loads,
        local_bytes=result.get("local_bytes"),
        registers=result.get("registers"),
        tensor_core=result.get("tensor_core"),
        programs=launch["programs"],
        sms=ctx["sms"],
    )
    rec |= {k: launch[k] for k in ("grid", "num_warps", "num_stages", "calls", "repeats", "compile")}
    if "error" in result:
        rec["error"] = result["error"]
    return rec


def work_records(work: dict) -> list[dict]:
    """Issued against reference multiply-adds per op, dtype, precision and D at the work shape; the issued
    count is the largest over the archs (launchers may plan per target), each arch's kept beside it."""
    N, B = WORK_SHAPE
    by_case = defaultdict(dict)
    for (op, dtype, precision, D, arch), macs in work.items():
        if op in REFERENCE:
            by_case[(op, dtype, precision, D)][arch] = macs
    records = []
    for (op, dtype, precision, D), per_arch in sorted(by_case.items()):
        factor, call = REFERENCE[op]
        issued = max(macs[call] for macs in per_arch.values())
        reference = round(factor * B * N * N * D)
        rec = dict(op=op, dtype=dtype, precision=precision, D=D, N=N, B=B, call=call, issued_macs=issued)
        rec.update(reference_macs=reference, ratio=round(issued / reference, 4))
        rec["issued_macs_by_arch"] = {str(arch): macs[call] for arch, macs in sorted(per_arch.items())}
        if op == "contrastive-all":  # detach_first=False: dA as well, against 4·N²·D
            both = max(macs["need_a=True"] for macs in per_arch.values())
            rec["need_a"] = dict(issued_macs=both, reference_macs=round(REFERENCE_NEED_A * B * N * N * D))
            rec["need_a"]["ratio"] = round(both / rec["need_a"]["reference_macs"], 4)
        records.append(rec)
    return records


def build(launches, binaries: dict, results: dict, work, errors, versions: dict, config: dict) -> dict:
    """The whole report as one JSON-ready dict: versions, config, verdicts, errors, work, launches, compiles.

    Args:
        launches: (context, ``Launch.summary()``) pairs; binaries: ``Binary.info()`` by key; results: the
            compiler's numbers by key; work, errors: as ``benchmarks.static.capture_task`` returns them.
    """
    records = [launch_record(ctx, launch, results[launch["compile"]]) for ctx, launch in launches]
    compiles = {key: binaries[key] | results[key] for key in dict.fromkeys(r["compile"] for r in records)}
    doc = dict(versions=versions, config=config, verdicts=[], errors=errors, work=work_records(work))
    doc.update(launches=records, compiles=compiles)
    doc["verdicts"] = verdicts(doc)
    return doc


# ------------------------------------------------------------------------------------------ verdicts
def _launch_name(r: dict) -> str:
    return f"sm_{r['arch']} {r['kernel']} {r['precision']} D={r['D']}"


def _verdict(name: str, what: str, checked: list, failed: list, describe, gates_exit: bool) -> dict:
    """``examples``: the distinct descriptions of the failures (N and B folded), at most 12."""
    examples = list(dict.fromkeys(map(describe, failed)))
    ok = None if not checked else not failed
    return dict(
        name=name,
        what=what,
        ok=ok,
        checked=len(checked),
        failed=len(failed),
        gates_exit=gates_exit,
        examples=examples[:12],
        more_examples=max(0, len(examples) - 12),
    )


def verdicts(doc: dict) -> list[dict]:
    """The acceptance checks of issue 18 over the report's launches and work records."""
    L = doc["launches"]
    good = [r for r in L if "error" not in r]
    dots = [r for r in good if r["tensor_core"] != "n/a"]
    sm90 = [r for r in dots if r["arch"] == 90 and r["precision"] in TENSOR_CORE_PRECISIONS]
    filled = [r for r in dots if r["B"] * r["N"] >= FILL_TOKENS]
    work = [w for w in doc["work"] if w["D"] in WORK_DS]
    failed_launch = [r for r in L if "error" in r] + doc["errors"]
    return [
        _verdict(
            "errors",
            "every launch captured and compiled",
            L + doc["errors"],
            failed_launch,
            lambda r: f"{r.get('kernel', r['op'])} sm_{r['arch']} {r['precision']} D={r['D']}: {r['error'][:160]}",
            True,
        ),
        _verdict(
            "fit",
            "shared memory of every launch within its target's per-block opt-in limit",
            good,
            [r for r in good if r["shared_bytes"] > r["shared_limit"]],
            lambda r: f"{_launch_name(r)}: {r['shared_bytes']:,} B > {r['shared_limit']:,} B",
            True,
        ),
        _verdict(
            "spill",
            "no spill (ptxas spill bytes 0, local memory 0)",
            good,
            [r for r in good if r["spills"] is None or r["spills"] > 0 or (r["local_bytes"] or 0) > 0],
            lambda r: f"{_launch_name(r)}: spills {r['spills']} B, local {r['local_bytes']} B",
            True,
        ),
        _verdict(
            "wgmma",
            "wgmma on sm_90 for every kernel with a tl.dot in tf32, bf16 and fp16",
            sm90,
            [r for r in sm90 if r["tensor_core"] != "wgmma"],
            lambda r: f"{_launch_name(r)}: {r['tensor_core']}",
            False,
        ),
        _verdict(
            "work",
            f"issued / reference multiply-adds <= {WORK_BOUND} at D = 384, 768, 1024",
            work,
            [w for w in work if w["ratio"] > WORK_BOUND],
            lambda w: f"{w['op']} {w['precision']} D={w['D']}: {w['ratio']:.2f}",
            False,
        ),
        _verdict(
            "grid",
            f"programs >= SMs for every launch with a tl.dot at B·N >= {FILL_TOKENS}",
            filled,
            [r for r in filled if r["programs"] < r["sms"]],
            lambda r: f"{_launch_name(r)}: {r['programs']} programs < {r['sms']} SMs (N={r['N']}, B={r['B']})",
            False,
        ),
    ]


def launchable(doc: dict) -> bool:
    """The exit status's verdicts: no error, every launch fits, nothing spills."""
    return all(v["ok"] is not False for v in doc["verdicts"] if v["gates_exit"])


def verdict_line(v: dict) -> str:
    state = {True: "PASS", False: "FAIL", None: "NOT CHECKED"}[v["ok"]]
    tail = f": {v['failed']} of {v['checked']} fail" if v["ok"] is False else f" ({v['checked']} checked)"
    return f"{state} {v['name']}: {v['what']}{tail}"


# ---------------------------------------------------------------------------------------------- files
def write(doc: dict, out: Path) -> list[Path]:
    """Write ``static.json`` (one launch, work record or compile a line) and ``static.md`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    parts = []
    for key, value in doc.items():
        if isinstance(value, list) and value:
            body = ",\n".join("  " + json.dumps(item) for item in value)
            parts.append(f' "{key}": [\n{body}\n ]')
        elif key == "compiles" and value:
            body = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in value.items())
            parts.append(f' "{key}": {{\n{body}\n }}')
        else:
            parts.append(f" {json.dumps(key)}: {json.dumps(value)}")
    paths = [out / "static.json", out / "static.md"]
    paths[0].write_text("{\n" + ",\n".join(parts) + "\n}\n")
    paths[1].write_text("\n".join(markdown(doc)) + "\n")
    return paths


CANNOT_SHOW = [
    "- **Time.** Nothing here ran on a GPU: no kernel time, no achieved TFLOP/s or bandwidth, no effect of",
    "  occupancy, memory traffic, L2 hits or wave quantisation. Fit, instruction, work and grid fill are",
    "  necessary for speed, not evidence of it: `benchmarks/gpu_check.sh` on a GPU measures time.",
    "- **Launches not swept**: masks, non-contiguous inputs and the shapes outside the lists above; autocast",
    "  inputs in fp32 with 16-bit operands (the matrix kernels see the same operands, the first and last",
    "  kernels do not). The mixing op's matrix products are torch GEMMs, not in this report.",
]


def markdown(doc: dict) -> list[str]:
    """static.md: header, verdicts, what it cannot show, the work table, one compile table per arch."""
    v, c = doc["versions"], doc["config"]
    dirty = " with uncommitted changes to the kernels or the package" if v.get("dirty") else ""
    lines = [
        "# Static report: fastpatchdiv's Triton kernels compiled as launched, per GPU target",
        "",
        f"torch {v['torch']}, triton {v['triton']}, commit {v['commit']}{dirty}; `{c['command']}` "
        f"({c['elapsed_s']:.0f} s).",
        f"Archs {c['arch']}; dtypes {c['dtype']}; D {c['D']}; N {c['N']}; B {c['B']}: "
        f"{len(doc['launches'])} launches, {len(doc['compiles'])} distinct compiles.",
        "",
        "Each launch is captured from the launchers on meta tensors under a stand-in triton driver (signature,",
        "constexprs, specialisation attributes, warps, stages, grid) and compiled with `triton.compile` for the",
        "target. Shared = triton's dynamic shared memory (what it checks at launch against the opt-in limit);",
        "registers from `cuobjdump -res-usage`; spills = ptxas spill store + load bytes; tensor core from the",
        "PTX (wgmma.mma_async, mma.sync, tcgen05.mma; none = a tl.dot on FMA units, n/a = no tl.dot).",
        "",
        "## Verdicts",
        "",
    ]
    for verdict in doc["verdicts"]:
        gate = " (exit status)" if verdict["gates_exit"] else ""
        lines.append(f"- **{verdict_line(verdict)}**{gate}")
        lines += [f"  - {e}" for e in verdict["examples"]]
        if verdict["more_examples"]:
            lines.append(f"  - and {verdict['more_examples']} more in static.json")
    lines += ["", "## What this report cannot show", "", *CANNOT_SHOW, ""]
    return lines + work_table(doc["work"]) + compile_tables(doc)


def work_table(work: list[dict]) -> list[str]:
    if not work:
        return []
    w0 = work[0]
    lines = [
        f"## Work at N = {w0['N']}, B = {w0['B']}: multiply-adds issued by forward + backward",
        "",
        "Reference: cosine 2.5·B·N²·D, contrastive-all 3·B·N²·D (`first` detached; 4·B·N²·D without). Issued:",
        "the tile loops of every launch, padded tiles included; the largest over the archs of the run.",
        "",
        "| op | dtype | precision | D | issued MACs | reference MACs | issued / reference | not detached |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for w in work:
        extra = f"{w['need_a']['ratio']:.2f}" if "need_a" in w else ""
        lines.append(
            f"| {w['op']} | {w['dtype']} | {w['precision']} | {w['D']} | {w['issued_macs']:.3e} | "
            f"{w['reference_macs']:.3e} | {w['ratio']:.2f} | {extra} |"
        )
    return lines + [""]


def _blocks(constexprs: dict) -> str:
    """Tile sizes (BLOCK_M=64 as M64) and the switches that are on."""
    sizes = [f"{k.removeprefix('BLOCK').lstrip('_')}{v}" for k, v in constexprs.items() if "BLOCK" in k]
    return " ".join(sizes + [k for k, v in constexprs.items() if v is True])


def _values(rows: list[dict], field: str) -> str:
    return ", ".join(map(str, sorted(set(r[field] for r in rows))))


def compile_row(comp: dict, rows: list[dict]) -> str:
    """One table row per distinct compile; its launches' D, N, B and programs folded."""
    r0 = rows[0]
    calls = "; ".join(dict.fromkeys(c for r in rows for c in r["calls"]))
    dots = [r for r in rows if r["tensor_core"] != "n/a" and r["B"] * r["N"] >= FILL_TOKENS]
    short = sum(r["programs"] < r["sms"] for r in dots)
    fill = "n/a" if not dots else "ok" if not short else f"**{short} short**"
    head = f"| {r0['op']} | {r0['kernel']} | {calls} | {_values(rows, 'precision')} | {_values(rows, 'D')} | "
    if "error" in comp:
        return head + "**compile error** (static.json) |" + " |" * 10
    fits = "yes" if comp["shared_bytes"] <= r0["shared_limit"] else "**NO**"
    spilled = r0["spills"] != 0 or r0["local_bytes"]
    spills = f"**{r0['spills']} / local {r0['local_bytes']}**" if spilled else "0"
    programs = sorted(r["programs"] for r in rows)
    most = max(r["repeats"] for r in rows)
    repeats = f" (up to {most:,} launches a call)" if most > 1 else ""
    return (
        f"{head}{_blocks(comp['constexprs'])} | {comp['num_warps']}/{comp['num_stages']} | {comp['registers']} | "
        f"{spills} | {comp['shared_bytes']:,} | {fits} | {comp['tensor_core']} | {_values(rows, 'N')} | "
        f"{_values(rows, 'B')} | {programs[0]:,}–{programs[-1]:,}{repeats} | {fill} |"
    )


def compile_tables(doc: dict) -> list[str]:
    by_compile = defaultdict(list)
    for r in doc["launches"]:
        by_compile[r["compile"]].append(r)
    lines = []
    for arch in sorted({r["arch"] for r in doc["launches"]}):
        first = next(r for r in doc["launches"] if r["arch"] == arch)
        lines += [
            f"## sm_{arch}: {first['sms']} SMs, opt-in shared limit {first['shared_limit']:,} B",
            "",
            "| op | kernel | calls | precision | D | blocks, switches | warps/stages | registers | spills (B) | "
            "shared (B) | fits | tensor core | N | B | programs | programs >= SMs |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        keys = [k for k, rows in by_compile.items() if rows[0]["arch"] == arch]
        keys.sort(
            key=lambda k: (
                by_compile[k][0]["op"],
                by_compile[k][0]["kernel"],
                by_compile[k][0]["precision"],
                by_compile[k][0]["D"],
                by_compile[k][0]["N"],
            )
        )
        lines += [compile_row(doc["compiles"][k], by_compile[k]) for k in keys]
        lines.append("")
    return lines
