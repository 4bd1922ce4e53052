"""Datasets as tensors on the device, their fingerprint, transforms and the preprocessing recipe an export carries.

datasets       the dataset loaders (`LOADERS`), tensors on the device, fingerprint, stratified k-fold splits
image_cache    decoded image folders cached as arrays
samples        how training samples are held: compact uint8 or streamed from disk
transforms     dataset shifts (`dataset.transforms`)
preprocessing  the raw-input recipe stored in model.json
"""

from nas._lazy import public

__getattr__, __dir__, __all__ = public(
    __name__,
    {
        "datasets": ["Dataset", "Arrays", "RawInput", "LOADERS", "load_dataset", "stratified_folds", "content_sha256"],
        "image_cache": ["load_image_folder"],
    },
)
