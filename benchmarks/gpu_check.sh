#!/usr/bin/env bash
# One prepared command for a lent CUDA GPU: what a GPU must check first, in <= 8 minutes with the default
# budgets. In order:
#   1. the test pass on CUDA (the kernels run on the GPU);
#   2. the static report for this GPU's architecture (python -m benchmarks --static --arch <cc>), when the
#      suite has --static: what the compiler predicts, beside what the GPU then measures;
#   3. the benchmark at the goal sizes (N = 4096, 16384, 65536 patches; D = 384 and 768, ViT-S and ViT-B),
#      cosine and contrastive "all", the autocast case first: dtype amp-bf16 = every provider's loss under
#      torch.autocast(bfloat16), `last` fp32 (a timm ViT's final LayerNorm), `first` bf16 (the patch
#      embedding), against the naive formula and torch.compile of it under the same autocast; then fp32, bf16.
#
#   bash benchmarks/gpu_check.sh [WORK_DIR]          (default WORK_DIR: /tmp/fastpatchdiv-gpu)
#
# WORK_DIR gets environment.txt, pytest.log, static.log, benchmarks.log and results/, which is ready to be
# copied to benchmarks/results/<gpu>/ (<gpu> is the slug in results/versions.json): results.json, results.md,
# summary.md, plots, versions.json (torch, triton, CUDA, GPU name, capability, driver, commit, date) and
# static/ (static.json, static.md). All of it is packed into gpu-check.tar.gz; when $OUT is set (the device
# tool's folder) the tarball, summary.md, versions.json and the logs are copied there.
#
# The package is not installed there and nothing can be downloaded: PYTHONPATH=<repo> plus a
# fastpatchdiv/kernels link (the installed package maps fastpatchdiv.kernels to kernels/) make it
# importable from the repository root. Peers: wheels carried in .whl/ are installed offline into
# /tmp/site; without them the keops and inf-cl rows say "not installed". A copy without .git names no
# commit: pass GIT_COMMIT=<sha>.
#
# Budgets (seconds, environment): TOTAL_S for everything (450); TEST_S for the test pass (180, killed
# after); STATIC_S for the static report (90, killed after); BENCH_S after which the benchmark starts no
# new case (the rest are recorded as skipped): what TOTAL_S leaves, less 75 s for the last case and the
# report; BENCH_KILL_S a hard stop.
# Arguments (environment): PYTEST_ARGS; STATIC_ARCH (default: this GPU's compute capability, e.g. 90; none
# on CPU) and STATIC_ARGS (--d 384 768); BENCH_ARGS (default: the goal sizes above; BENCH_ARGS= with
# nothing runs the suite's default CUDA sweep). DEVICE=cpu allows a dry run without a GPU, e.g.
#   DEVICE=cpu PYTEST_ARGS=tests/test_readme.py BENCH_ARGS=--quick bash benchmarks/gpu_check.sh /tmp/dry
set -uo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/fastpatchdiv-gpu}
TOTAL_S=${TOTAL_S:-450}
TEST_S=${TEST_S:-180}
STATIC_S=${STATIC_S:-90}
DEVICE=${DEVICE:-cuda}
# The harness's subprocess tests are the CPU CI's smoke of it; here the benchmark run that follows is that smoke.
HARNESS=tests/test_benchmarks.py
PYTEST_ARGS=${PYTEST_ARGS:---deselect $HARNESS::test_quick_run_writes_every_artefact \
    --deselect $HARNESS::test_pytest_benchmark_entry_point_runs_the_cli_cases --deselect $HARNESS::test_keops_provider_on_a_tiny_case}
# "-" not ":-": an empty BENCH_ARGS is a choice (the default sweep), an unset one the goal sizes
BENCH_ARGS=${BENCH_ARGS-"--dtype amp-bf16 fp32 bf16 --ops cosine contrastive-all --n 4096 16384 65536 --d 384 768"}
STATIC_ARGS=${STATIC_ARGS:-"--d 384 768"}
rm -rf "$WORK" && mkdir -p "$WORK/results"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
[ -e fastpatchdiv/kernels ] || ln -s ../kernels fastpatchdiv/kernels
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
{
    date -u; git log -1 --oneline 2>/dev/null; nvidia-smi 2>&1
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    python3 -c "import pykeops; print('pykeops', pykeops.__version__)" 2>&1 | tail -1
    python3 -c "import inf_cl; print('inf-cl importable')" 2>&1 | tail -1
} >"$WORK/environment.txt"
# versions.json: what benchmarks/results/<gpu>/ records beside the tables; "slug" names that folder
DRIVER=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)
DEVICE="$DEVICE" DRIVER="$DRIVER" python3 - "$WORK/results/versions.json" <<'PY' | tee -a "$WORK/environment.txt"
import json, os, sys

