#!/usr/bin/env bash
# Data version 4 against version 5 (the one variable), 5 training seeds each, all at once on one GPU: the demo
# recipe as committed but shortened to STEPS steps (the schedule compressed to them), each evaluated on the
# CPU with --eval-n EVAL_N. Ran on the H200 lent to a session (issue 23); the CPU run is the recipe itself.
#   bash experiments/demo/gpu_search.sh OUT STEPS EVAL_N       # OUT/<version>-s<seed>.{log,md}, OUT/summary.txt
set -u
OUT=$1 STEPS=$2 EVAL_N=$3
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
mkdir -p "$OUT" /tmp/search
nvidia-cuda-mps-control -d >/dev/null 2>&1 && echo "MPS started" | tee "$OUT/summary.txt"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >> "$OUT/summary.txt" 2>&1
start=$(date +%s)
for v in 4 5; do
  for seed in 0 1 2 3 4; do
    name=v$v-s$seed
    sed -e "s/^data_version = 5 .*/data_version = $v/" -e "s/^seed = 0/seed = $seed/" -e "s/^save_every = 500/save_every = 250/" \
        experiments/demo/train_demo_v5.toml > /tmp/search/$name.toml
    ( timeout 430 python3 -m gptoss.demo.recipe /tmp/search/$name.toml --run-dir /tmp/search/$name --steps "$STEPS" \
          --eval-n "$EVAL_N" > "$OUT/$name.log" 2>&1
      if [ ! -f /tmp/search/$name/export/EVAL.md ]; then  # out of time: evaluate the newest checkpoint
        echo "TIMED OUT at $(ls /tmp/search/$name/train | grep step | tail -1)" >> "$OUT/$name.log"
        timeout 130 python3 -m gptoss.demo.recipe /tmp/search/$name.toml --run-dir /tmp/search/$name --steps "$STEPS" \
            --eval-n "$EVAL_N" --skip-train >> "$OUT/$name.log" 2>&1
      fi
      cp /tmp/search/$name/export/EVAL.md "$OUT/$name.md" 2>/dev/null ) &
  done
done
wait
echo "all done in $(( $(date +%s) - start )) s" >> "$OUT/summary.txt"
for f in "$OUT"/v*.md; do
  echo "== $f: $(grep -E '^\| arithmetic' "$f" | tr '\n' ' ')" >> "$OUT/summary.txt"
done
tar czf "$OUT/logs.tgz" -C "$OUT" $(cd "$OUT" && ls *.log *.md) 2>/dev/null
rm -f "$OUT"/*.log "$OUT"/v*.md
cat "$OUT/summary.txt"
