#!/usr/bin/env bash
# The learned cost model's bench from nothing, on a machine with two cores: every row it needs is
# timed here, then fitted and scored (tools/bench_cost_model.py). The datasets live in OUT only;
# a fresh machine starts with none, and rows from another CPU would not price this one.
#
#   tools/cost_bench_from_scratch.sh OUT [FAMILY_BLOCKS]
#
# Core 0: the bench's own rows (the 9 test models timed twice, the op sweep, 80 + 48 random
#         models), then depthwise and attention blocks 320-799.
# Core 1: the family sweep (FAMILY_BLOCKS blocks of every kind, default 320).
# The two take turns timing (cost_models/sampling.py: timing_lock; each compiles while the other
# times). Then the 9 test models are timed again with nothing beside them (their first timing
# shared the machine with the sweep), and the bench fits on both cores (--jobs 2) and scores.
# Every step resumes where a killed run stopped: run the same command again.
# If the host was loaded while the sweeps ran, time their blocks again when it is quiet, e.g.
#   taskset -c 1 python -m splitc.tools.sweep_family NEW 320 --blocks OUT/family/family
# and pass NEW's rows instead (session 20: session 19's sweeps timed again this way took the
# held-out kernels from 453 to 495 of 539; the rows' `quiet` flag did not tell which were off).
set -euo pipefail
OUT=${1:?usage: $0 OUT [FAMILY_BLOCKS]}
FAMILY=${2:-320}
mkdir -p "$OUT"
export TVM_NUM_THREADS=1
BENCH=(--out "$OUT/bench" --synthetic 80 --synthetic-large 48 --big --step-processes 7
       --in-process)
TRAIN=(--train-rows "$OUT/family/fam.jsonl" --train-rows "$OUT/dw/fam.jsonl"
       --train-rows "$OUT/att/fam.jsonl")
SWEEP=(python -m splitc.tools.sweep_family)
log() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }

log "timing on both cores: the bench's rows (core 0), the family sweep (core 1)"
(taskset -c 0 python -m splitc.tools.bench_cost_model "${BENCH[@]}" --time-only \
   > "$OUT/bench_time.log" 2>&1
 taskset -c 0 "${SWEEP[@]}" "$OUT/dw" 800 --start 320 --kinds dwconv > "$OUT/dw.log" 2>&1
 taskset -c 0 "${SWEEP[@]}" "$OUT/att" 800 --start 320 --kinds attention > "$OUT/att.log" 2>&1) &
core0=$!
(taskset -c 1 "${SWEEP[@]}" "$OUT/family" "$FAMILY" > "$OUT/family.log" 2>&1) &
core1=$!
wait "$core0"
wait "$core1"

log "timing the 9 test models again, alone"
python - "$OUT/bench/bench.jsonl" <<'EOF'
import json, sys
from pathlib import Path
p = Path(sys.argv[1])
if p.with_suffix(".both_cores.jsonl").exists():
    sys.exit(0)  # set aside by an earlier run: the rows now are the ones timed alone
rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
keep = [r for r in rows if r.get("train_only") or r.get("model") == "sweep"]
p.with_suffix(".both_cores.jsonl").write_text(p.read_text())
p.write_text("".join(json.dumps(r) + "\n" for r in keep))
print(f"{len(rows) - len(keep)} test-model rows set aside in {p.with_suffix('.both_cores.jsonl')}")
EOF
taskset -c 1 python -m splitc.tools.bench_cost_model "${BENCH[@]}" --time-only \
  > "$OUT/bench_alone.log" 2>&1

log "fitting (2 jobs) and scoring"
taskset -c 0,1 python -m splitc.tools.bench_cost_model "${BENCH[@]}" "${TRAIN[@]}" --jobs 2 \
  2>&1 | tee "$OUT/bench.log"
log "done: $OUT/bench/results.json"
