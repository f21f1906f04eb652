#!/usr/bin/env bash
# The GPU run fitted to a short lease (15 minutes of device time, a machine that goes back after
# 30 s idle). onnxruntime-gpu travels in parts (five since the tree grew), one call each; the
# steps that need only torch (graph, tiles, bench) run in the background from the first call on,
# while the other parts travel, and the last call installs everything, waits for them, then runs the GPU tests, the
# 1000-iteration stylisation and the ablation (PyTorch against ONNX Runtime targets on CUDA).
#
# usage (from the repository root on the device, see benchmarks/README.md, "Runbook"):
#   benchmarks/gpu_lease.sh start    # carry .whl/p00: stage it, start graph/tiles/bench behind
#   benchmarks/gpu_lease.sh part     # carry .whl/p01 (then p02, p03): stage it, show progress
#   benchmarks/gpu_lease.sh finish   # carry .whl/p04: install, wait, pytest, stylize, ablate,
#                                    # and pack every result into $OUT
# Environment: BG_STEPS (the background's steps, default "graph tiles bench": the CUDA-graph rows
# first, since the H100 run of 2026-11-26 found 512 px launch-bound and never reached them, then
# tiled against whole; that run measured the print sizes, `large`), FINISH_S
# (seconds the finish call may take, default 540), WAIT_S (longest wait for the background steps,
# default 300); gpu_run.sh's own variables pass through.

set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
WHEELS=/tmp/nst-wheels
BG=/tmp/nst-bg          # the background run: its own copy of the tree, wheels, install and results
FG=/tmp/nst-fg
: "${OUT:=$REPO/gpu-run}"
T0=$SECONDS

stage() {  # copy the carried parts (whichever came with this call) into the wheels folder
    mkdir -p "$WHEELS"
    local d f
    for d in "$REPO"/.whl/p0*; do
        [ -d "$d" ] || continue
        for f in "$d"/*; do [ -e "$WHEELS/$(basename "$f")" ] || cp "$f" "$WHEELS"/; done
    done
    ls -l "$WHEELS"
}

progress() {
    echo "== background: $(pgrep -f "$BG/repo/benchmarks/gpu_run.sh" >/dev/null && echo running || echo finished)"
    tail -n "${1:-15}" "$BG/out/run.log" 2>/dev/null
}

case "${1:-}" in
start)
    stage
    rm -rf "$BG" && mkdir -p "$BG/wheels" "$BG/out"
    # A copy of the tree: the next call's copy of the working tree must not change the script
    # that bash is still reading.
    mkdir -p "$BG/repo" && tar -C "$REPO" --exclude=./.whl --exclude=./.venv --exclude=./.git -cf - . | tar -C "$BG/repo" -xf -
    cp "$WHEELS"/nst-*.whl "$WHEELS"/platformdirs-*.whl "$BG/wheels/"
    OUT="$BG/out" SITE=/tmp/nst-bg-site ITERATIONS="${ITERATIONS:-10}" STEP_TIMEOUT="${STEP_TIMEOUT:-200}" \
        setsid nohup bash "$BG/repo/benchmarks/gpu_run.sh" "$BG/wheels" env ${BG_STEPS:-graph tiles bench} \
        >"$BG/console.log" 2>&1 </dev/null &
    sleep 5
    progress
    ;;
part)
    stage
    progress
    ;;
finish)
    stage
    rm -rf "$FG" && mkdir -p "$FG"
    FINISH_S="${FINISH_S:-540}"
    left() { echo $((FINISH_S - (SECONDS - T0))); }
    # install now (CPU work, beside the background's GPU work), then wait for the GPU to be ours
    OUT="$FG" bash "$HERE/gpu_run.sh" "$WHEELS" install
    cp "$FG/run.log" "$FG/install.log" 2>/dev/null
    while pgrep -f "$BG/repo/benchmarks/gpu_run.sh" >/dev/null && [ $((SECONDS - T0)) -lt "${WAIT_S:-300}" ]; do sleep 2; done
    progress 40
    if pgrep -f "$BG/repo/benchmarks/gpu_run.sh" >/dev/null; then
        echo "background still running after ${WAIT_S:-300} s: stopped"; pkill -f "$BG/repo/benchmarks/gpu_run.sh"
    fi
    # pytest, stylize and ablate share what is left, less 25 s to pack the results
    # (pytest -m gpu took 200 s and more on the H200, the memory estimate's fp32 case alone 54 s)
    OUT="$FG" STEP_TIMEOUT="${STEP_TIMEOUT:-300}" ABLATE_SIZES="${ABLATE_SIZES:-512}" \
        timeout --kill-after=5 "$(( $(left) - 25 ))" bash "$HERE/gpu_run.sh" "$WHEELS" env pytest stylize ablate
    echo "finish: $((SECONDS - T0)) s"
    cp "$BG/out/run.log" "$OUT/bg-run.log" 2>/dev/null
    cp "$FG/run.log" "$OUT/fg-run.log" 2>/dev/null
    (cd /tmp && tar czf "$OUT/results.tgz" --exclude='*/repo' --exclude='*/wheels' nst-bg nst-fg)
    ls -l "$OUT"
    ;;
*)
    echo "usage: $0 start|part|finish" >&2; exit 2 ;;
esac
