#!/usr/bin/env bash
# The GPU benchmark: one script for a lent H100/H200 (Python 3.12, torch + torchvision present;
# zarr, numcodecs, crc32c, tqdm and pytest carried as wheels in .whl: run
#   EXTRA_WHEELS="tqdm pytest pluggy iniconfig packaging" ../shared/tools/device-wheels
# in the repo root first and carry .whl). Everything goes under $OUT (at most 8 files come
# back); each stage gets what is left of GPU_BUDGET_SECONDS (default 530) minus what the later
# stages STAGES names need, so the whole script ends inside the budget and keeps what it measured.
#
#   PREFAST_COMMIT=<the commit copied> bash benchmarks/gpu.sh
#
# OUT is the folder whose files come back: a lent machine's tool sets it, so leave it as it is
# there (OUT=/tmp/out ... would put the results where nothing is copied back); elsewhere set it.
# PREFAST_COMMIT is what every result's environment records as its commit (the copy's own .git
# is stale on a lent machine); give the full hash of the tree as copied.
#
# 1. the per-boundary step probe with CUDA graphs (b = 0, 14, 27, 35, 38, 39), and below the
#    last unit the same steps writing the next cache through into each tier
#    (PROBE_WRITE_THROUGH, default "device ram zarr"; empty: none); the scenario uses graphs
#    if they ran at every boundary, or at those the probe reached before its time limit, and
#    eager steps if the probe failed, auto if PROBE_MODES tried no graphs (COMPILE=none|graphs
#    forces a choice)
#                                                                          -> step-probe-gpu.json
# 2. the 16-epoch scenario: freezeout and prefast on the device, RAM and zarr tiers in one run,
#    with freezeout's eager steps beside them (run last, the first cut by the budget) unless
#    EAGER_BASELINE=0 (DenseNet-BC-76 k=12, synthetic CIFAR 50,000, bf16, channels_last,
#    batch 256, t0 0.6)
#                                                     -> compare-gpu-long.json (or .partial.json)
# 3. the CUDA tests (graphs vs eager parity, no host sync in a step, write-through on every
#    tier, the loader and the device tier)                                      -> pytest-gpu.txt
# 4. raw-store writes and loader feed rates to the GPU                         -> bench-feed-gpu.*
#
# SCENARIO_ARGS adds options to stage 2, e.g. SCENARIO_ARGS="--tiers device zarr --rounds 2".
# PROBE_MODES, PROBE_BOUNDARIES and PROBE_TIMEOUT (s) change the probe, e.g. PROBE_MODES="none
# graphs graphs+tuned" for eager steps and cuDNN autotuning beside graphs.
# STAGES picks stages (default "probe scenario tests feed"); a fifth, "fidelity", runs the
# accuracy study on the same model and data (16 epochs, seeds 0 1 2, FIDELITY_VARIANTS,
# default freezeout prefast-v1 prefast-v1-shift+flip) until the budget is spent, seed-major,
# so a short budget still covers every variant once        -> fidelity-cifar-gpu.{json,jsonl}
#   STAGES=fidelity OUT=/tmp/out bash benchmarks/gpu.sh
set -u
STAGES=" ${STAGES:-probe scenario tests feed} "
has() { [[ "$STAGES" == *" $1 "* ]]; }
OUT=${OUT:?set OUT to the folder for results}
DEADLINE=$(( $(date +%s) + ${GPU_BUDGET_SECONDS:-530} ))
W=/tmp/prefast-gpu-work  # everything lands here; at most 8 chosen files are copied to $OUT
rm -rf "$W"  # a rerun on a warm machine must not return the last call's files as its own
mkdir -p "$OUT" "$W"
left() { echo $(( DEADLINE - $(date +%s) )); }
# seconds for a stage that must leave $1 s to the later ones; none (the stage is skipped,
# saying so) under 10 s: `timeout 0` would not limit it, a negative one would not run it
share() {
  local s=$(( $(left) - $1 ))
  if [ "$s" -lt 10 ]; then echo "-- skipped: ${s} s left for it" >&2; return 1; fi
  echo "$s"
}
# seconds to keep back for the stages after $1 that STAGES names, at the least each needs
# (tests 70: 25 CUDA tests took 26.5 s at 3495aee, and there are 38 now; feed 27; fidelity
# 120), and 3 for the files' copy: a stage not named keeps none
later() {
  local s=3 seen= st
  for st in probe scenario tests feed fidelity; do
    if [ -n "$seen" ] && has "$st"; then
      case $st in tests) s=$((s + 70)) ;; feed) s=$((s + 27)) ;; fidelity) s=$((s + 120)) ;; esac
    fi
    [ "$st" = "$1" ] && seen=1
  done
  echo "$s"
}
collect() {
  cp -f "$W/pytest-gpu.txt" "$W/step-probe-gpu.json" "$W/bench-feed-gpu.json" \
    "$W/compare-gpu-long.json" "$W/compare-gpu-long.partial.json" \
    "$W/fidelity-cifar-gpu.json" "$W/fidelity-cifar-gpu.jsonl" "$OUT/" 2>/dev/null
  cat "$W"/*.log > "$OUT/logs.txt" 2>/dev/null
}
trap collect EXIT

if [ -d .whl ] && ! python3 -c "import zarr, crc32c, tqdm" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
# every stage needs these: without them each would fail in turn and the script still end
# "done", its budget spent on nothing
if ! python3 -c "import torch, zarr, numcodecs, crc32c, tqdm" > "$OUT/environment.txt" 2>&1; then
  echo "missing packages: carry the wheels in .whl (see this script's header)" \
    | tee -a "$OUT/environment.txt"
  exit 1
fi
[ -n "${PREFAST_COMMIT:-}" ] || echo "warning: PREFAST_COMMIT is not set; results record this copy's .git"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  nproc
  uname -r
  df -T /tmp | tail -1
  python3 -c "import sys, torch, zarr, numcodecs, numpy; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('device', torch.cuda.get_device_name(0)); print('zarr', zarr.__version__, 'numcodecs', numcodecs.__version__, 'numpy', numpy.__version__)"
  # this copy's .git may be another commit's: the command names the one it was copied from
  echo "commit (given): ${PREFAST_COMMIT:-none given}"
  git rev-parse HEAD 2>/dev/null || cat .git/HEAD
  git status --porcelain 2>/dev/null | head -20
} > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"

COMPILE=${COMPILE:-}
if has probe; then
  echo "== 1. step probe ($(left) s left)"
  # shellcheck disable=SC2086
  WT=${PROBE_WRITE_THROUGH-device ram zarr}
  PT=${PROBE_TIMEOUT:-110}
  MAX=$(( $(left) - $(later probe) ))  # never into what the later stages need
  [ "$PT" -le "$MAX" ] || PT=$MAX
  if [ "$PT" -lt 10 ]; then
    echo "-- skipped: ${PT} s left for it" >&2
  else
    timeout "$PT" python3 benchmarks/step_probe.py --device cuda \
      --modes ${PROBE_MODES:-graphs} --boundaries ${PROBE_BOUNDARIES:-0 14 27 35 38 39} \
      ${WT:+--write-through $WT} --store-dir /tmp \
      --warmup 5 --steps 20 --repeats 3 --out "$W/step-probe-gpu.json" > "$W/step-probe-gpu.log" 2>&1
    RC=$?
    tail -14 "$W/step-probe-gpu.log"
    if [ -z "$COMPILE" ]; then
      # graphs where every boundary probed has a graphs row, or where the probe's time limit
      # (exit 124) stopped it after graphs ran; none where it failed (graphs may be what
      # failed); auto where it measured nothing
      COMPILE=$(python3 -c "import sys; from benchmarks.step_probe import compile_choice; print(compile_choice(sys.argv[1], int(sys.argv[2])))" \
        "$W/step-probe-gpu.json" "$RC" 2>/dev/null)
    fi
  fi
fi
COMPILE=${COMPILE:-auto}
EAGER=--eager-baseline
[ "${EAGER_BASELINE:-1}" = 0 ] && EAGER=

if has scenario; then
  echo "== 2. 16 epochs, every tier, --compile $COMPILE ($(left) s left)"
  # shellcheck disable=SC2086
  if T=$(share "$(later scenario)"); then
    timeout "$T" python3 benchmarks/compare.py --scenario cifar-gpu-long \
      --compile "$COMPILE" $EAGER ${SCENARIO_ARGS:-} --no-progress --no-plot --verbose --cache-dir /tmp/prefast-bench \
      --out "$W/compare-gpu-long.json" > "$W/compare-gpu-long.log" 2>&1
    tail -16 "$W/compare-gpu-long.log"
    # each variant's epochs, and the plan's predictions against them (kept in logs.txt); a
    # scenario cut short left only its partial file
    R="$W/compare-gpu-long.json"
    [ -f "$R" ] || R="$W/compare-gpu-long.partial.json"
    [ -f "$R" ] && python3 benchmarks/epochs.py "$R" --from-epoch 3 2>&1 \
      | tee "$W/compare-gpu-long-epochs.log"
    rm -rf /tmp/prefast-bench
  fi
fi

if has tests; then
  echo "== 3. CUDA tests ($(left) s left)"
  if T=$(share "$(later tests)"); then
    timeout "$T" python3 -m pytest -q -p no:cacheprovider -m gpu tests/ \
      > "$W/pytest-gpu.txt" 2>&1
    tail -8 "$W/pytest-gpu.txt"
  fi
fi

if has feed; then
  echo "== 4. store writes and feed to the GPU ($(left) s left)"
  if T=$(share "$(later feed)"); then
    timeout "$T" python3 benchmarks/bench_feed.py --device cuda --num-samples 20000 \
      --repeats 1 --dir /tmp --out "$W/bench-feed-gpu.json" > "$W/bench-feed-gpu.log" 2>&1
    tail -14 "$W/bench-feed-gpu.log"
  fi
fi

if has fidelity; then
  echo "== 5. fidelity study, 16 epochs ($(left) s left)"
  # a run takes about a minute: start none in the last 100 s, stop the last one at the deadline
  # shellcheck disable=SC2086
  if T=$(share 105); then
    timeout $(( T + 100 )) python3 benchmarks/fidelity.py --dataset synthetic \
      --num-samples 50000 --depth 76 --growth 12 --epochs 16 --batch-size 256 --amp bf16 \
      --channels-last --device cuda --compile "$COMPILE" --seeds 0 1 2 \
      --variants ${FIDELITY_VARIANTS:-freezeout prefast-v1 prefast-v1-shift+flip} \
      --budget-seconds "$T" --out "$W/fidelity-cifar-gpu.json" \
      > "$W/fidelity-cifar-gpu.log" 2>&1
    tail -8 "$W/fidelity-cifar-gpu.log"
  fi
fi
echo "== done ($(left) s left)"
