"""bnnas: neural architecture search with normalization as a first-class search dimension.

The subpackages, in the order data flows through them (each imports only those before it):

models    the normalization catalogue, blocks, `build(ArchSpec) -> nn.Module`, BN folding
data      datasets as tensors on the device, fingerprints, transforms, preprocessing
search    the search space, the ArchSpec, the run config, samplers and pruners
training  the training loop, k-fold cross-validation, folds trained together, BN diagnostics
study     the Optuna study: storage, stored schema, contract, the search run, reports
cluster   Ray workers and the storage proxy's server
compare   nas-compare: equal-budget comparisons with intervals
deploy    export, predict, bench, fine-tune
dashboard the web app

`nas.errors` and `nas.validation` sit below them all; `nas.cli` maps it all to console scripts.
The names below are the public Python API, imported on first use; `nas.build.build(spec, input_shape,
num_classes)` rebuilds any trial's model from its stored ArchSpec.
"""

from nas._lazy import public

__version__ = "0.1.0"  # the one version source: pyproject.toml reads it

__getattr__, __dir__, __all__ = public(
    __name__,
    {
        "search.config": ["load_run_config", "RunConfig"],
        "search.space": ["Space", "load_space"],
        "data.datasets": ["load_dataset"],
        "training.cross_validation": ["cross_validate"],
        "study.run": ["run_search"],
        "study.storage": ["load_existing_study"],
        "study.schema": ["request_stop"],
        "deploy.export": ["export_trial", "load_exported"],
    },
)
__all__ = ["__version__", *__all__]
