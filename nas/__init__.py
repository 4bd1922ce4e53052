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

from typing import TYPE_CHECKING

from nas._lazy import public

if TYPE_CHECKING:  # what `public` resolves on first use, spelt out for type checkers (nas ships py.typed)
    from nas.data.datasets import load_dataset as load_dataset
    from nas.deploy.export import export_trial as export_trial
    from nas.deploy.export import load_exported as load_exported
    from nas.search.config import RunConfig as RunConfig
    from nas.search.config import load_run_config as load_run_config
    from nas.search.space import Space as Space
    from nas.search.space import load_space as load_space
    from nas.study.run import run_search as run_search
    from nas.study.schema import request_stop as request_stop
    from nas.study.storage import load_existing_study as load_existing_study
    from nas.training.cross_validation import cross_validate as cross_validate

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
