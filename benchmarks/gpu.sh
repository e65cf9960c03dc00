#!/usr/bin/env bash
# The GPU benchmark: one script for a lent H100/H200 (Python 3.12, torch + torchvision present;
# zarr, numcodecs, crc32c, tqdm and pytest carried as wheels in .whl: run
#   EXTRA_WHEELS="tqdm pytest pluggy iniconfig packaging" ../shared/tools/device-wheels
# in the repo root first and carry .whl). Everything goes under $OUT (at most 8 files come
# back); stages stop starting new work at the deadline so the whole script stays under
# GPU_BUDGET_SECONDS (default 500).
#
#   OUT=/tmp/out bash benchmarks/gpu.sh
#
# 1. the CUDA tests (graphs vs eager parity, no host sync in a step, write-through on every
#    tier, the loader and the device tier)                                      -> pytest-gpu.txt
# 2. the per-boundary step probe: eager vs CUDA graphs (and inductor at two cut points)
#                                                                           -> step-probe-gpu.*
# 3. the store to the GPU: host-tier read rates through the loader         -> bench-store-gpu.txt
# 4. the 16-epoch scenario: freezeout and prefast on the device, RAM and zarr tiers in one run
#    (DenseNet-BC-76 k=12, synthetic CIFAR 50,000, bf16, channels_last, batch 256, t0 0.6)
#                                                                       -> compare-gpu-long.*
set -u
OUT=${OUT:?set OUT to the folder for results}
DEADLINE=$(( $(date +%s) + ${GPU_BUDGET_SECONDS:-500} ))
COMPILE=${COMPILE:-graphs}
W=/tmp/prefast-gpu-work  # everything lands here; at most 8 chosen files are copied to $OUT
mkdir -p "$OUT" "$W"
left() { echo $(( DEADLINE - $(date +%s) )); }
collect() {
  cp -f "$W/pytest-gpu.txt" "$W/step-probe-gpu.json" "$W/step-probe-inductor-gpu.json" \
    "$W/bench-store-gpu.json" "$W/compare-gpu-long.json" "$W/compare-gpu-long.partial.json" "$OUT/" 2>/dev/null
  cat "$W"/*.log > "$OUT/logs.txt" 2>/dev/null
}
trap collect EXIT

if [ -d .whl ] && ! python3 -c "import zarr, crc32c" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import sys, torch, zarr, numcodecs, numpy; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('device', torch.cuda.get_device_name(0)); print('zarr', zarr.__version__, 'numcodecs', numcodecs.__version__, 'numpy', numpy.__version__)"
  git rev-parse HEAD 2>/dev/null || cat .git/HEAD
  git status --porcelain 2>/dev/null | head -20
} > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"

echo "== 1. CUDA tests ($(left) s left)"
timeout 170 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_data.py \
  > "$W/pytest-gpu.txt" 2>&1
tail -8 "$W/pytest-gpu.txt"

echo "== 2. step probe ($(left) s left)"
timeout 90 python3 benchmarks/step_probe.py --device cuda --modes none graphs \
  --boundaries 0 14 27 35 38 39 --out "$W/step-probe-gpu.json" > "$W/step-probe-gpu.log" 2>&1
timeout 100 python3 benchmarks/step_probe.py --device cuda --modes none inductor \
  --boundaries 27 38 --warmup 3 --out "$W/step-probe-inductor-gpu.json" > "$W/step-probe-inductor.log" 2>&1
tail -10 "$W/step-probe-gpu.log" "$W/step-probe-inductor.log"

echo "== 3. store -> GPU ($(left) s left)"
timeout 60 python3 benchmarks/bench_store.py --gpu-only --out "$W/bench-store-gpu.json" \
  > "$W/bench-store-gpu.log" 2>&1
tail -12 "$W/bench-store-gpu.log"

echo "== 4. 16 epochs, every tier, --compile $COMPILE ($(left) s left)"
timeout $(( $(left) - 5 )) python3 benchmarks/compare.py --scenario cifar-gpu-long --compile "$COMPILE" \
  --no-progress --no-plot --cache-dir /tmp/prefast-bench --out "$W/compare-gpu-long.json" \
  > "$W/compare-gpu-long.log" 2>&1
tail -16 "$W/compare-gpu-long.log"
echo "== done ($(left) s left)"
