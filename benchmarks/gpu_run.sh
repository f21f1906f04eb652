#!/usr/bin/env bash
# The GPU run in one command: install nst into a private target, run the GPU tests, the bench
# sweep, the CUDA-graph rows and the 1000-iteration stylisation, and summarise. Written without a
# GPU; see benchmarks/README.md ("Runbook for the GPU run") for how to get the wheels there.
#
# usage: benchmarks/gpu_run.sh [WHEELS_DIR|-] [STEP...]
#
#   WHEELS_DIR  wheels to install beside nst (onnxruntime-gpu, platformdirs, ...). A wheel cut into
#               NAME.whl.part-00, NAME.whl.part-01, ... is joined first; WHEELS_DIR/SHA256SUMS, if
#               there, is checked against the joined wheels. "-" or nothing: nst alone.
#   STEP        env install pytest bench graph stylize (the default), ablate, tensorrt, large
#               (print sizes, tiled: issue 11's GPU measurements), tiles (tiled against whole at
#               sizes where both fit: issue 11's overhead), or all.
#               Every step after install needs install's PATH: it runs (or reuses) install itself.
#
# Environment (all optional):
#   OUT          where the results go (default ./gpu-run); at most 8 files, flat: run.log,
#                bench.json bench.csv bench.png, graph.json graph-eager.json, stylize.json
#                stylize.png, and ablate.json, tensorrt.json, large.json or tiles.json when those
#                steps run
#   SITE         the private install target (default ${TMPDIR:-/tmp}/nst-gpu-site); replaced
#                unless it already holds these wheels and this source tree
#   PYTHON       the interpreter that has torch (default python3)
#   DEVICE       nst's --device (default cuda). Steps that need a GPU are reported as skipped
#                where torch sees none, unless DEVICE=cpu (a plumbing check, not a measurement)
#   DRY_RUN=1    print the commands and run nothing
#   SIZES, ABLATE_SIZES, GRAPH_SIZES, GRAPH_PRECISIONS, PRECISIONS, ITERATIONS, STYLIZE_SIZE, STYLIZE_ITERATIONS,
#   LARGE_SIZES, LARGE_TILES, LARGE_ITERATIONS, TILE_SIZES, TILE_TILES, TILE_PRECISIONS and STEP_TIMEOUT (seconds per step, default 420)
#   override the sweep.
#
# Exit status: 0 when every step that ran passed (skipped steps do not count), else 1.

# shellcheck disable=SC2317,SC2012  # steps are called as "step_$name"; ls only lists our own files
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
WHEELS="${1:--}"
[ "$#" -gt 0 ] && shift
STEPS=("$@")
[ "${#STEPS[@]}" -eq 0 ] && STEPS=(env install pytest bench graph stylize)
[ "${STEPS[*]}" = "all" ] && STEPS=(env install pytest bench graph stylize ablate tensorrt large tiles)

OUT="${OUT:-$REPO/gpu-run}"
SITE="${SITE:-${TMPDIR:-/tmp}/nst-gpu-site}"
PYTHON="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"
DRY_RUN="${DRY_RUN:-0}"
SIZES="${SIZES:-512,1024,2048,4096}"
ABLATE_SIZES="${ABLATE_SIZES:-512,1024}"
GRAPH_SIZES="${GRAPH_SIZES:-512,1024}"
GRAPH_PRECISIONS="${GRAPH_PRECISIONS:-fp32,bf16}"
PRECISIONS="${PRECISIONS:-fp32,tf32,bf16}"
ITERATIONS="${ITERATIONS:-20}"
STYLIZE_SIZE="${STYLIZE_SIZE:-512}"
STYLIZE_ITERATIONS="${STYLIZE_ITERATIONS:-1000}"
TILE_SIZES="${TILE_SIZES:-2048,4096}"
TILE_TILES="${TILE_TILES:-off,1024,2048}"
TILE_PRECISIONS="${TILE_PRECISIONS:-bf16,fp32}"
LARGE_SIZES="${LARGE_SIZES:-8192,16384}"
LARGE_TILES="${LARGE_TILES:-2048}"
LARGE_ITERATIONS="${LARGE_ITERATIONS:-2}"
STEP_TIMEOUT="${STEP_TIMEOUT:-420}"

