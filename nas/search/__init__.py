"""What is searched: the search space, the ArchSpec it samples, the run config, samplers and pruners.

space     the search-space tree and `Space.sample(trial) -> ArchSpec`
leaves    a leaf (constant or distribution): checked, asked of a trial; one norm decision
model_space  the `model` entry: a timm / torchvision / factory network whose norms are searched
model_check  before any trial: a foreign model builds and takes the data's shape
finetune_space  a checkpoint fine-tuned as a search: `model.weights` and the `finetune` strategy
archspec  reading an ArchSpec: norm, position, layout
config    the run config: load, validate, override (`RunConfig`)
samplers  samplers by name, and the seed each search process gives its sampler
pruners   pruners by name, and when a pruner can save nothing
stand_in_trials  trials that answer suggest_* themselves: a space walked without a study
"""

from nas._lazy import public

__getattr__, __dir__, __all__ = public(
    __name__,
    {
        "space": ["Space", "load_space", "default_spec"],
        "archspec": ["describe_norms", "norm_group"],
        "finetune_space": ["describe_strategy"],
        "config": ["RunConfig", "DatasetConfig", "load_run_config"],
        "samplers": ["SAMPLER_NAMES", "make_sampler"],
        "pruners": ["PRUNER_NAMES"],
    },
)
