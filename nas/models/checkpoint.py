"""A pretrained checkpoint as nas-finetune's source (`timm:NAME`, `torchvision:NAME` or `factory:pkg.mod:fn`, with a
local weights file: no hub download, users bring the file), and as the start of every fold of a fine-tuning search
(`model.weights`, pinned by its sha256: `load_pinned`).

The file is read as data only: safetensors, or `torch.load(weights_only=True)`, which refuses pickled code. The
weights load as timm loads pretrained ones: the wrapping of a training checkpoint removed (`state_dict_ema`,
`model_ema`, `state_dict`, `model`; a `module.` prefix), the first conv adapted to the target's channel count
(timm's `adapt_input_conv`), the classifier left to a new head when the target's classes differ, every other key
matched by name and shape. Keys that do not match are listed in one line and refused unless `--strict false`
(`model.strict: false` in a search space).

What the checkpoint expects of its input (mean, std, input size) comes from `--mean/--std/--input-size`, else timm's
`pretrained_cfg` or the torchvision weights' transforms; a factory checkpoint without them is normalized with the
target's own statistics (said when it runs).
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from nas.errors import NasError

REFERENCE = re.compile(r"^(timm|torchvision|factory):(.+)$")
WRAPPERS = ("state_dict_ema", "model_ema", "state_dict", "model")  # timm's order: EMA weights first
LISTED = 4  # keys named per kind in a mismatch line


def model_reference(text: str) -> dict | None:
    """`timm:NAME` as a model entry ({"family": "timm", "name": NAME}); None for anything else (an export folder)."""
    found = REFERENCE.match(text)
    return {"family": found[1], "name": found[2]} if found else None


def check_reference(model: dict) -> None:
    """An unknown timm / torchvision name (with did-you-mean) or a factory that does not import: one line."""
    from nas.models.families import ModelError, known_names, load_factory
    from nas.validation import did_you_mean

    family, name = model["family"], model["name"]
    try:
        if family == "factory":
            load_factory(name)
        elif name not in set(known_names(family)):
            raise NasError(f"--model: unknown {family} model '{name}'{did_you_mean(name, known_names(family))}")
    except ModelError as exc:
        raise NasError(f"--model: {exc}") from None


@dataclass(frozen=True)
class Expected:
    """What a checkpoint expects of its input; None where nothing says."""

    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    input_size: int | None
    source: str  # where the values come from, in words

    def normalization(self, channels: int) -> dict | None:
        """Mean and std for data of `channels` channels: an RGB checkpoint's averaged for grey data, whose first
        conv is summed over its input channels (timm's adapt_input_conv)."""
        if self.mean is None:
            return None
        mean, std = list(self.mean), list(self.std)
        if channels != len(mean):
            if len(mean) != 3 or channels != 1:
                raise NasError(
                    f"--mean/--std: {len(mean)} values ({self.source}) for data with {channels} channels; give "
                    f"{channels} values"
                )
            mean, std = [sum(mean) / 3], [sum(std) / 3]
        return {"mean": mean, "std": std}


def expected_input(model: dict, mean=None, std=None, input_size: int | None = None) -> Expected:
    """The checkpoint's input expectations: the flags first, then what its library says about the architecture."""
    if (mean is None) != (std is None):
        raise NasError("--mean and --std: give both or neither")
    said = {"mean": mean, "std": std, "input_size": input_size}
    library, source = _library_expectations(model), "--mean/--std" if mean is not None else None
    merged = {key: said[key] if said[key] is not None else library.get(key) for key in said}
    source = source or (library.get("source") if library.get("mean") is not None else "the target's own statistics")
    return Expected(
        tuple(merged["mean"]) if merged["mean"] is not None else None,
        tuple(merged["std"]) if merged["std"] is not None else None,
        merged["input_size"],
        source,
    )


def _library_expectations(model: dict) -> dict:
    if model["family"] == "timm":
        from nas.models.families import _timm

        cfg = _timm().models.get_pretrained_cfg(model["name"])
        if cfg is None:
            return {}
        return {"mean": cfg.mean, "std": cfg.std, "input_size": cfg.input_size[-1], "source": "timm pretrained_cfg"}
    if model["family"] == "torchvision":
        import torchvision

        try:
            weights = torchvision.models.get_model_weights(model["name"]).DEFAULT
        except (ValueError, KeyError, AttributeError):
            return {}
        transforms = weights.transforms()  # metadata only: nothing is downloaded
        size = getattr(transforms, "crop_size", None)
        return {
            "mean": transforms.mean,
            "std": transforms.std,
            "input_size": size[0] if size else None,
            "source": f"torchvision {weights}",
        }
    return {}


def read_checkpoint(path: str | Path, where: str = "--weights") -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of a weights file, unwrapped from a training checkpoint, and the file's sha256, from one read of
    it; one line naming `where` and the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise NasError(f"{where}: {path}: not found")
    content = path.read_bytes()
    digest = hashlib.sha256(content).hexdigest()
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load

        try:
            found = load(content)
        except (SafetensorError, OSError, ValueError) as exc:
            raise NasError(f"{where}: {path}: not a readable .safetensors file ({_first_line(exc)})") from None
    else:
        found = _torch_load(path, content, where)
    if isinstance(found, dict):
        for key in WRAPPERS:
            if isinstance(found.get(key), dict):
                found = found[key]
                break
    if not isinstance(found, dict) or not found or not all(isinstance(v, torch.Tensor) for v in found.values()):
        raise NasError(f"{where}: {path}: not a state dict (a mapping of parameter names to tensors)")
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in found.items()}, digest


