"""BN diagnostics of this study's running-statistics trials, measured again with the current code.

The committed study was scored before two fixes to the diagnostics (batch renorm's train-mode
loss used r and d, which reproduce the running-statistics output, so its gap was ~0 by
construction) and before two fixes to training (the conv bias before group and layer norm; batch
renorm's relaxation delay). This script re-runs every COMPLETE trial whose norms keep running
statistics (batch, batch renorm), with its stored spec, its trial number's fold seeds and the
study's CV (3 folds x 8 epochs, CPU, one thread), and writes `diagnostics.md` next to it.

    .venv/bin/python experiments/bn_placement_digits/diagnostics.py
"""

from __future__ import annotations

import statistics
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState

from nas.data import load_dataset, stratified_folds
from nas.search import load_run_config, norm_group
from nas.training import cross_validate

HERE = Path(__file__).resolve().parent
STUDY = f"sqlite:///{HERE / 'study.db'}"


def main() -> None:
    torch.set_num_threads(1)
    cfg = load_run_config(HERE / "config.yaml")
    data = load_dataset(cfg.dataset)
    folds = stratified_folds(data.y_train, cfg.evaluation.folds, cfg.study.seed)
    study = optuna.load_study(study_name=cfg.study.name, storage=STUDY)
    rows = []
    for trial in study.get_trials(states=(TrialState.COMPLETE,)):
        kind, position = norm_group(trial.user_attrs["arch"])
        if kind not in ("batch", "batch_renorm"):
            continue
        score = cross_validate(
            trial.user_attrs["arch"],
            data,
            folds,
            cfg.evaluation.epochs,
            torch.device("cpu"),
            study_seed=cfg.study.seed,
            trial_number=trial.number,
        )
        old_gap = trial.user_attrs["eval_mode_loss"] - trial.user_attrs["train_mode_loss"]
        new_gap = score["eval_mode_loss"] - score["train_mode_loss"]
        rows.append((trial.number, kind, position, trial.value, old_gap, score["cv_loss"], new_gap))
        print(f"trial {trial.number}: {kind} @ {position}: stored gap {old_gap:+.4f}, now {new_gap:+.4f}", flush=True)
    lines = [
        "Eval-mode (running statistics) minus train-mode (batch statistics) validation loss, per trial; "
        "stored = as the committed study recorded it, now = re-run with the current code.",
        "",
        "| trial | norm @ position | stored CV loss | stored gap | CV loss now | gap now |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {n} | {k} @ {p} | {v:.4f} | {g0:+.4f} | {v1:.4f} | {g1:+.4f} |" for n, k, p, v, g0, v1, g1 in rows]
    lines.append("")
    for kind in ("batch", "batch_renorm"):
        mine = [r for r in rows if r[1] == kind]
        if mine:
            lines.append(
                f"- {kind}: {len(mine)} trial(s); median gap stored {statistics.median(r[4] for r in mine):+.4f}, "
                f"now {statistics.median(r[6] for r in mine):+.4f}"
            )
    (HERE / "diagnostics.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
