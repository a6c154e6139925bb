#!/usr/bin/env bash
# GPU readiness in one go (at most 8 minutes on one H100: the step limits add up to 480 s): the CUDA tests, then the scaling benchmark and the
# phase profile on random-weight models of real shapes (weights do not change time or memory). Each timing is
# the median of 3 interleaved runs: on a lent machine single runs of the same cache differed by up to 2x.
#
#   bash benchmarks/gpu_check.sh            # results in benchmarks/results/*_gpu*.json (copied to $OUT if set), logs in ./gpu_check_logs
#
# A machine without transformers >= 5.24 can bring wheels: put them in .whl/ and they are installed into
# /tmp/site first. Each step runs even if an earlier one failed; the exit status is the number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
LOGS=gpu_check_logs
mkdir -p "$LOGS"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PYTHON=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=src:benchmarks${PYTHONPATH:+:$PYTHONPATH}
failed=0
save() {  # copy finished results to $OUT at once, so a run cut short still returns them ($OUT takes 8 files)
    if [ -n "${OUT:-}" ]; then cp benchmarks/results/*gpu*.json benchmarks/results/*gpu*.png "$OUT"/ 2>/dev/null; fi
}
step() {  # step NAME TIMEOUT COMMAND...: run with a time limit, log to $LOGS/NAME.log, count failures
    local name=$1 limit=$2; shift 2
    echo "== $name ($(date +%T))"
    timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
    local status=$?
    tail -n 25 "$LOGS/$name.log"
    [ $status -eq 0 ] || { echo "!! $name failed with status $status"; failed=$((failed + 1)); }
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)"
step cuda_tests 100 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_devices.py
save
step long_context_llama1b 170 "$PYTHON" benchmarks/long_context.py --model random:llama-3.2-1b --device cuda --dtype bfloat16 \
    --lengths 2048,8192,16384 --new-tokens 32 --repeats 3 --warm-runs 0 --tag gpu_llama1b
save
step long_context_llama8b 150 "$PYTHON" benchmarks/long_context.py --model random:llama-3.1-8b --device cuda --dtype bfloat16 \
    --lengths 16384 --new-tokens 32 --repeats 3 --warm-runs 0 --tag gpu_llama8b
save
step profile_llama1b 60 "$PYTHON" benchmarks/profile_observation.py --model random:llama-3.2-1b --device cuda --dtype bfloat16 \
    --repeats 3 --tag gpu_llama1b
save
echo "== done, $failed failed step(s)"
exit $failed
