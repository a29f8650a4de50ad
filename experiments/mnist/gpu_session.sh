#!/usr/bin/env bash
# The GPU measurements in one call: the train-step benchmark, then the runs
# named in RUNS (default "paper ensemble"): the paper config
# (configs/default.py) with the teacher trained in the run and saved, and
# the §4 ensemble experiment at the paper's scale (configs/ensemble_gpu.py).
#
# Written for a lent accelerator with no network whose image has jax, flax,
# optax, orbax, tqdm, matplotlib and torch but neither ml_collections nor
# MNIST. Prepare both once, here in the repo root, on the CPU machine:
#
#   make gpu-carry    # .whl/ (the ml_collections wheel), .mnist/ (the IDX
#                     # files); both git-ignored, never committed
#
# then run this from the repo root there, carrying .whl and .mnist:
#
#   OUT=<results folder> bash experiments/mnist/gpu_session.sh [--config.x=y ...]
#
# Extra arguments are config overrides for the paper run (ENSEMBLE_ARGS:
# for the ensemble run). Everything it reports lands in $OUT (default
# runs/gpu_session):
#   devices.txt, bench.log, mesh.log, paper.log, ensemble.log
#   train_step_<backend>.json         benchmarks/train_step.py
#   mesh_step_<backend>.json          benchmarks/_mesh.py: the kd epoch on 1
#                                     device, data parallel and FSDP over all
#                                     (GPU: every GPU there; cpu: 8 virtual)
#   paper_gpu.json, paper_gpu.md,     the paper run (results.json renamed), or
#   paper_gpu.partial.json            the rows finished before PAPER_S ran out
#   paper_gpu_table.png, paper_gpu_sweep_temperature.png
#   teacher_gpu.msgpack, teacher_gpu.json   the teacher trained in the run
#   ensemble_gpu.json, ensemble_gpu.md,  the ensemble run (or
#   ensemble_gpu.partial.json, ensemble_gpu.png   its finished rows)
# Checkpoints stay in $WORK (default /tmp/kdjax_paper_gpu; the ensemble's
# in $WORK/ensemble), not in $OUT; a
# rerun with the same config resumes from them. Results left in $WORK by an
# earlier run are deleted first, so $OUT only ever holds this run's. The
# files are collected on exit, also when the script itself is terminated.
# Exit status: the first failing run's in RUNS order, else 0 (124: its
# time limit ran out; 2: a mistake such as a WORK holding another run,
# named in its log; 3: set-up failed, or RUNS names an unknown run).
# Time limits in seconds: BENCH_S (default 120), MESH_S (default 90),
# PAPER_S (default 420, the issue's 8-minute budget less start-up),
# ENSEMBLE_S (default 1800), SPECIALISTS_S (default 0: the specialists run
# after RUNS is skipped; keep the limits' sum under the remote call's limit).
# BACKEND=cpu (with BENCH_ARGS such
# as "--epochs-steps 20 --repeats 1") rehearses it on the CPU machine.
set -u
OUT=${OUT:-runs/gpu_session}
WORK=${WORK:-/tmp/kdjax_paper_gpu}
BACKEND=${BACKEND:-gpu}
RUNS=${RUNS:-paper ensemble}
for name in $RUNS; do
  case "$name" in
    paper|ensemble) ;;
    *) echo "RUNS names an unknown run '$name': use paper and/or" \
            "ensemble." >&2; exit 3 ;;
  esac
done
mkdir -p "$OUT"

