#!/usr/bin/env bash
# Issue 15's GPU check, one prepared script: the CUDA tests (tests/test_cuda.py) and
# benchmarks/bench_train.py for convnextv2_tiny and convnextv2_base at 224 px, bf16, channels_last,
# eager and compiled (fine-tuning, pretraining, evaluation and the plain timm loop in each run),
# and a torch.profiler top-kernels table of tiny's fine-tuning step; last, the loader into the
# device (benchmarks/bench_loader.py: the real script on generated JPEGs, uint8 batches finished
# on the GPU against float batches from the workers: img/s and the share of time spent waiting).
#
#   benchmarks/gpu_check.sh OUTDIR [--budget SECONDS] [--only STAGES] [--cpu-smoke] [--dry-run]
#
#   --budget S    total seconds (default 480); a stage starts only if its minimum fits in what is
#                 left, and each stage runs under its own timeout, cut to what is left
#   --only LIST   comma-separated stages to run (default: all, in this order):
#                 env,bench_tiny_eager,tests,bench_tiny_compiled,bench_base_eager,bench_base_compiled,loader
#   --cpu-smoke   the same stages tiny, on the CPU (CUDA hidden; CUDA_TESTS_DEVICE=cpu; the
#                 compiled stages with TORCH_COMPILE_DISABLE=1, which a CPU cannot afford here):
#                 checks the script end to end without a GPU
#   --dry-run     print the stages and their commands; run nothing
#
# OUTDIR gets at most 7 files (the device tool brings back 8): summary.json (environment, each
# stage's status and time, every benchmark's JSON), env.txt, test_cuda.log, test_cuda.xml,
# bench.log, profile_tiny_eager.txt, profile_tiny_compiled.txt. The end of stdout is a summary.
# Exit status: 0 every stage ran and passed, 1 one failed or timed out (or CUDA or a module is
# missing), 3 one was skipped for lack of time, 2 a usage error.
set -u -o pipefail

usage() { sed -n '2,/^set -u/{/^#/s/^# \{0,1\}//p}' "$0"; exit 2; }

OUT="" BUDGET=480 ONLY="" SMOKE=0 DRY=0
while [ $# -gt 0 ]; do
    case "$1" in
        --budget) BUDGET="${2:?--budget needs seconds}"; shift 2 ;;
        --only) ONLY="${2:?--only needs a list of stages}"; shift 2 ;;
        --cpu-smoke) SMOKE=1; shift ;;
        --dry-run) DRY=1; shift ;;
        -h|--help) usage ;;
        -*) echo "error: unknown option $1" >&2; usage ;;
        *) [ -z "$OUT" ] || { echo "error: one OUTDIR only (got $OUT and $1)" >&2; exit 2; }; OUT="$1"; shift ;;
    esac
done
[ -n "$OUT" ] || { echo "error: OUTDIR missing" >&2; usage; }
case "$BUDGET" in ''|*[!0-9]*) echo "error: --budget takes whole seconds, got $BUDGET" >&2; exit 2 ;; esac

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT" || exit 2
PY="${PYTHON:-python3}"
STAGES="env bench_tiny_eager tests bench_tiny_compiled bench_base_eager bench_base_compiled loader"
if [ -n "$ONLY" ]; then
    for s in ${ONLY//,/ }; do
        case " $STAGES " in *" $s "*) ;; *) echo "error: unknown stage $s (stages: $STAGES)" >&2; exit 2 ;; esac
    done
    STAGES="$(for s in $STAGES; do case ",$ONLY," in *",$s,"*) printf '%s ' "$s" ;; esac; done)"
fi

export PYTHONUNBUFFERED=1
if [ "$SMOKE" = 1 ]; then
    export CUDA_VISIBLE_DEVICES="" CUDA_TESTS_DEVICE=cpu
    MODELS_tiny=convnextv2_atto MODELS_base=convnextv2_atto
    BENCH_SIZE=(--input_size 64 --batch_size 2 --steps 1 --rounds 1)
    LOADER=(--models convnextv2_atto --images 64 --input_size 64 --batch_size 8 --workers 1)
    XDIST=()
else
    MODELS_tiny=convnextv2_tiny MODELS_base=convnextv2_base
    BENCH_SIZE=(--input_size 224 --batch_size 128 --steps 4 --rounds 5)
    LOADER=(--models convnextv2_tiny convnextv2_base --images 4096 --input_size 224 --batch_size 128)
    XDIST=(-n 4 --dist load)  # dropped below when pytest-xdist is missing
    export TORCHINDUCTOR_COMPILE_THREADS="${TORCHINDUCTOR_COMPILE_THREADS:-$(nproc)}"
fi

# stage -> "minimum seconds to start it, its timeout"
declare -A LIMITS=([env]="10 60" [bench_tiny_eager]="40 100" [tests]="60 200" [bench_tiny_compiled]="90 200"
                   [bench_base_eager]="40 100" [bench_base_compiled]="90 260" [loader]="60 150")
WARM_TIMEOUT=300
[ "$SMOKE" = 1 ] && LIMITS[tests]="60 1200" && BUDGET=$(( BUDGET < 1800 ? 1800 : BUDGET )) && WARM_TIMEOUT=900

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

