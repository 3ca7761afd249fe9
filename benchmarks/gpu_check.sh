#!/usr/bin/env bash
# One prepared command for a lent CUDA GPU (H100 / H200): the CUDA test pass, then the default CUDA
# benchmark sweep, everything written to one folder, in <= 8 minutes with the default budgets.
#
#   bash benchmarks/gpu_check.sh [WORK_DIR]          (default WORK_DIR: /tmp/fastpatchdiv-gpu)
#
# WORK_DIR gets environment.txt, pytest.log, benchmarks.log and results/ (results.json, results.md,
# summary.md, plots), packed into gpu-check.tar.gz; when $OUT is set (the device tool's folder) the
# tarball, summary.md and the two logs are copied there. benchmarks/README.md says how to unpack it.
#
# The package is not installed there and nothing can be downloaded: PYTHONPATH=<repo> plus a
# fastpatchdiv/kernels link (the installed package maps fastpatchdiv.kernels to kernels/) make it
# importable from the repository root. Peers: wheels carried in .whl/ are installed offline into
# /tmp/site; without them the keops and inf-cl rows say "not installed".
#
# Budgets (seconds, environment): TOTAL_S for both parts (450); TEST_S for the test pass (180, killed
# after); BENCH_S after which the benchmark starts no new case (the rest are recorded as skipped): what
# TOTAL_S leaves after the tests, less 75 s for the last case and the report; BENCH_KILL_S a hard stop.
# DEVICE=cpu, PYTEST_ARGS and BENCH_ARGS allow a dry run without a GPU, e.g.
#   DEVICE=cpu PYTEST_ARGS=tests/test_readme.py BENCH_ARGS=--quick bash benchmarks/gpu_check.sh /tmp/dry
set -uo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/fastpatchdiv-gpu}
TOTAL_S=${TOTAL_S:-450}
TEST_S=${TEST_S:-180}
DEVICE=${DEVICE:-cuda}
# The harness's subprocess tests are the CPU CI's smoke of it; here the benchmark run that follows is that smoke.
HARNESS=tests/test_benchmarks.py
PYTEST_ARGS=${PYTEST_ARGS:---deselect $HARNESS::test_quick_run_writes_every_artefact \
    --deselect $HARNESS::test_pytest_benchmark_entry_point_runs_the_cli_cases --deselect $HARNESS::test_keops_provider_on_a_tiny_case}
BENCH_ARGS=${BENCH_ARGS:-}
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
t0=$SECONDS
# shellcheck disable=SC2086  # PYTEST_ARGS and BENCH_ARGS are word lists
timeout -k 10 "$TEST_S" python3 -m pytest -q -p no:cacheprovider $PYTEST_ARGS 2>&1 | tee "$WORK/pytest.log" | tail -5
echo "test pass: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s (124: stopped at TEST_S=$TEST_S)" | tee -a "$WORK/pytest.log"
t1=$SECONDS
BENCH_S=${BENCH_S:-$((TOTAL_S - (t1 - t0) - 75))}
BENCH_KILL_S=${BENCH_KILL_S:-$((BENCH_S + 60))}
echo "benchmark budget: no new case after $BENCH_S s, stopped at $BENCH_KILL_S s"
# shellcheck disable=SC2086
timeout -k 10 "$BENCH_KILL_S" python3 -m benchmarks --device "$DEVICE" --budget-s "$BENCH_S" --out "$WORK/results" \
    $BENCH_ARGS 2>&1 | tr '\r' '\n' | grep -v '%|' | tee "$WORK/benchmarks.log" | tail -12
echo "benchmarks: exit ${PIPESTATUS[0]} after $((SECONDS - t1)) s; total $((SECONDS - t0)) s" | tee -a "$WORK/benchmarks.log"
tar -czf "$WORK/gpu-check.tar.gz" -C "$WORK" environment.txt pytest.log benchmarks.log results
if [ -n "${OUT:-}" ] && [ "$OUT" != "$WORK" ]; then
    cp "$WORK/gpu-check.tar.gz" "$WORK/pytest.log" "$WORK/benchmarks.log" "$OUT/"
    [ -f "$WORK/results/summary.md" ] && cp "$WORK/results/summary.md" "$OUT/"
fi
[ -f "$WORK/results/summary.md" ] && cat "$WORK/results/summary.md"