mkdir -p "$OUT"
LOG="$OUT/run.log"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/nst-gpu-run.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
# A private cache (exported target modules, TensorRT engines) and no downloads: the device has
# no network, and a run must not depend on what an earlier one left behind.
export NST_CACHE_DIR="$WORK/cache" NST_OFFLINE=1 PYTHONUNBUFFERED=1
declare -A STATUS=()
ORDER=()
INSTALLED=0

say() { printf '%s\n' "$*" | tee -a "$LOG"; }

# run_logged TITLE CMD...: the command's output into the log (and the terminal), under a time limit.
run_logged() {
    local title="$1"; shift
    say "+ $*"
    if [ "$DRY_RUN" = 1 ]; then return 0; fi
    local t0=$SECONDS rc note=""
    timeout --kill-after=10 "$STEP_TIMEOUT" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    [ "$rc" = 124 ] && note=", timed out after STEP_TIMEOUT=$STEP_TIMEOUT s"
    say "  ($title: exit $rc after $((SECONDS - t0)) s$note)"
    return "$rc"
}

record() {  # record STEP STATUS
    STATUS[$1]="$2"
    ORDER+=("$1")
}

have_gpu() {
    case "$DEVICE" in cuda*) ;; *) return 0 ;; esac
    [ "$DRY_RUN" = 1 ] && return 0
    [ "$("$PYTHON" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null)" = 1 ]
}

step_env() {
    say "== env: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
    [ "$DRY_RUN" = 1 ] && return 0
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"
    "$PYTHON" - <<'EOF' 2>&1 | tee -a "$LOG"
import platform
import torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i}", p.name, f"{p.total_memory / 2**30:.1f} GiB", f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs")
EOF
    (cd "$REPO" && git rev-parse HEAD 2>/dev/null | sed 's/^/commit /' | tee -a "$LOG") || true
}