bench_cmd() {  # bench_cmd tiny|base eager|compiled [warm]
    local model; model="MODELS_$1"
    local cmd=()
    [ "$2" = compiled ] && [ "$SMOKE" = 1 ] && cmd=(env TORCH_COMPILE_DISABLE=1)
    cmd+=("$PY" benchmarks/bench_train.py --model "${!model}" "${BENCH_SIZE[@]}" --use_amp --channels_last --json)
    [ "$2" = compiled ] && cmd+=(--compile)
    if [ "${3:-}" = warm ]; then
        cmd+=(--steps 1 --rounds 1 --out "$TMP/warm_$1_$2.json")
    else
        cmd+=(--out "$TMP/$1_$2.json")
        [ "$1" = tiny ] && cmd+=(--profile "$OUT/profile_tiny_$2.txt")
    fi
    printf '%q ' "${cmd[@]}"
}

# While the tests run (the GPU is nearly idle then), the compiled benchmarks compile once, at the
# same shapes, into inductor's on-disk caches: the timed compiled stages then find their kernels
# there. These cold runs' JSON (warm_<model>_compiled in summary.json) gives the cold compile time.
warm_start() {
    local m
    for m in tiny base; do
        case " $STAGES " in *" bench_${m}_compiled "*) ;; *) continue ;; esac
        echo "== warm_${m}_compiled (background, timeout ${WARM_TIMEOUT}s): $(bench_cmd "$m" compiled warm)"
        (eval "timeout -k 10 $WARM_TIMEOUT $(bench_cmd "$m" compiled warm)" >"$TMP/warm_$m.log" 2>&1
         echo $? >"$TMP/warm_$m.rc") &
    done
}

warm_wait() {  # bounded: each background run has its own timeout
    wait
    local m
    for m in tiny base; do
        [ -f "$TMP/warm_$m.log" ] || continue
        { echo "== warm_${m}_compiled (background): rc $(cat "$TMP/warm_$m.rc" 2>/dev/null)"
          tail -n 5 "$TMP/warm_$m.log"; } | tee -a "$OUT/bench.log" | head -n 1
        rm -f "$TMP/warm_$m.log"
    done
}

stage_cmd() {
    case "$1" in
        env) printf '%q ' "$PY" - "$OUT/env.txt" "$TMP/env.json" ;;
        tests) printf '%q ' "$PY" -m pytest -o addopts= -p no:cacheprovider -v -rA "${XDIST[@]}" \
                    --junitxml "$OUT/test_cuda.xml" tests/test_cuda.py ;;
        bench_*_*) local m="${1#bench_}"; bench_cmd "${m%_*}" "${m#*_}" ;;
        loader) printf '%q ' "$PY" benchmarks/bench_loader.py "${LOADER[@]}" --out "$TMP/loader_device.json" ;;
    esac
}

# the environment: versions, the GPU, which of the needed modules import (and which do not)
ENV_PY='
import importlib, json, platform, subprocess, sys
out_txt, out_json = sys.argv[1], sys.argv[2]
need = ["torch", "torchvision", "timm", "numpy", "yaml", "PIL", "tensorboard", "pytest"]
extra = ["xdist", "triton", "submitit", "optuna"]
info = {"python": platform.python_version(), "missing": [], "optional_missing": []}
for name in need + extra:
    try:
        m = importlib.import_module(name)
        info[name] = getattr(m, "__version__", "yes")
    except Exception as e:
        (info["missing"] if name in need else info["optional_missing"]).append(f"{name} ({type(e).__name__}: {e})")
try:
    import torch
    info.update(cuda_available=torch.cuda.is_available(), torch_cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
    if torch.cuda.is_available():
        info.update(device_name=torch.cuda.get_device_name(0), bf16=torch.cuda.is_bf16_supported(),
                    capability=list(torch.cuda.get_device_capability(0)),
                    memory_gb=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
except Exception as e:
    info["torch_error"] = repr(e)
try:
    smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout
except Exception as e:
    smi = f"nvidia-smi: {e}"
with open(out_txt, "w") as f:
    f.write(json.dumps(info, indent=1) + "\n\n" + smi)
json.dump(info, open(out_json, "w"))
print("missing:", ", ".join(info["missing"]) or "nothing",
      "| optional missing:", ", ".join(info["optional_missing"]) or "nothing")
sys.exit(3 if info["missing"] else 0)
'

# one line per stage in $TMP/stages.jsonl: name, status, rc, seconds
record() {
    printf '{"stage": "%s", "status": "%s", "rc": %s, "seconds": %s}\n' "$1" "$2" "$3" "$4" >>"$TMP/stages.jsonl"
}

run_stage() {
    local name="$1" min timeout left rc t0 log
    read -r min timeout <<<"${LIMITS[$name]}"
    left=$(( DEADLINE - $(date +%s) ))
    if [ "$left" -lt "$min" ]; then
        echo "== $name: skipped, ${left}s left of the budget (needs ${min}s)"
        record "$name" "skipped_no_time" null 0
        return
    fi
    [ "$timeout" -gt "$left" ] && timeout="$left"
    log="$OUT/bench.log"
    [ "$name" = tests ] && log="$OUT/test_cuda.log"
    [ "$name" = env ] && log="$TMP/env.log"
    echo "== $name (timeout ${timeout}s): $(stage_cmd "$name")" | tee -a "$log"
    t0=$(date +%s)
    case "$name" in
        env) timeout -k 10 "$timeout" "$PY" - "$OUT/env.txt" "$TMP/env.json" <<<"$ENV_PY" 2>&1 | tee -a "$log" ;;
        *) eval "timeout -k 10 $timeout $(stage_cmd "$name")" 2>&1 | tee -a "$log" | tail -n 25 ;;
    esac
    rc=$?
    local status=ok
    [ "$rc" -ne 0 ] && status=failed
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && status=timeout
    record "$name" "$status" "$rc" $(( $(date +%s) - t0 ))
    echo "== $name: $status (rc $rc, $(( $(date +%s) - t0 ))s)"
}

