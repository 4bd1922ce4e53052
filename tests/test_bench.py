"""The inference harness: MACs match the formula, latency stats are sane, compare interleaves fairly."""

import math

import pytest
import torch
from torch import nn

from nas.deploy.bench import format_table, time_variants
from nas.models.build import build
from nas.models.costs import count_macs, count_params, eval_mode, measure_latency
from nas.search.space import default_spec

SHAPE = (3, 10, 10)


def conv_then_linear() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 10 * 10, 5))


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return build(default_spec({"stages": 2, "width": 4}), SHAPE, num_classes=5)


class CountingCall:
    """A variant that records each call in a shared log."""

    def __init__(self, name: str, log: list[str]):
        self.name, self.log = name, log

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.log.append(self.name)
        return x * 2


def test_macs_of_conv_and_linear_match_the_formula():
    # conv: every output element (8 channels x 10 x 10) sums 3 in-channels x 3 x 3 taps;
    # linear: 800 inputs x 5 outputs; biases add no multiply.
    expected = 8 * 10 * 10 * (3 * 3 * 3) + 800 * 5
    assert count_macs(conv_then_linear(), SHAPE) == expected


def test_params_count_weights_and_biases_including_frozen_ones():
    model = conv_then_linear()
    model[0].weight.requires_grad_(False)
    assert count_params(model) == (8 * 3 * 3 * 3 + 8) + (800 * 5 + 5)


@pytest.mark.parametrize("training", [True, False])
def test_macs_of_a_built_model_leave_its_mode_alone(training):
    model = small_net().train(training)
    model.features[0].train(not training)  # a mixed state comes back as it was, too
    before = [m.training for m in model.modules()]
    assert count_macs(model, SHAPE) > 0
    assert [m.training for m in model.modules()] == before


def test_macs_do_not_depend_on_the_mode_or_touch_bn_statistics():
    model = small_net().train()
    stats = [b.clone() for b in model.buffers()]
    assert count_macs(model, SHAPE) == count_macs(model.eval(), SHAPE)
    assert all(torch.equal(a, b) for a, b in zip(stats, model.buffers()))


def test_latency_is_positive_ordered_and_counts_every_call():
    log: list[str] = []
    fn = CountingCall("f", log)
    stats = measure_latency(fn, torch.randn(4, 3), torch.device("cpu"), warmup=3, repeats=7)
    assert len(log) == 3 + 7
    values = [stats[k] for k in ("median_ms", "p10_ms", "p90_ms", "throughput")]
    assert all(math.isfinite(v) and v > 0 for v in values)
    assert stats["p10_ms"] <= stats["median_ms"] <= stats["p90_ms"]
    assert stats["throughput"] == pytest.approx(4 / (stats["median_ms"] / 1e3))


def test_latency_keeps_timing_until_min_seconds():
    log: list[str] = []
    measure_latency(
        lambda x: log.append(x.sum().item()), torch.randn(256, 256), "cpu", warmup=0, repeats=1, min_seconds=0.02
    )
    assert len(log) > 1


def test_latency_runs_models_in_eval_mode_under_inference_mode_and_restores_train_mode():
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append((self.training, torch.is_inference_mode_enabled()))
            return x

    probe = Probe().train()
    measure_latency(probe, torch.randn(2, 3), "cpu", warmup=1, repeats=2)
    assert seen == [(False, True)] * 3
    assert probe.training


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_latency_runs_torchscript_and_torch_export_modules():
    model = small_net().eval()
    x = torch.randn(2, *SHAPE)
    scripted = torch.jit.script(model)
    exported = torch.export.export(model, (x,)).module()  # refuses .eval(): eval_mode must cope
    for fn in (scripted, exported):
        stats = measure_latency(fn, x, "cpu", warmup=1, repeats=2)
        assert stats["median_ms"] > 0


def test_compare_gives_one_row_per_variant_and_batch_with_baseline_ratio_one():
    log: list[str] = []
    variants = {name: CountingCall(name, log) for name in ("eager unfolded", "folded", "script")}
    rows = time_variants(variants, (3,), [1, 8], "cpu", warmup=2, repeats=5)
    assert [(r["variant"], r["batch_size"]) for r in rows] == [(v, b) for b in (1, 8) for v in variants]
    assert all(r["ratio_to_baseline"] == 1.0 for r in rows if r["variant"] == "eager unfolded")
    baseline = {r["batch_size"]: r["median_ms"] for r in rows if r["variant"] == "eager unfolded"}
    assert all(r["ratio_to_baseline"] == pytest.approx(r["median_ms"] / baseline[r["batch_size"]]) for r in rows)
    assert all(r["p10_ms"] <= r["median_ms"] <= r["p90_ms"] and r["throughput"] > 0 for r in rows)
    assert len(log) == 2 * 3 * (2 + 5)


def test_compare_interleaves_variants_round_robin():
    log: list[str] = []
    names = ("a", "b", "c")
    time_variants({n: CountingCall(n, log) for n in names}, (3,), [4], "cpu", warmup=2, repeats=6)
    # every call, warm-up included, goes a, b, c, a, b, c, ...: never two of one variant in a row
    assert log == list(names) * (2 + 6)


def test_compare_restores_each_module_mode():
    model = small_net().train()
    rows = time_variants({"eager": model, "doubled": lambda x: 2 * x}, SHAPE, [2], "cpu", warmup=1, repeats=2)
    assert len(rows) == 2 and model.training


def test_eval_mode_with_the_same_module_twice_restores_the_original_flags():
    model = small_net().train()
    with eval_mode(model), eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert all(m.training for m in model.modules())


def test_format_table_shows_every_variant_ratio_and_extra_line():
    rows = [
        {
            "variant": "eager unfolded",
            "batch_size": 1,
            "median_ms": 2.0,
            "p10_ms": 1.5,
            "p90_ms": 2.5,
            "spread": 2.5 / 1.5,
            "throughput": 500.0,
            "ratio_to_baseline": 1.0,
        },
        {
            "variant": "torch.export",
            "batch_size": 1,
            "median_ms": 1.0,
            "p10_ms": 0.9,
            "p90_ms": 1.2,
            "spread": 1.2 / 0.9,
            "throughput": 1000.0,
            "ratio_to_baseline": 0.5,
        },
    ]
    text = format_table(rows, extra={"params": "1,234", "MACs": "56,789"})
    lines = text.splitlines()
    assert lines[:2] == ["params: 1,234", "MACs: 56,789"]
    assert lines[2].split() == ["variant", "batch", "median", "ms", "p10-p90", "ms", "p90/p10", "samples/s", "ratio"]
    assert set(lines[3]) == {"-", " "}
    assert "eager unfolded" in lines[4] and lines[4].rstrip().endswith("1.00")
    assert "torch.export" in lines[5] and lines[5].rstrip().endswith("0.50")
    assert "1.500-2.500" in lines[4] and "1,000" in lines[5]
    assert "1.67 !" in lines[4] and "1.33 " in lines[5] and lines[-1].startswith("warning: 1 of 2 rows (marked !)")


@pytest.mark.parametrize("bad", [{"warmup": -1}, {"repeats": 0}])
def test_bad_counts_are_refused(bad):
    with pytest.raises(ValueError):
        measure_latency(lambda x: x, torch.zeros(1), "cpu", **bad)