def _torch_load(path: Path, content: bytes, where: str):
    import io
    import pickle

    try:
        return torch.load(io.BytesIO(content), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        unsupported = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        if unsupported:  # a pickled class or function: code that would run on loading
            raise NasError(
                f"{where}: {path}: holds pickled objects other than tensors ({unsupported[1]}); refused: only "
                "torch.load(weights_only=True) is used"
            ) from None
        operand = re.search(r"Unsupported operand \d+|invalid load key[^\n]*", str(exc))
        raise NasError(
            f"{where}: {path}: not a PyTorch checkpoint ({operand[0] if operand else _first_line(exc)})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise NasError(f"{where}: {path}: not a PyTorch checkpoint, or truncated ({_first_line(exc)})") from None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@dataclass
class Loaded:
    """How a checkpoint went into the model: what matched, what was adapted, what did not match."""

    file: str
    sha256: str
    loaded: int  # tensors taken from the checkpoint
    head_replaced: bool
    adapted: str | None  # the first conv adapted to the target's channels
    missing: list[str] = field(default_factory=list)  # in the model, not in the checkpoint
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, not in the model
    shape: list[str] = field(default_factory=list)  # in both, of other shapes

    def mismatch(self) -> str | None:
        """The keys that did not match, in one line; None when everything did."""
        parts = [
            f"{len(keys)} {kind} ({', '.join(keys[:LISTED])}{', ...' if len(keys) > LISTED else ''})"
            for kind, keys in (
                ("missing", self.missing),
                ("unexpected", self.unexpected),
                ("of another shape", self.shape),
            )
            if keys
        ]
        return "; ".join(parts) or None


def load_checkpoint(
    model: nn.Module,
    path: str | Path,
    state: dict,
    strict: bool = True,
    *,
    sha256: str | None = None,
    where: str = "--weights",
    relax: str = "--strict false",
) -> Loaded:
    """Load `state` (`read_checkpoint(path)`, whose `sha256` it is) into `model` (built for the target) as timm
    loads pretrained weights; `strict`: refuse any key that does not match, in one line naming `where` and how to
    `relax` it, before anything is loaded."""
    from nas.models.families import head_name

    state = dict(state)
    own = model.state_dict()
    head = head_name(model)
    head_keys = [f"{head}.{name}" for name, _ in model.get_submodule(head).named_parameters()]
    head_replaced = any(k in state and state[k].shape != own[k].shape for k in head_keys)
    if head_replaced:  # the target's classes: a new head, as timm resets its classifier
        state = {k: v for k, v in state.items() if k not in head_keys}
    adapted = _adapt_first_conv(model, state, where)
    missing = [k for k in own if k not in state and not (head_replaced and k in head_keys)]
    unexpected = [k for k in state if k not in own]
    shape = [
        f"{k} {list(state[k].shape)} vs {list(own[k].shape)}"
        for k in state
        if k in own and state[k].shape != own[k].shape
    ]
    loaded = Loaded(
        str(path),
        sha256 or hashlib.sha256(Path(path).read_bytes()).hexdigest(),
        0,
        head_replaced,
        adapted,
        missing,
        unexpected,
        shape,
    )
    problem = loaded.mismatch()
    if problem and strict:
        raise NasError(f"{where}: {path} does not fit {type(model).__name__}: {problem}; {relax} loads what matches")
    matching = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(matching, strict=False)
    loaded.loaded = len(matching)
    return loaded


def _adapt_first_conv(model: nn.Module, state: dict, where: str) -> str | None:
    """The first conv's checkpoint weight adapted to the model's input channels (timm's adapt_input_conv); its name."""
    first = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    if first is None or f"{first[0]}.weight" not in state:
        return None
    name, conv = first
    weight = state[f"{name}.weight"]
    if (
        conv.groups != 1
        or weight.dim() != 4
        or weight.shape[1] == conv.in_channels
        or weight.shape[0] != conv.out_channels
    ):
        return None
    try:
        from timm.models import adapt_input_conv
    except ImportError:
        raise NasError(
            f"{where}: {name} takes {weight.shape[1]} channels, the data has {conv.in_channels}: adapting it needs "
            "timm (pip install 'bnnas[timm]')"
        ) from None
    state[f"{name}.weight"] = adapt_input_conv(conv.in_channels, weight)
    return name


@functools.lru_cache(maxsize=1)
def _pinned_state(file: str, sha256: str, where: str) -> dict[str, torch.Tensor]:
    """A search's checkpoint, read once per process (every fold of every trial starts from it) and refused when the
    file is no longer the one the study pinned."""
    state, found = read_checkpoint(file, where)
    if found != sha256:
        raise NasError(
            f"{where}: {file} has changed since the study pinned it (sha256 {found[:12]}..., pinned {sha256[:12]}...)"
        )
    return state


def load_pinned(model: nn.Module, weights: dict, where: str = "model.weights") -> Loaded:
    """Load an ArchSpec's `model.weights` entry ({file, sha256, strict}) into `model`, built for the target."""
    state = _pinned_state(weights["file"], weights["sha256"], where)
    relax = "model.strict: false"
    return load_checkpoint(
        model, weights["file"], state, weights.get("strict", True), sha256=weights["sha256"], where=where, relax=relax
    )
