#!/usr/bin/env bash
# Regenerates the CPU results of bench_store.py, compare.py and views.py under
# benchmarks/results/ (hours on 2 cores; run on a quiet machine: the ratios come from variants
# run side by side in one process, but a busy machine still adds noise). Each step writes its own JSON/TXT/PNG; a step that fails does not stop
# the others. STEPS picks a subset: STEPS="fmnist views" bash benchmarks/run_cpu.sh
set -u
cd "$(dirname "$0")/.."
PY=${PY:-python}
R=benchmarks/results
log() { echo "== $(date -u +%H:%M:%S) $*"; }
STEPS=${STEPS:-store fmnist cifar cifar10k paper views}
has() { [[ " $STEPS " == *" $1 "* ]]; }
if has store; then
log "store: write/read throughput and memory, 50,000 x (84, 16, 16) fp16"
$PY benchmarks/bench_store.py --out $R/bench_store-cpu.json | tee $R/bench_store-cpu.txt
fi
if has fmnist; then
log "scenario (a): Fashion-MNIST, 60,000 images"
$PY benchmarks/compare.py --scenario fmnist --extra-views 4 --no-progress
fi
if has cifar; then
log "scenario (b): synthetic CIFAR, 50,000 images, t0 0.6 and 0.8"
$PY benchmarks/compare.py --scenario cifar-synthetic --no-progress
fi
if has cifar10k; then
log "scenario (b) at 10,000 images: host memory against the number of samples"
$PY benchmarks/compare.py --scenario cifar-synthetic --num-samples 10000 --t0 0.6 --tiers ram zarr --no-progress \
  --out $R/compare-cifar-synthetic-10k-cpu.json
fi
if has paper; then
log "scenario (c): the paper's 2,000-image subset"
$PY benchmarks/compare.py --scenario paper --no-progress
fi
if has views; then
log "views: Fashion-MNIST, freezeout vs prefast with 1/2/4/8 views and no augmentation, 2 seeds"
$PY benchmarks/views.py --out $R/views-fmnist-cpu.json
fi
log "done"