if [ "$DRY" = 1 ]; then
    echo "budget ${BUDGET}s; OUTDIR $OUT; stages: $STAGES"
    for s in $STAGES; do echo "$s [${LIMITS[$s]% *}s min, ${LIMITS[$s]#* }s max]: $(stage_cmd "$s")"; done
    exit 0
fi

mkdir -p "$OUT" || exit 2
rm -f "$OUT/bench.log" "$OUT/test_cuda.log"
START=$(date +%s)
DEADLINE=$(( START + BUDGET ))
for s in $STAGES; do
    if [ "$s" = tests ] && [ ${#XDIST[@]} -gt 0 ] && ! "$PY" -c "import xdist" 2>/dev/null; then
        XDIST=()  # pytest-xdist missing there: the tests run one after another
    fi
    [ "$s" = tests ] && warm_start
    case "$s" in bench_*_compiled) warm_wait ;; esac
    run_stage "$s"
    if [ "$s" = env ] && grep -q '"status": "failed"' "$TMP/stages.jsonl"; then
        echo "error: modules missing (above); install them (pip install -r requirements.txt) and run again" >&2
        break
    fi
    if [ "$s" = env ] && [ "$SMOKE" = 0 ] && ! grep -q '"cuda_available": true' "$TMP/env.json"; then
        echo "error: CUDA is not available here (see $OUT/env.txt); --cpu-smoke checks the script without a GPU" >&2
        record cuda_available failed 1 0
        break
    fi
done

wait  # a background compile still running (each has its own timeout)

# summary.json and the lines at the end of stdout
"$PY" - "$TMP" "$OUT" "$SMOKE" $(( $(date +%s) - START )) <<'PYEOF'
import glob, json, os, re, sys
tmp, out, smoke, total = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
stages = [json.loads(line) for line in open(os.path.join(tmp, "stages.jsonl"))] if os.path.exists(
    os.path.join(tmp, "stages.jsonl")) else []
env = json.load(open(os.path.join(tmp, "env.json"))) if os.path.exists(os.path.join(tmp, "env.json")) else {}
bench = {os.path.basename(p)[:-5]: json.load(open(p)) for p in sorted(glob.glob(os.path.join(tmp, "*_*.json")))}
tests = None
log = os.path.join(out, "test_cuda.log")
if os.path.exists(log):
    lines = [line for line in open(log) if re.search(r"\d+ (passed|failed|skipped|error)", line)]
    tests = lines[-1].strip("= \n") if lines else None
summary = {"smoke": smoke, "seconds": total, "env": env, "stages": stages, "tests": tests, "bench": bench}
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
print(f"\n==== gpu_check summary ({'CPU smoke' if smoke else env.get('device_name', '?')}, {total}s)")
for s in stages:
    print(f"  {s['stage']:22s} {s['status']:16s} {s['seconds']}s")
print(f"  tests: {tests}")
keys = ("finetune_vs_plain", "mfu", "plain_timm_mfu", "pretrain_step_vs_finetune_step",
        "pretrain_flops_vs_finetune_flops", "eval_vs_finetune",
        "finetune_img_per_s", "plain_timm_img_per_s", "finetune_first_step_s", "peak_mem_mb",
        "compile_graph_breaks", "profile_grn_share", "profile_layer_norm_share")
for name, b in bench.items():
    if name.startswith("loader"):
        print(f"  {name}: " + ", ".join(f"{k}={v}" for k, v in b.items()))
        continue
    print(f"  {name}: " + ", ".join(f"{k}={b[k]}" for k in keys if k in b))
for name, b in bench.items():
    if "profile_top" in b:
        print(f"  {name} top kernels: " + "; ".join(f"{k[:60]} {share:.1%}" for k, _, share in b["profile_top"][:5]))
PYEOF
# exit status: 1 a stage failed or timed out, 3 a stage was skipped for lack of time, else 0
grep -q '"status": "\(failed\|timeout\)"' "$TMP/stages.jsonl" 2>/dev/null && exit 1
grep -q '"status": "skipped_no_time"' "$TMP/stages.jsonl" 2>/dev/null && exit 3
exit 0
