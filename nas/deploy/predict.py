"""`nas-predict`: classify raw inputs with an export folder, following its model.json.

Inputs are image files (PNG / JPEG, decoded as training decodes image folders), `.npy` /
`.npz` arrays of raw samples, or CSV rows with the training table's columns (found by header);
each goes through `nas.data.preprocessing`, the one implementation of the recipe in model.json.
The model file is checked against its sha256 before it is loaded.

The default runtime, `eager`, runs no code from the folder: bnnas builds the model from model.json's
`arch`, loads weights.pt as data (torch.load weights_only=True) and folds it as export did. `onnx`
is data to onnxruntime too; `ts` and `pt2` load TorchScript / torch.export files, which are code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nas.data.preprocessing import image_to_model_input, to_model_input
from nas.errors import DataError, NasError, VerificationError
from nas.options import CODE_RUNTIMES, RUNTIMES

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
BATCH = 256  # inputs per forward pass


@dataclass
class Prediction:
    input: str  # the file, with [i] for one sample of an array
    top: list[tuple[str, float]]  # (class name, probability), most probable first

    def to_dict(self) -> dict:
        return {
            "input": self.input,
            "class": self.top[0][0],
            "probability": self.top[0][1],
            "top": [{"class": name, "probability": p} for name, p in self.top],
        }

    def line(self) -> str:
        return f"{self.input}: " + ", ".join(f"{name} ({p:.3f})" for name, p in self.top)


def read_meta(folder: Path) -> dict:
    from nas.deploy.export import load_meta

    meta = load_meta(folder)
    if "preprocessing" not in meta:
        raise NasError(
            f"{folder / 'model.json'}: no preprocessing recipe (exported by an older bnnas; export it again)"
        )
    return meta


def load_model(folder: Path, meta: dict, runtime: str):
    """The verified model file of `runtime` as a callable on a float32 batch."""
    from nas.deploy.export import load_code_file, onnx_session, rebuild, verified_bytes

    if runtime == "eager":
        from nas.models.bn_fold import fold_norms

        return fold_norms(rebuild(folder, meta))
    if runtime in CODE_RUNTIMES:
        return load_code_file(folder, meta, RUNTIMES[runtime])
    path = folder / RUNTIMES[runtime]
    session = onnx_session(path, verified_bytes(folder, meta, path.name))
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def read_inputs(path: Path, pre: dict) -> list[tuple[str, torch.Tensor]]:
    """(name, model input batch) for one input file."""
    if not path.is_file():
        raise DataError(f"{path}: not found")
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return [(str(path), image_to_model_input(decode_image(path, pre), pre, str(path)))]
    if suffix == ".csv":
        return _csv_rows(path, pre)
    if suffix in (".npy", ".npz"):
        raw = read_array(path)
        x = to_model_input(raw, pre, str(path))
        single = list(raw.shape) == list(pre["raw_shape"])
        return [(str(path), x)] if single else [(f"{path}[{i}]", x[i : i + 1]) for i in range(len(x))]
    raise DataError(f"{path}: unknown input type '{suffix}' (give {', '.join(IMAGE_SUFFIXES)}, .npy, .npz or .csv)")


def _csv_rows(path: Path, pre: dict) -> list[tuple[str, torch.Tensor]]:
    """Each row of a CSV file with the training data's feature columns (any order; its target column, if there,
    ignored) as a model input, named by its line."""
    from nas.data.tabular import read_table

    if not pre.get("columns"):
        raise DataError(f"{path}: this model takes {pre['raw_input']}, not CSV rows; give .npy or .npz arrays")
    x, _, _ = read_table(path, pre.get("target"), "", pre["columns"], target_optional=True)
    batch = to_model_input(x, pre, str(path))
    return [(f"{path}[line {i + 2}]", batch[i : i + 1]) for i in range(len(batch))]


def decode_image(path: Path, pre: dict) -> torch.Tensor:
    """An image file as uint8 (C, H, W) in the model's colour, decoded as training decoded image folders
    (PIL, then torchvision's PILToTensor; torchvision.io's decoders are deprecated since 0.29).

    A model trained on an image folder saw every image converted to RGB, so its inputs are too;
    otherwise the file's channels must match the model's (an alpha channel is dropped, a palette
    expanded)."""
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms.v2 import functional as F

    files = pre["image_files"]
    if files is None:
        raise DataError(f"{path}: this model takes {pre['raw_input']}, not image files; give .npy or .npz arrays")
    try:
        with Image.open(path) as image:
            image = image.convert("RGB") if files["converted"] else _without_alpha(image)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot decode the image: {str(exc).splitlines()[0]}") from None
    if image.mode not in ("L", "RGB"):
        raise DataError(f"{path}: a {image.mode} image; the model takes 8-bit {files['color']} images")
    wanted = "L" if files["color"] == "grey" else "RGB"
    if image.mode != wanted:
        raise DataError(
            f"{path}: a {'grey' if image.mode == 'L' else 'colour'} image; the model takes {files['color']} images"
        )
    return F.pil_to_tensor(image)


def _without_alpha(image):
    """The image's own colour without transparency: LA -> L, RGBA / palette -> RGB (loaded, so the file can close)."""
    if image.mode == "P":
        image = image.convert("RGBA")
    return {"LA": lambda: image.convert("L"), "RGBA": lambda: image.convert("RGB")}.get(
        image.mode, lambda: image.copy()
    )()


def read_array(path: Path) -> np.ndarray:
    """A .npy array, or the array of a .npz (its `x`, or its only array)."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return loaded
        with loaded:
            keys = list(loaded.keys())
            if "x" in keys or len(keys) == 1:
                return loaded["x" if "x" in keys else keys[0]]
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable NumPy file: {str(exc).splitlines()[0]}") from None
    raise DataError(f"{path}: holds the arrays {', '.join(keys) or 'none'}; name the samples 'x' (or keep one array)")


def predict(
    folder: str | Path, inputs: list[str], runtime: str = "eager", top: int = 1
) -> tuple[list[Prediction], dict]:
    """Classify every input; returns the predictions (in input order) and model.json."""
    folder = Path(folder)
    meta = read_meta(folder)
    pre = meta["preprocessing"]
    batches = [item for path in inputs for item in read_inputs(Path(path), pre)]  # every input checked before any runs
    model = load_model(folder, meta, runtime)
    names = [name for name, _ in batches]
    x = torch.cat([batch for _, batch in batches]) if batches else torch.empty(0, *pre["input_shape"])
    size = meta.get("batch_dependent", {}).get("scored_batch_size", BATCH)
    with torch.no_grad():
        logits = (
            torch.cat([model(x[i : i + size]) for i in range(0, len(x), size)])
            if len(x)
            else torch.empty(0, len(pre["classes"]))
        )
    if not torch.isfinite(logits).all():
        raise VerificationError(f"{folder}: the model gave non-finite outputs")
    probabilities = logits.softmax(1)
    k = min(top, probabilities.shape[1])
    values, indices = probabilities.topk(k, dim=1)
    classes = pre["classes"]
    predictions = [
        Prediction(name, [(classes[j], float(p)) for p, j in zip(v.tolist(), i.tolist())])
        for name, v, i in zip(names, values, indices)
    ]
    return predictions, meta


def format_predictions(predictions: list[Prediction], as_json: bool) -> str:
    if as_json:
        return json.dumps([p.to_dict() for p in predictions], indent=2)
    return "\n".join(p.line() for p in predictions)
