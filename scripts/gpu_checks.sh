#!/usr/bin/env bash
# The GPU checks of kt-ops-marlin in one run, for a machine with a CUDA device.
#
# A GPU is rarely at hand and its time is short, so everything the Marlin work must show on
# one runs here, in order of importance, each step's output saved under OUT_DIR:
#   1. the device's facts (nvidia-smi, torch, triton);
#   2. the CUDA tests (the ones that skip on a CPU-only machine) -> cuda-tests.txt;
#   3. the int4 kernel against bf16 torch.matmul at batch 1-64 -> int4_matmul.json;
#   4. end to end: the tiny DeepSeek-V2 model, then a synthetic DeepSeek-V2-Lite-shaped
#      Q4_K file, with the GPU+CPU Marlin rules on the GPU and remapped to the CPU
#      (`--device-map cuda=cpu`, the same int4 weights): greedy tokens and decode tok/s.
#
# kt is installed without dependencies into the Python that holds the machine's CUDA torch
# (PYTHON, default python3), which must already have torch, triton, transformers, pluggy,
# pytest, scikit-build-core and pybind11; pydantic, ruamel.yaml and gguf may come from
# PYTHONPATH. Nothing is downloaded.
#
#     bash scripts/gpu_checks.sh OUT_DIR [SYNTHETIC_LAYERS]     # layers: default 4, 0 skips it
#
# INT4_ARGS adds arguments to benchmarks/int4_matmul.py (e.g. "--batches 1,16").
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:?usage: gpu_checks.sh OUT_DIR [SYNTHETIC_LAYERS]}"
LAYERS="${2:-4}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT_DIR"
step() { echo "== $* ($(date +%T))"; }

step "device"
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory,driver_version --format=csv 2>&1 | tee "$OUT_DIR/device.txt"
"$PYTHON" -c 'import torch, importlib.util as u; print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "-", "triton", u.find_spec("triton") is not None)' \
    | tee -a "$OUT_DIR/device.txt"

step "installing kt into $PYTHON (no dependencies)"
SITE="$(mktemp -d)"
for pkg in kt_core kt_ops_torch kt_ops_marlin kt_ops_cpuinfer kt_models_deepseek kt_models_qwen; do
    "$PYTHON" -m pip install -q --no-deps --no-build-isolation --no-index --target "$SITE" "./$pkg" \
        >"$OUT_DIR/install-$pkg.txt" 2>&1 || { echo "installing $pkg failed: $OUT_DIR/install-$pkg.txt"; exit 1; }
done
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" OMP_WAIT_POLICY=PASSIVE
KT=("$PYTHON" -m kt_core.cli.main)

step "CUDA tests"
"$PYTHON" -m pytest -q -o addopts="" -p no:cacheprovider -rs tests/marlin tests/runtime/test_device_check.py \
    tests/runtime/test_two_gpu_rules.py 2>&1 | tee "$OUT_DIR/cuda-tests.txt" | tail -15

step "int4 kernel vs bf16 torch.matmul"
"$PYTHON" benchmarks/int4_matmul.py ${INT4_ARGS:-} >"$OUT_DIR/int4_matmul.json" 2>"$OUT_DIR/int4_matmul.err"; tail -20 "$OUT_DIR/int4_matmul.err"
head -c 3000 "$OUT_DIR/int4_matmul.json"; echo

# Greedy tokens and decode speed of one model with the Marlin rules on the GPU and on the CPU.
both_placements() {  # NAME RULES ARGS...
    local name="$1" rules="$2"; shift 2
    for place in gpu cpu; do
        local remap=()
        [ "$place" = cpu ] && remap=(--device-map cuda=cpu)
        "${KT[@]}" run "$@" --rules "$rules" "${remap[@]}" --prompt "Mixture-of-Experts models route every token" \
            --max-new-tokens 24 --json >"$OUT_DIR/$name-run-$place.json" 2>"$OUT_DIR/$name-run-$place.err"
        "${KT[@]}" bench "$@" --rules "$rules" "${remap[@]}" --prompt-len 128 --gen-len 32 --json \
            >"$OUT_DIR/$name-bench-$place.json" 2>"$OUT_DIR/$name-bench-$place.err"
        if [ -s "$OUT_DIR/$name-bench-$place.json" ]; then echo "$name on $place: $(cat "$OUT_DIR/$name-bench-$place.json")"
        else echo "$name on $place failed:"; tail -5 "$OUT_DIR/$name-bench-$place.err"; fi
    done
    "$PYTHON" - "$OUT_DIR/$name-run-gpu.json" "$OUT_DIR/$name-run-cpu.json" <<'EOF'
import json, sys
try:
    gpu, cpu = (json.load(open(p))["tokens"] for p in sys.argv[1:])
except (OSError, ValueError, KeyError) as exc:
    sys.exit(f"greedy tokens: not compared ({exc})")
same = next((i for i, (a, b) in enumerate(zip(gpu, cpu)) if a != b), min(len(gpu), len(cpu)))
print(f"greedy tokens: {same} of {len(cpu)} equal before the first difference")
EOF
}

step "end to end: kt demo's tiny DeepSeek-V2-Lite (Q8_0), the Marlin rules with groups of 32"
export KT_CACHE="$OUT_DIR/cache"
DEMO="$("$PYTHON" -c 'from kt_core.cli.demo_cmd import demo_model_path; print(demo_model_path())')"
sed 's/group_size: [0-9]*/group_size: 32/' kt_core/src/kt_core/shipped_rules/deepseek-v2-lite-gpu-marlin.yaml \
    >"$OUT_DIR/tiny-marlin-rules.yaml"
both_placements tiny "$OUT_DIR/tiny-marlin-rules.yaml" --gguf "$DEMO"

if [ "$LAYERS" != 0 ]; then
    step "end to end: synthetic DeepSeek-V2-Lite, $LAYERS layers, Q4_K"
    SYNTH="$OUT_DIR/../dsv2lite-synth$LAYERS-Q4_K.gguf"
    [ -f "$SYNTH" ] || "$PYTHON" benchmarks/synthetic_model.py --type Q4_K --layers "$LAYERS" --out "$SYNTH" | tail -1
    both_placements synth deepseek-v2-lite-gpu-marlin --gguf "$SYNTH"
fi
step "done"
