"""Training one candidate: the training loop, k-fold cross-validation, the folds trained together, BN diagnostics.

train             train one model on one split and evaluate it
cross_validation  k-fold CV of one ArchSpec -> its score
folds_together    the k folds of a CV trained as one stacked model
diagnostics       BN train / eval mode losses and re-estimation
signals           SIGINT / SIGTERM: stop at a safe point, leave the study resumable
"""

from nas._lazy import public

__getattr__, __dir__, __all__ = public(
    __name__,
    {
        "train": [
            "fit",
            "evaluate",
            "make_optimizer",
            "optimizer_for",
            "prepare_model",
            "resolve_device",
            "scoring_batch_size",
            "autocast",
            "on_device_layout",
        ],
        "cross_validation": ["cross_validate", "fold_seed"],
        "folds_together": ["fold_losses"],
    },
)
