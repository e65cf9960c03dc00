#!/usr/bin/env bash
# The GPU benchmark: one script for a lent H100/H200 (Python 3.12, torch + torchvision present;
# zarr, numcodecs, tqdm and pytest carried as wheels in .whl: run
#   EXTRA_WHEELS="tqdm pytest pluggy iniconfig packaging" ../shared/tools/device-wheels
# in the repo root first and carry .whl). Everything goes under $OUT; stages stop starting new
# work at the deadline so the whole script stays under ~8 minutes.
#
#   OUT=/tmp/out bash benchmarks/gpu.sh
set -u
OUT=${OUT:?set OUT to the folder for results}
DEADLINE=$(( $(date +%s) + ${GPU_BUDGET_SECONDS:-450} ))
mkdir -p "$OUT"
left() { echo $(( DEADLINE - $(date +%s) )); }

if [ -d .whl ] && ! python3 -c "import zarr" 2>/dev/null; then
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
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_data.py > "$OUT/pytest-gpu.txt" 2>&1
tail -5 "$OUT/pytest-gpu.txt"

echo "== 2. scenario (b): DenseNet-BC-76 k=12, synthetic CIFAR 50k, bf16, channels_last ($(left) s left)"
timeout $(( $(left) - 120 )) python3 benchmarks/compare.py --scenario cifar-gpu --no-progress --no-plot \
  --cache-dir /tmp/prefast-bench --out "$OUT/compare-cifar-gpu.json" > "$OUT/compare-cifar-gpu.log" 2>&1
tail -25 "$OUT/compare-cifar-gpu.log"

echo "== 3. scenario (a) views on Fashion-MNIST, as far as time allows ($(left) s left)"
FMNIST_ROOT=${FMNIST_ROOT:-$( [ -d .data/fashion-mnist ] && echo .data/fashion-mnist )}
if [ -d /usr/share/datasets/fashion-mnist ] || [ -n "$FMNIST_ROOT" ]; then
  timeout $(( $(left) - 10 )) python3 benchmarks/views.py --device cuda --batch-size 128 --epochs 6 \
    --views 1 4 2 --seeds 0 1 --no-floor --budget-seconds $(( $(left) - 60 )) \
    ${FMNIST_ROOT:+--data-root "$FMNIST_ROOT"} --out "$OUT/views-fmnist-gpu.json" > "$OUT/views-fmnist-gpu.log" 2>&1
  tail -12 "$OUT/views-fmnist-gpu.log"
else
  echo "no Fashion-MNIST on this machine; skipped" | tee "$OUT/views-fmnist-gpu.log"
fi
echo "== done ($(left) s left)"
