"""Benchmark: what a progress bar costs a trial - validating every epoch for the bar (bnnas <= 0.35) vs showing the
training loss (now; validation only after the last epoch, unless a pruner reads every epoch).

Times `cross_validate` of the representative digits CNN (scripts/bench_cv.py's SPEC) at configs/digits.yaml's
folds and epochs, with the folds trained together and one by one, the two bars interleaved (the first swapped
every repeat); prints each variant's median seconds, the spread, and the ratio.

    .venv/bin/python scripts/bench_progress.py --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_cv import DIGITS_CONFIG, SPEC

from nas.data import load_dataset, stratified_folds
from nas.search import DatasetConfig, load_run_config
from nas.training import cross_validate

BARS = {
    "validates every epoch (before)": {"on_epoch": lambda report: None},
    "training loss only (now)": {"on_trained": lambda epoch, fold, loss: None},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cfg = load_run_config(DIGITS_CONFIG)
    device = torch.device("cpu")
    data = load_dataset(DatasetConfig(name="digits"), device)
    folds = stratified_folds(data.y_train, cfg.evaluation.folds, 0)
    epochs = cfg.evaluation.epochs
    print(
        f"digits, {cfg.evaluation.folds} folds x {epochs} epochs, {torch.get_num_threads()} threads, "
        f"{args.repeats} interleaved repeats"
    )
    for mode in ("together", "sequential"):
        cross_validate(SPEC, data, folds, 1, device, fold_mode=mode)  # warm-up
        times = {name: [] for name in BARS}
        for r in range(args.repeats):
            for name, callbacks in BARS.items() if r % 2 == 0 else reversed(BARS.items()):
                start = time.perf_counter()
                cross_validate(SPEC, data, folds, epochs, device, fold_mode=mode, **callbacks)
                times[name].append(time.perf_counter() - start)
        before, now = (statistics.median(t) for t in times.values())
        print(f"fold_mode {mode}:")
        for name, t in times.items():
            print(f"  {name:32} median {statistics.median(t):6.2f} s  (min {min(t):.2f}, max {max(t):.2f})")
        print(f"  a trial with a bar takes {now / before:.2f}x the time it took ({(1 - now / before) * 100:.0f}% less)")


if __name__ == "__main__":
    main()
