#!/usr/bin/env bash
# The one-shot GPU check: run the CUDA path for real and print each figure on one line.
#
#   bash scripts/gpu_check.sh            # from the repository root, on a machine with a CUDA GPU
#
# It installs nothing: it uses the project's own install (`pip install -e ".[dev]"`, or the
# device machine's image plus the wheels of shared/scripts/device-wheels.sh on PYTHONPATH).
# Budget: under 10 minutes on one GPU (each step has its own limit below: 590 s in all). Steps:
#   1. the @pytest.mark.cuda tests (bf16 autocast, channels_last, both fold modes, out-of-memory
#      recovery, two workers on one GPU, export from the GPU);
#   2. bench_train.py: our trainer vs the Dataset + DataLoader way, CIFAR-shaped (target <= 0.3x);
#   3. bench_cv.py: k folds together vs one by one, CIFAR-shaped (target >= 3x);
#   4. bench_workers.py: trials/hour with 1, 2, 4 workers on one GPU (target >= 2x for small candidates);
#   5. bench_workers.py --ray: trials/hour with 1, 2, 4 Ray workers on one GPU (--gpus-per-trial 1, 0.5,
#      0.25), which decides the default --gpus-per-trial (skipped, saying so, where Ray is not installed);
#   6. a CIFAR-shaped search slice: trials/hour of nas-search with the bn_placement space.
# Lines starting with "== " are the figures; everything else is the scripts' own output.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEVICE=${GPU_CHECK_DEVICE:-cuda}  # GPU_CHECK_DEVICE=cpu walks every step on the CPU, to prepare the script (figures meaningless)
export PYTHONUNBUFFERED=1 BNNAS_CUDA_TEST_DEVICE=$DEVICE
if [ "$DEVICE" = cuda ] && ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "== no CUDA device: nothing to check (the figures stay unmeasured)"; exit 2
fi
$PY -c "import torch; print('== device:', torch.cuda.get_device_name(0) if '$DEVICE' == 'cuda' else 'cpu', '| torch', torch.__version__)"
log=$(mktemp -d)
status=0

step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep its output, report failure
    local name=$1 limit=$2; shift 2
    echo "-- $name"
    if ! timeout "$limit" "$@" 2>&1 | tee "$log/$name.log"; then
        echo "== $name: FAILED or timed out after ${limit}s"; status=1
    fi
}

step cuda-tests 100 $PY -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py
grep -E "passed|failed|skipped" "$log/cuda-tests.log" | tail -1 | sed 's/^/== cuda tests: /'

step bench-train 60 $PY scripts/bench_train.py --device $DEVICE --workloads cifar --repeats 3 --epochs 1
grep -E "target:" "$log/bench-train.log" | sed 's/^ */== bench_train (ours vs DataLoader, CIFAR-shaped): /'

step bench-cv 60 $PY scripts/bench_cv.py --device $DEVICE --dataset cifar-shaped --repeats 3 --epochs 2
grep -E "target:" "$log/bench-cv.log" | sed 's/^ */== bench_cv (folds together vs one by one, CIFAR-shaped): /'

step bench-workers 80 $PY scripts/bench_workers.py --device $DEVICE --dataset cifar-shaped --trials 6 --epochs 1 --workers 1,2,4 --repeats 2
grep -E "^ +[124] " "$log/bench-workers.log" | awk '{print "== bench_workers: " $1 " worker(s): " $4 " trials/hour (median of 2 runs: " $2 " s, range " $3 " s), " $5 " vs 1 worker"}'

if $PY -c "import ray" 2>/dev/null; then
    step bench-workers-ray 90 $PY scripts/bench_workers.py --ray --device $DEVICE --dataset cifar-shaped --trials 6 --epochs 1 --workers 1,2,4 --repeats 2
    grep -E "^ +[124] " "$log/bench-workers-ray.log" | awk '{print "== bench_workers --ray: " $1 " trial(s) per GPU: " $4 " trials/hour (median of 2 runs: " $2 " s, range " $3 " s), " $5 " vs 1"}'
else
    echo "== bench_workers --ray: skipped, Ray is not installed (pip install 'bnnas[ray]'); --gpus-per-trial stays 1 by default"
fi

step bench-data 120 $PY scripts/bench_data.py --device $DEVICE --images 20000 --size 64 --repeats 2
grep -E "target:|epoch ratios" "$log/bench-data.log" | sed 's/^ */== bench_data (uint8 on the device vs streamed, 20k PNGs): /'

slice=$(mktemp -d)
$PY - "$slice" "$DEVICE" <<'EOF'
import sys, numpy as np, yaml, pathlib
folder = pathlib.Path(sys.argv[1]); rng = np.random.default_rng(0)
np.savez(folder / "c.npz", x_train=rng.random((10000, 3, 32, 32), dtype=np.float32), y_train=rng.integers(0, 10, 10000),
         x_test=rng.random((1000, 3, 32, 32), dtype=np.float32), y_test=rng.integers(0, 10, 1000))
(folder / "run.yaml").write_text(yaml.safe_dump({"dataset": {"name": "npz", "root": str(folder / "c.npz"), "augment": "crop_flip"},
    "search_space": str(pathlib.Path("search_spaces/bn_placement.yaml").resolve()), "device": sys.argv[2],
    "study": {"name": "slice", "storage": f"sqlite:///{folder}/s.db", "sampler": "tpe", "trials": 6, "seed": 0},
    "evaluation": {"folds": 3, "epochs": 2, "pruner": "hyperband"}}))
EOF
start=$(date +%s)
step search-slice 80 $PY -m nas search --config "$slice/run.yaml" --no-progress
echo "== CIFAR-shaped search slice (6 trials, 3 folds x 2 epochs, TPE + Hyperband): $(( $(date +%s) - start )) s wall"
exit $status