if ! python3 -c "import ml_collections" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "ml_collections is not installed and .whl/ holds no wheels: run" \
         "'make gpu-carry' on a machine with PyPI access and carry .whl." >&2
    exit 3
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --target /tmp/kdjax_site .whl/*.whl || exit 3
  export PYTHONPATH=/tmp/kdjax_site${PYTHONPATH:+:$PYTHONPATH}
fi
export KDJAX_DATA_DIR=${KDJAX_DATA_DIR:-$PWD/.mnist} KDJAX_PROGRESS=0
if [ ! -e "$KDJAX_DATA_DIR/train-images-idx3-ubyte.gz" ] &&
   [ ! -e "$KDJAX_DATA_DIR/train-images-idx3-ubyte" ]; then
  echo "no MNIST IDX files in $KDJAX_DATA_DIR: run 'make gpu-carry' and" \
       "carry .mnist, or set KDJAX_DATA_DIR." >&2
  exit 3
fi

python3 -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 |
    tee "$OUT/devices.txt"

OUTPUTS="results.json:paper_gpu.json results.partial.json:paper_gpu.partial.json
  results.md:paper_gpu.md table.png:paper_gpu_table.png
  sweep_temperature.png:paper_gpu_sweep_temperature.png
  teacher_gpu.msgpack:teacher_gpu.msgpack teacher_gpu.json:teacher_gpu.json
  ensemble/results.json:ensemble_gpu.json
  ensemble/results.partial.json:ensemble_gpu.partial.json
  ensemble/results.md:ensemble_gpu.md ensemble/ensemble.png:ensemble_gpu.png"
mkdir -p "$WORK/ensemble"
for pair in $OUTPUTS; do
  rm -f "$WORK/${pair%%:*}" "$OUT/${pair##*:}"
done

collected=0
collect() {
  [ "$collected" = 1 ] && return
  collected=1
  for pair in $OUTPUTS; do
    src=$WORK/${pair%%:*}
    if [ -f "$src" ]; then cp "$src" "$OUT/${pair##*:}"; fi
  done
  ls -l "$OUT"
}
trap collect EXIT
# `timeout` runs its command in a process group of its own, so a TERM sent
# to this script's group would not reach it: run it in the background, wait
# (which a trapped signal interrupts), and pass the signal on.
child=
trap 'echo "terminated: stopping the run, collecting what is finished" >&2
      if [ -n "$child" ]; then kill -TERM "$child" 2>/dev/null; wait "$child"; fi
      exit 143' TERM INT
limited() {  # limited SECONDS LOG COMMAND...
  local limit=$1 log=$2
  shift 2
  timeout "$limit" "$@" > "$log" 2>&1 &
  child=$!
  wait "$child"
}

limited "${BENCH_S:-120}" "$OUT/bench.log" python3 benchmarks/train_step.py \
    --backend "$BACKEND" --batch-size 128 \
    --json "$OUT/train_step_$BACKEND.json" --mesh-steps 0 ${BENCH_ARGS:-}
bench_status=$?
echo "benchmark exit status $bench_status$([ $bench_status = 124 ] && echo ': BENCH_S ran out')"
tail -n 25 "$OUT/bench.log"

# The multi-device step: one device vs all of them (data parallel, FSDP).
limited "${MESH_S:-90}" "$OUT/mesh.log" python3 benchmarks/_mesh.py \
    --backend "$([ "$BACKEND" = gpu ] && echo cuda || echo cpu)" \
    --devices 8 --steps 50 --json "$OUT/mesh_step_$BACKEND.json"
mesh_status=$?
echo "mesh benchmark exit status $mesh_status$([ $mesh_status = 124 ] && echo ': MESH_S ran out')"
tail -n 12 "$OUT/mesh.log"

status=0
for name in $RUNS; do
  if [ "$name" = paper ]; then
    limited "${PAPER_S:-420}" "$OUT/paper.log" python3 -m experiments.mnist.main \
        --config=experiments/mnist/configs/default.py --workdir="$WORK" \
        --config.teacher.save_to=teacher_gpu.msgpack "$@"
    run_status=$?
    echo "paper config exit status $run_status$([ $run_status = 124 ] && echo ': PAPER_S ran out; finished rows are in paper_gpu.partial.json')"
    tail -n 30 "$OUT/paper.log"
  else
    # shellcheck disable=SC2086  # ENSEMBLE_ARGS: several overrides.
    limited "${ENSEMBLE_S:-1800}" "$OUT/ensemble.log" \
        python3 -m experiments.mnist.ensemble \
        --config=experiments/mnist/configs/ensemble_gpu.py \
        --workdir="$WORK/ensemble" ${ENSEMBLE_ARGS:-}
    run_status=$?
    echo "ensemble config exit status $run_status$([ $run_status = 124 ] && echo ': ENSEMBLE_S ran out; finished rows are in ensemble_gpu.partial.json')"
    tail -n 30 "$OUT/ensemble.log"
  fi
  if [ "$status" = 0 ]; then status=$run_status; fi
done

# The specialists in the paper's regime with a CNN generalist
# (experiments/specialists/configs/regime_gpu.py), at most SPECIALISTS_S
# seconds (default 0: skipped), in $WORK/specialists (emptied first).
# Its results.json / results.md / specialists.png come back as
# specialists_gpu.json / .md / .png, its log as specialists.log. It does not
# change the exit status (RUNS').
if [ "${SPECIALISTS_S:-0}" != 0 ]; then
  rm -rf "$WORK/specialists"
  for f in specialists_gpu.json specialists_gpu.md specialists_gpu.png; do
    rm -f "$OUT/$f"
  done
  limited "$SPECIALISTS_S" "$OUT/specialists.log" python3 -m \
      experiments.specialists.main \
      --config=experiments/specialists/configs/regime_gpu.py \
      --workdir="$WORK/specialists"
  spec_status=$?
  echo "specialists exit status $spec_status$([ $spec_status = 124 ] && echo ': SPECIALISTS_S ran out')"
  for pair in results.json:specialists_gpu.json results.md:specialists_gpu.md \
      specialists.png:specialists_gpu.png; do
    src=$WORK/specialists/${pair%%:*}
    if [ -f "$src" ]; then cp "$src" "$OUT/${pair##*:}"; fi
  done
  tail -n 30 "$OUT/specialists.log"
fi
exit "$status"
