"""What a model costs at inference: parameters, multiply-accumulates and latency.

MACs come from PyTorch's own `FlopCounterMode` (convolutions, linear layers, matmuls); norms,
activations and pooling are memory-bound, add no MACs, and show up only in the latency.
CPU latency depends on how many threads run it and on what else the machine does: the thread
count is pinned (`pinned_threads`), and a spread (p90 / p10) above `SPREAD_LIMIT` means the
machine was busy. A multi-objective search measures each candidate here; nas-bench times an
export's variants side by side with the same clock (`nas.deploy.bench`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from nas.options import DEFAULT_THREADS

Variant = Callable[[torch.Tensor], object]


@contextmanager
def pinned_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op CPU threads set to `threads` (None: left as they are), then given back."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def count_params(model: nn.Module) -> int:
    """Every parameter, trainable or not (at inference the flag means nothing); shared ones once."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass of one sample of `input_shape` (no batch axis).

    The count follows from tensor shapes alone, so the pass runs wherever the model's
    parameters are (CPU for a fresh model) rather than moving the caller's model.
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.zeros(1, *input_shape, device=device, dtype=dtype)
    counter = FlopCounterMode(display=False)
    with eval_mode(model), torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops() // 2  # one multiply-accumulate = two flops


@contextmanager
def eval_mode(model: object) -> Iterator[None]:
    """Run `model` in eval mode, then give every submodule back its own train/eval flag.

    Flags are set per submodule instead of calling `.eval()`: torch.export's modules refuse
    `.eval()` (their graph is fixed at export anyway), and restoring one flag per submodule
    keeps a mixed state (say, a frozen BN inside a training model) exactly as it was.
    Plain callables pass through untouched.
    """
    if not isinstance(model, nn.Module):
        yield
        return
    flags = [(m, m.training) for m in model.modules() if hasattr(m, "training")]
    for m, _ in flags:
        m.training = False
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_call(fn: Variant, x: torch.Tensor, sync: Callable[[], None]) -> float:
    """Seconds for one call, end to end.

    Wall clock between two synchronizations rather than CUDA events: events time only the
    GPU stream and miss the host-side Python and launch overhead before the first kernel,
    which is exactly what folding, TorchScript and torch.export change on small models.
    """
    sync()
    start = time.perf_counter()
    fn(x)
    sync()
    return time.perf_counter() - start


def latency_summary(seconds: list[float], batch_size: int) -> dict:
    ms = np.asarray(seconds) * 1e3
    p10, median, p90 = np.percentile(ms, [10, 50, 90])
    return {
        "median_ms": float(median),
        "p10_ms": float(p10),
        "p90_ms": float(p90),
        "spread": float(p90 / p10),
        "throughput": batch_size / (float(median) / 1e3),
    }


def check_counts(warmup: int, repeats: int) -> None:
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")


def measure_latency(
    model: Variant,
    example: torch.Tensor,
    device: torch.device | str,
    warmup: int = 10,
    repeats: int = 50,
    min_seconds: float = 0.0,
) -> dict:
    """Milliseconds per call of `model(example)`: median, p10, p90, and samples per second.

    `model` is an nn.Module (eager, TorchScript, or a torch.export `.module()`) or any callable
    of one tensor; modules run in eval mode and get their flags back afterwards. `example`
    must already be on `device`; its first axis is the batch. Warm-up calls are not timed;
    each of the `repeats` timed calls is one call, and timing goes on past `repeats` until
    the timed calls add up to `min_seconds`.
    """
    check_counts(warmup, repeats)
    sync = synchronizer(torch.device(device))
    seconds: list[float] = []
    with eval_mode(model), torch.inference_mode():
        for _ in range(warmup):
            model(example)
        while len(seconds) < repeats or sum(seconds) < min_seconds:
            seconds.append(time_call(model, example, sync))
    return latency_summary(seconds, example.shape[0] if example.dim() else 1)


def candidate_costs(
    spec: dict,
    input_shape: tuple[int, ...],
    num_classes: int,
    device: torch.device,
    batch_size: int,
    wanted: list[str],
    threads: int = DEFAULT_THREADS,
) -> dict:
    """The inference costs a multi-objective search asks for, of the candidate as it would deploy:
    folded, eval mode, on `device`, at a fixed batch size (weights do not change the cost), with
    `threads` CPU threads as nas-bench uses by default (the training's thread count would make
    the latency depend on the machine and on other workers)."""
    from nas.models.bn_fold import fold_norms
    from nas.models.build import build

    model = fold_norms(build(spec, input_shape, num_classes)).to(device)
    costs = {}
    if "params" in wanted:
        costs["params"] = count_params(model)
    if "macs" in wanted:
        costs["macs"] = count_macs(model, input_shape)
    if "latency_ms" in wanted:
        costs["latency_ms"] = median_latency_ms(model, input_shape, device, batch_size, threads)
    return costs


def median_latency_ms(
    model: nn.Module, input_shape: tuple[int, ...], device: torch.device, batch_size: int, threads: int
) -> float:
    """The median ms of `model` (as it deploys: folded, eval mode) on random inputs of `batch_size`, with `threads`
    CPU threads pinned on the CPU: the latency_ms objective and nas-slim's latency target."""
    example = torch.randn(batch_size, *input_shape, device=device)
    with pinned_threads(threads if device.type == "cpu" else None):
        return measure_latency(model, example, device, warmup=5, repeats=20)["median_ms"]