import torch
from benchmarks.runner import device_slug, environment

env = environment(os.environ["DEVICE"])
cuda = env["device"] == "cuda"
versions = {
    "slug": device_slug(env),
    "device_name": env["device_name"],
    "capability": "%d%d" % torch.cuda.get_device_capability() if cuda else None,
    "driver": os.environ.get("DRIVER") or None,
    "torch": env["torch_version"],
    "cuda": torch.version.cuda,
    "triton": env["triton_version"],
    "fastpatchdiv": env["fastpatchdiv_version"],
    "commit": os.environ.get("GIT_COMMIT") or env["git_commit"],
    "date": env["date"],
}
open(sys.argv[1], "w").write(json.dumps(versions, indent=1) + "\n")
print(f"versions: {versions}; copy results/ to benchmarks/results/{versions['slug']}/")
PY
SLUG=$(python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['slug'])" "$WORK/results/versions.json" 2>/dev/null)
t0=$SECONDS
# shellcheck disable=SC2086  # PYTEST_ARGS, STATIC_ARGS and BENCH_ARGS are word lists
timeout -k 10 "$TEST_S" python3 -m pytest -q -p no:cacheprovider $PYTEST_ARGS 2>&1 | tee "$WORK/pytest.log" | tail -5
echo "test pass: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s (124: stopped at TEST_S=$TEST_S)" | tee -a "$WORK/pytest.log"

t1=$SECONDS
ARCH=${STATIC_ARCH:-$(python3 -c "import torch; print('%d%d' % torch.cuda.get_device_capability())" 2>/dev/null)}
if ! python3 -m benchmarks --static --help >/dev/null 2>&1; then
    echo "static report: skipped (this checkout's python -m benchmarks has no --static)" | tee "$WORK/static.log"
elif [ -z "$ARCH" ]; then
    echo "static report: skipped (no GPU to read the architecture from; STATIC_ARCH=90 runs it)" | tee "$WORK/static.log"
else
    # shellcheck disable=SC2086
    timeout -k 10 "$STATIC_S" python3 -m benchmarks --static --arch "$ARCH" --jobs "$(nproc)" $STATIC_ARGS \
        --out "$WORK/results/static" 2>&1 | tee "$WORK/static.log" | tail -8
    echo "static report (sm_$ARCH): exit ${PIPESTATUS[0]} after $((SECONDS - t1)) s (124: stopped at" \
        "STATIC_S=$STATIC_S; 1: a launch over its limit or a spill; 2: sm_$ARCH is not one of its targets)" \
        | tee -a "$WORK/static.log"
fi

t2=$SECONDS
BENCH_S=${BENCH_S:-$((TOTAL_S - (t2 - t0) - 75))}
BENCH_KILL_S=${BENCH_KILL_S:-$((BENCH_S + 60))}
echo "benchmark budget: no new case after $BENCH_S s, stopped at $BENCH_KILL_S s"
# shellcheck disable=SC2086
timeout -k 10 "$BENCH_KILL_S" python3 -m benchmarks --device "$DEVICE" --budget-s "$BENCH_S" --out "$WORK/results" \
    $BENCH_ARGS 2>&1 | tr '\r' '\n' | grep -v '%|' | tee "$WORK/benchmarks.log" | tail -12
echo "benchmarks: exit ${PIPESTATUS[0]} after $((SECONDS - t2)) s; total $((SECONDS - t0)) s" | tee -a "$WORK/benchmarks.log"
tar -czf "$WORK/gpu-check.tar.gz" -C "$WORK" environment.txt pytest.log static.log benchmarks.log results
if [ -n "${OUT:-}" ] && [ "$OUT" != "$WORK" ]; then
    cp "$WORK/gpu-check.tar.gz" "$WORK/pytest.log" "$WORK/static.log" "$WORK/benchmarks.log" "$OUT/"
    cp "$WORK/results/versions.json" "$OUT/"
    [ -f "$WORK/results/summary.md" ] && cp "$WORK/results/summary.md" "$OUT/"
fi
[ -f "$WORK/results/summary.md" ] && cat "$WORK/results/summary.md"
echo "results for benchmarks/results/${SLUG:-<gpu>}/: $WORK/results (packed in $WORK/gpu-check.tar.gz)"
