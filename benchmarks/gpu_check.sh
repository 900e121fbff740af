#!/usr/bin/env bash
# moekit's GPU checks in one run, for a machine with an NVIDIA GPU, torch and transformers
# installed (moekit itself is taken from this checkout's src/):
#   1. the tests of the device paths, whose CUDA cases skip elsewhere;
#   2. the bfloat16 layer benchmark at GPU sizes (`moekit bench --preset gpu`: Mixtral-8x7B's
#      experts and a fine-grained E=64, k=8 shape, forward and forward+backward) against the dense
#      bfloat16 FFN of the same active FLOPs and transformers' experts implementations;
#   3. the expert-parallel language-model job over NCCL (torchrun, one rank per GPU) against the
#      same job in one process: the same losses and perplexities up to rounding.
#
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]     (default: runs/gpu-check)
# GPU_CHECK_DEVICE=cpu runs the same steps on the CPU at tiny sizes, to check the script itself.
# Takes a few minutes on one H200. Exits non-zero if any step failed; every step runs regardless.
set -u -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${1:-runs/gpu-check}
device=${GPU_CHECK_DEVICE:-cuda}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
failed=()

step() {  # step NAME COMMAND...: run it, log it under $out, remember a failure
    local name=$1; shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || failed+=("$name (exit $rc)")
}

step environment "$py" -c "
import torch, transformers
print('torch', torch.__version__, 'transformers', transformers.__version__)
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(), 'capability', torch.cuda.get_device_capability(), 'GPUs', torch.cuda.device_count())
"

# -rs lists every skip: on a GPU the CUDA cases must run, not skip.
step tests "$py" -m pytest -q -p no:cacheprovider -rs tests/numerics/test_device_paths.py \
    tests/numerics/test_against_reference.py

bench=(--device "$device" --preset gpu --repeats 5 --json "$out/bench.json" --markdown "$out/bench.md")
[ "$device" = cuda ] || bench+=(--quick --threads 2)
step bench "$py" -m moekit.bench.layer "${bench[@]}"

# One rank per GPU (NCCL cannot put two ranks on one GPU); two gloo ranks on the CPU.
ranks=2
[ "$device" = cuda ] && ranks=$("$py" -c "import torch; print(max(1, torch.cuda.device_count()))")
# The corpus is a file of this checkout: the Debian corpora may be missing there.
lm=(lm --data README.md --dim 32 --steps 6 --batch-size 8 --seq-len 16 --vocab-size 200 --lr 0.01 --warmup 2
    --eval-every 3 --eval-tokens 256 --checkpoint-every 6 --models moe-4,moe-16-h --seed 0 --quiet
    --device "$device" --force)
step lm-one-process "$py" -m moekit "${lm[@]}" --out "$out/lm-one-process"
step lm-expert-parallel "$py" -m torch.distributed.run --standalone --nproc_per_node="$ranks" \
    -m moekit "${lm[@]}" --expert-parallel --out "$out/lm-expert-parallel"
step lm-compare "$py" benchmarks/compare_lm.py "$out/lm-one-process" "$out/lm-expert-parallel"

if [ ${#failed[@]} -gt 0 ]; then
    printf 'FAILED: %s\n' "${failed[@]}"
    exit 1
fi
echo "all GPU checks passed; results in $out"
