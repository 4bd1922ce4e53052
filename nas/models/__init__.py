"""The networks: the normalization catalogue, conv / norm / activation blocks, the generated chain, BN folding.

norms         the normalization catalogue: one registry, name -> factory
batch_renorm  batch renormalization (clipped r / d)
blocks        conv / norm / activation blocks in every position
build         `build(spec, input_shape, num_classes)`: an ArchSpec -> nn.Module
families      timm / torchvision / factory networks: built by name, checked on the meta device
norm_swap     a foreign network's norms: found, grouped by stage, replaced by the catalogue's
stacking      k models of one spec as one (the CV folds trained together)
bn_fold       BatchNorm folded into the preceding conv for inference
costs         parameters, MACs and latency of a model
"""

from nas._lazy import public

__getattr__, __dir__, __all__ = public(
    __name__,
    {
        "build": ["Net", "count_parameters", "make_block"],  # `build` itself: nas.build.build
        "norms": ["NORMS", "POSITIONS", "make_norm"],
        "batch_renorm": ["BatchRenorm"],
        "bn_fold": ["fold_norms"],
        "stacking": ["stack"],
    },
)
