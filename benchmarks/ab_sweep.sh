#!/bin/bash
# Seconds of a gradual reconstruction sweep (the grid's "recon" sweep) of one trained run, under
# two source trees, interleaved REPEATS times (load affects both alike). One JSON line per run:
# the tree, the summed "seconds" of the sweep's rows (masking + reconstruction, no evaluation),
# the reconstructions, and the accuracy at 90-99% (equal between trees when the change keeps the
# weights). The run folder is copied; nothing is written into it.
#
#   benchmarks/ab_sweep.sh RUN_DIR TREE_A TREE_B [REPEATS]
#   e.g. git worktree add /tmp/base 0480a21 &&
#        benchmarks/ab_sweep.sh results/fashion-mnist/lenet5/sfw_best/seed0 /tmp/base . 2
set -euo pipefail
run=$1; trees=("$2" "$3"); n=${4:-3}
py=${PYTHON:-python}
for _ in $(seq "$n"); do
  for tree in "${trees[@]}"; do
    d=$(mktemp -d)
    cp "$run"/checkpoint.pt "$run"/config.json "$run"/summary.json "$d"/
    PYTHONPATH="$tree/src" OMP_NUM_THREADS=1 "$py" -m sfwprune --threads 1 sweep "$d" \
      --reconstruct --gradual --sparsities 0,0.5,0.7,0.8,0.9,0.95,0.98,0.99 --tag ab >/dev/null
    "$py" -c "import json,sys; r=json.load(open('$d/sweep-ab.json'))['rows']; print(json.dumps({'tree': sys.argv[1], 'seconds': round(sum(x['seconds'] for x in r), 3), 'reconstructions': sum(x['steps'] for x in r), 'accuracy_90_99': [x['accuracy'] for x in r if x['sparsity'] >= 0.9]}))" "$tree"
    rm -rf "$d"
  done
done
