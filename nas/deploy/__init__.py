"""After the search: export with BN folded, predict from raw input, inference cost, slimming, fine-tuning with a BN
strategy.

export    nas-export and loading an export folder
predict   nas-predict
bench     nas-bench: what BN costs at inference
slim      nas-slim: channels removed by BatchNorm scale, fine-tuned, exported again
finetune  nas-finetune: adapt an export, or a pretrained checkpoint, to new data with a BN mode
checkpoint  a timm / torchvision / factory checkpoint file as nas-finetune's source
"""

from nas._lazy import public

__getattr__, __dir__, __all__ = public(
    __name__,
    {
        "export": ["export_trial", "load_exported"],
        "finetune": ["adapt"],  # the function `finetune` shares its module's name: nas.deploy.finetune.finetune
        "bench": ["bench_export"],
        "slim": ["time_side_by_side"],  # `slim` shares its module's name: nas.deploy.slim.slim
    },
)