# The wheels to install: whole ones, and parts joined back; checked against SHA256SUMS if given.
# A dry run only names them (empty files in the stage).
stage_wheels() {
    local stage="$1" part base w
    [ "$WHEELS" = "-" ] && return 0
    if [ ! -d "$WHEELS" ]; then say "error: wheels folder $WHEELS does not exist"; return 1; fi
    for w in "$WHEELS"/*.whl; do
        [ -e "$w" ] || continue
        if [ "$DRY_RUN" = 1 ]; then : > "$stage/$(basename "$w")"; else cp "$w" "$stage/"; fi
    done
    for part in "$WHEELS"/*.whl.part-00; do
        [ -e "$part" ] || continue
        base="$(basename "${part%.part-00}")"
        say "+ cat $WHEELS/$base.part-* > $base   # $(ls "$WHEELS/$base".part-* | wc -l) parts"
        if [ "$DRY_RUN" = 1 ]; then : > "$stage/$base"; continue; fi
        cat "$WHEELS/$base".part-* > "$stage/$base"
        say "  $base: $(stat -c %s "$stage/$base") bytes"
    done
    [ "$DRY_RUN" = 1 ] && return 0
    if compgen -G "$WHEELS/*.part-*" >/dev/null && [ ! -f "$WHEELS/SHA256SUMS" ]; then
        say "error: $WHEELS holds wheel parts but no SHA256SUMS to check the joined wheels against"
        return 1
    fi
    if [ -f "$WHEELS/SHA256SUMS" ]; then
        if ! (cd "$stage" && sha256sum --quiet -c --ignore-missing "$WHEELS/SHA256SUMS") >>"$LOG" 2>&1; then
            say "error: the wheels do not match $WHEELS/SHA256SUMS (a part missing or damaged?); parts here:"
            ls -l "$WHEELS" | tee -a "$LOG"
            return 1
        fi
        local missing
        missing="$(awk '{print $2}' "$WHEELS/SHA256SUMS" | while read -r f; do [ -e "$stage/$f" ] || echo "$f"; done)"
        if [ -n "$missing" ]; then say "error: listed in SHA256SUMS but not here: $missing"; return 1; fi
        say "wheels match SHA256SUMS"
    fi
}

step_install() {
    local stage="$WORK/wheels" stamp w
    mkdir -p "$stage"
    stage_wheels "$stage" || return 1
    # One pip call for every wheel and nst: a second `pip install --target` into the same folder
    # without --upgrade keeps the bin/ that the first made (onnxruntime-gpu has a console script)
    # and drops nst's own script.
    stamp="$(cd "$REPO" && { sha256sum "$stage"/*.whl 2>/dev/null | awk '{print $1}'; find engine export cli pyproject.toml -type f -name '*.py' -o -name '*.toml' | sort | xargs sha256sum; } | sha256sum | cut -c1-16)"
    if [ "$DRY_RUN" != 1 ] && [ -x "$SITE/bin/nst" ] && [ "$(cat "$SITE/.gpu-run-stamp" 2>/dev/null)" = "$stamp" ]; then
        say "$SITE already holds these wheels and this source tree: not reinstalled"
    else
        [ "$DRY_RUN" = 1 ] || rm -rf "$SITE"
        # nst from this tree, built with the interpreter's own setuptools (no network for an
        # isolated build), unless a prebuilt nst wheel came with the others.
        local -a what=()
        for w in "$stage"/*.whl; do [ -e "$w" ] && what+=("$w"); done
        compgen -G "$stage/nst-*.whl" >/dev/null || what+=("$REPO")
        run_logged install "$PYTHON" -m pip install --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir \
            --disable-pip-version-check --target "$SITE" "${what[@]}" || return 1
        [ "$DRY_RUN" = 1 ] || echo "$stamp" > "$SITE/.gpu-run-stamp"
    fi
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH"
    INSTALLED=1
    say "+ export PYTHONPATH=$SITE PATH=$SITE/bin:\$PATH"
    [ "$DRY_RUN" = 1 ] && return 0
    if [ "$(command -v nst)" != "$SITE/bin/nst" ]; then say "error: nst on PATH is $(command -v nst || echo nothing), not $SITE/bin/nst"; return 1; fi
    run_logged "nst --help" nst --help >/dev/null || return 1
    "$PYTHON" -c 'import onnxruntime as o, nst.engine as e; print("onnxruntime", o.__version__, "from", o.__file__); print("providers", o.get_available_providers()); print("nst from", e.__file__)' 2>&1 | tee -a "$LOG"
}

step_pytest() {
    local start rc section errs f
    start=$(($(wc -l < "$LOG") + 1))
    # -P keeps the repository root off sys.path: the tests import the installed nst.
    (cd "$REPO" && run_logged "pytest -m gpu" "$PYTHON" -P -m pytest -m gpu -v -p no:cacheprovider --continue-on-collection-errors tests)
    rc=$?
    [ "$rc" = 0 ] || [ "$DRY_RUN" = 1 ] && return "$rc"
    # A test module that needs a package the device lacks (ray, say) is a collection error.
    # That is no GPU failure unless the module holds GPU tests or a test failed.
    section="$(tail -n +"$start" "$LOG")"
    grep -qE '[0-9]+ failed' <<<"$section" && return 1
    errs="$(grep -oE '^ERROR tests/[^ :]+' <<<"$section" | awk '{print $2}' | sort -u)"
    [ -n "$errs" ] || return "$rc"
    for f in $errs; do
        if grep -q "mark.gpu" "$REPO/$f" 2>/dev/null; then say "pytest: $f holds GPU tests and did not import"; return 1; fi
    done
    say "pytest: no GPU test failed; these modules hold none and could not be imported here: $(echo "$errs" | tr '\n' ' ')"
    return 3
}

step_bench() {
    run_logged bench nst bench --device "$DEVICE" --weights random --sizes "$SIZES" --precision "$PRECISIONS" \
        --optimizer lbfgs,adam --iterations "$ITERATIONS" --no-targets-phase \
        --json "$OUT/bench.json" --csv "$OUT/bench.csv" --plot "$OUT/bench.png"
}

step_ablate() {  # each switch flipped, and the targets phase (PyTorch against ONNX Runtime)
    run_logged ablate nst bench --device "$DEVICE" --weights random --sizes "$ABLATE_SIZES" --precision "$PRECISIONS" \
        --optimizer lbfgs,adam --iterations "$ITERATIONS" --ablate --json "$OUT/ablate.json"
}

step_graph() {  # the Adam step captured in one CUDA graph, after its eager twins on the same machine
    run_logged "graph (eager twins)" nst bench --device "$DEVICE" --weights random --sizes "$GRAPH_SIZES" --precision "$GRAPH_PRECISIONS" \
        --optimizer adam --iterations "$ITERATIONS" --no-targets-phase --no-optimizer-phase --json "$OUT/graph-eager.json"
    run_logged graph nst bench --device "$DEVICE" --weights random --sizes "$GRAPH_SIZES" --precision "$GRAPH_PRECISIONS" \
        --optimizer adam --iterations "$ITERATIONS" --cuda-graph --no-targets-phase --no-optimizer-phase --json "$OUT/graph.json"
}

step_tiles() {  # issue 11's cost: tiled against whole at sizes where both fit, one run
    run_logged tiles nst bench --device "$DEVICE" --weights random --sizes "$TILE_SIZES" --precision "$TILE_PRECISIONS" \
        --optimizer adam --tile "$TILE_TILES" --iterations "$ITERATIONS" --warmup 1 --no-optimizer-phase --no-targets-phase \
        --json "$OUT/tiles.json"
}

step_stylize() {  # the end-to-end target: read the report's phases, not the process's wall time
    (cd "$REPO" && run_logged stylize nst stylize examples/chelsea.png examples/the_scream.jpg -o "$OUT/stylize.png" \
        --device "$DEVICE" --weights random --size "$STYLIZE_SIZE" --iterations "$STYLIZE_ITERATIONS" --precision bf16 \
        --report "$OUT/stylize.json")
}

step_large() {  # issue 11: square print sizes in tiles, time per iteration and torch.cuda.max_memory_allocated
    run_logged large nst bench --device "$DEVICE" --weights random --sizes "$LARGE_SIZES" --precision bf16 \
        --optimizer adam --tile "$LARGE_TILES" --iterations "$LARGE_ITERATIONS" --warmup 1 --no-optimizer-phase --no-targets-phase \
        --json "$OUT/large.json"
}

step_tensorrt() {  # optional: needs the TensorRT 10 libraries (tensorrt-cu13 10.x) in the wheels
    local libs
    libs="$("$PYTHON" -c 'import os, tensorrt_libs; print(os.path.dirname(tensorrt_libs.__file__))' 2>/dev/null)"
    if [ -z "$libs" ] && [ "$DRY_RUN" != 1 ]; then say "tensorrt: skipped: no tensorrt_libs installed (the tensorrt-cu13 10.x wheels)"; return 2; fi
    # The fp32 model on TensorRT: its engine runs fp32 layers in TF32 (the report says tf32: true).
    (cd "$REPO" && LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" run_logged tensorrt nst stylize examples/chelsea.png examples/the_scream.jpg \
        -o "$WORK/tensorrt.png" --device "$DEVICE" --weights random --size "$STYLIZE_SIZE" --iterations 10 --precision bf16 \
        --targets onnx --provider tensorrt --report "$OUT/tensorrt.json")
}

summary() {
    [ "$DRY_RUN" = 1 ] && return 0
    "$PYTHON" - "$OUT" "$LOG" <<'EOF' 2>&1 | tee -a "$LOG"
import json, re, sys
from pathlib import Path

out, log = Path(sys.argv[1]), Path(sys.argv[2])

def load(name):
    p = out / name
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None

def fmt(ms):
    return "-" if ms is None else f"{ms:.2f} ms"

text = log.read_text(errors="replace")
tail = re.findall(r"^=+ (.*(?:passed|failed|skipped|error|no tests ran).*) =+$", text, re.M)
if tail:
    print("pytest -m gpu:", tail[-1])
for name in ("bench.json", "ablate.json", "graph.json", "tiles.json", "large.json"):
    d = load(name)
    if d is None:
        continue
    rows = d.get("results", [])
    ok = [r for r in rows if r.get("status") == "ok" and r.get("phase") == "optimisation"]
    print(f"{name}: {d.get('device')}, {len(ok)} optimisation rows, {sum(r.get('status') != 'ok' for r in rows)} skipped")
    if name == "bench.json":
        for r in ok:
            pct = r.get("percent_of_peak")
            print(f"  {r['size']:>9} {r['precision']:>4} {r['optimizer']:>5}: {fmt(r['ms_per_iteration'])}/it"
                  + (f", {pct:.1f}% of peak" if pct is not None else "") + (f", {r['peak_memory_mb']:.0f} MB" if r.get("peak_memory_mb") else ""))
    if name == "graph.json":
        eager = {(r["size"], r["precision"]): r for r in (load("graph-eager.json") or {}).get("results", [])
                 if r.get("status") == "ok" and r.get("phase") == "optimisation" and r.get("optimizer") == "adam" and not r.get("cuda_graph")}
        for r in ok:
            e = eager.get((r["size"], r["precision"]))
            ratio = f", eager {fmt(e['ms_per_iteration'])} (graph/eager {r['ms_per_iteration'] / e['ms_per_iteration']:.2f})" if e else ""
            print(f"  graph {r['size']:>9} {r['precision']:>4}: {fmt(r['ms_per_iteration'])}/it{ratio}")
    if name == "tiles.json":
        whole = {(r["size"], r["precision"]): r["ms_per_iteration"] for r in ok if not r.get("tile")}
        for r in ok:
            w = whole.get((r["size"], r["precision"]))
            ratio = f" ({r['ms_per_iteration'] / w:.2f}x whole)" if w and r.get("tile") else ""
            print(f"  {r['size']:>9} {r['precision']:>4} tile {r.get('tile') or 'off'}: {fmt(r['ms_per_iteration'])}/it{ratio}"
                  + (f", {r['peak_memory_mb']:.0f} MB" if r.get("peak_memory_mb") else ""))
    for r in rows:
        if r.get("status") != "ok":
            print(f"  skipped {r.get('size')} {r.get('precision')} {r.get('optimizer') or r.get('loop')}: {r.get('reason')}")
for name in ("stylize.json", "tensorrt.json"):
    s = load(name)
    if s is None:
        continue
    ph = s.get("phases", {})
    work = sum(v for k, v in ph.items() if k not in ("weights", "images", "save"))
    t = s.get("targets", {})
    print(f"{name}: {s.get('status')}, {s.get('iterations')} iterations on {s.get('device')} ({s.get('precision')}); "
          f"optimisation {ph.get('optimisation', 0):.2f} s, targets {ph.get('targets', 0):.2f} s, target setup {ph.get('target setup', 0):.2f} s; "
          f"all but weights, image loading and saving {work:.2f} s; targets from {t.get('source')} ({t.get('provider')}, tf32 {t.get('tf32')})")
EOF
}

: > "$LOG"
say "nst GPU run: steps ${STEPS[*]}; wheels $WHEELS; results in $OUT; private target $SITE"
for step in "${STEPS[@]}"; do
    case "$step" in
        env|install|pytest|bench|ablate|graph|stylize|tensorrt|large|tiles) ;;
        *) say "error: unknown step $step (use env install pytest bench graph stylize ablate tensorrt large tiles, or all)"; exit 2 ;;
    esac
    if [ "$step" != env ] && [ "$step" != install ] && [ "$INSTALLED" = 0 ]; then
        say "== install (needed by $step)"
        if step_install; then record install ok; else record install FAILED; fi
    fi
    [ "$step" = install ] && [ "$INSTALLED" = 1 ] && continue
    say "== $step"
    if [ "${STATUS[install]:-}" = FAILED ] && [ "$step" != env ]; then record "$step" "skipped (install failed)"; continue; fi
    case "$step" in
        bench|ablate|graph|stylize|tensorrt|large|tiles)
            if ! have_gpu; then say "$step: skipped: torch sees no CUDA GPU (DEVICE=$DEVICE)"; record "$step" "skipped (no GPU)"; continue; fi ;;
    esac
    "step_$step"
    rc=$?
    [ "$DRY_RUN" = 1 ] && { record "$step" "dry run"; continue; }
    case "$rc" in 0) record "$step" ok ;; 2) record "$step" skipped ;; 3) record "$step" "ok (some modules without GPU tests could not be imported: see run.log)" ;; 124) record "$step" "TIMED OUT" ;; *) record "$step" "FAILED (exit $rc)" ;; esac
done

say "== summary"
failed=0
for step in "${ORDER[@]}"; do
    say "$(printf '%-9s %s' "$step" "${STATUS[$step]}")"
    case "${STATUS[$step]}" in ok*|skipped*|"dry run") ;; *) failed=1 ;; esac
done
summary
say "results: $(cd "$OUT" && ls | tr '\n' ' ')"
exit "$failed"
