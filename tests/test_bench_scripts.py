"""The benchmarks under scripts/ run end to end and print what their docs promise (not how fast)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


HANG_GUARD = 1800  # seconds: beside a CPU hog, bench_workers --ray took over 600


def run_script(name: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / name), *args],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.slow
def test_bench_cv_times_both_fold_modes_of_one_candidate_and_judges_the_cpu_target():
    out = run_script("bench_cv.py", "--device", "cpu", "--epochs", "1", "--repeats", "2")
    assert "candidate: 2x1 w32 k3 batch@post_conv maxpool b64" in out
    wall = re.search(r"^\s+wall\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)x$", out, re.M)
    sequential, together, ratio = map(float, wall.groups())
    assert ratio == pytest.approx(sequential / together, abs=0.01)
    assert re.search(r"speed-up of each repeat's pair: min [\d.]+x, median [\d.]+x, max [\d.]+x", out)
    assert re.search(r"target: together >= 1.4x faster on cpu: (met|NOT met) \([\d.]+x\)", out)


@pytest.mark.slow
def test_bench_cv_samples_candidates_from_a_search_space_and_sums_them():
    out = run_script(
        "bench_cv.py", "--device", "cpu", "--sample", "2", "--epochs", "1", "--repeats", "1", "--every-epoch"
    )
    assert "validating every epoch" in out
    rows = re.findall(r"^  (\S.*?)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)x$", out, re.M)
    assert [re.match(r"\dx\d w\d+ k\d ", name) is not None for name, *_ in rows] == [True, True, False]
    assert rows[-1][0] == "all candidates (sum of medians)"
    for column in (1, 2):
        assert float(rows[-1][column]) == pytest.approx(sum(float(r[column]) for r in rows[:2]), abs=0.002)


@pytest.mark.slow
def test_bench_cv_times_one_training_step_of_the_folds_alone():
    out = run_script("bench_cv.py", "--device", "cpu", "--step", "3", "--threads", "1")
    assert "1 CPU threads" in out and "timed: one training step" in out
    step = re.search(r"one by one ([\d.]+) ms, stacked ([\d.]+) ms, ([\d.]+)x$", out, re.M)
    alone, stacked, ratio = map(float, step.groups())
    assert ratio == pytest.approx(alone / stacked, abs=0.01)


@pytest.mark.slow
@pytest.mark.parametrize("launcher, repeats", [([], 2), (["--ray"], 1)], ids=["workers", "ray"])
def test_bench_workers_prints_the_median_trials_per_hour_for_each_worker_count(launcher, repeats):
    if launcher:
        pytest.importorskip("ray")
    out = run_script(
        "bench_workers.py",
        *launcher,
        "--device",
        "cpu",
        "--trials",
        "2",
        "--workers",
        "1,2",
        "--epochs",
        "1",
        "--folds",
        "2",
        "--repeats",
        str(repeats),
    )
    assert ("Ray workers" in out) == bool(launcher) and f"{repeats} interleaved runs per count" in out
    rows = re.findall(r"^\s+(\d+)\s+([\d.]+)\s+\(([\d.]+)-([\d.]+)\)\s+(\d+)\s+([\d.]+)x$", out, re.M)
    assert [r[0] for r in rows] == ["1", "2"]
    for _, median, low, high, rate, _ in rows:
        assert float(low) <= float(median) <= float(high) and int(rate) == pytest.approx(
            2 / float(median) * 3600, rel=0.03
        )  # both printed rounded
    assert rows[0][5] == "1.00"


@pytest.mark.slow
def test_load_dashboard_serves_a_crowd_beside_held_and_slow_connections_and_prints_its_table():
    out = run_script(
        "load_dashboard.py",
        "--clients",
        "4",
        "--requests",
        "2",
        "--held",
        "6",
        "--slow",
        "2",
        "--studies",
        "1",
        "--trials",
        "3",
        "--idle-timeout",
        "2",
        "--slow-interval",
        "0.02",
    )
    rows = re.findall(r"^\| (4 clients x 2(?: while held)?) \| (\d+)/(\d+) \| (\w+) \| (\d+) \| (\d+) \|", out, re.M)
    assert [r[0] for r in rows] == ["4 clients x 2", "4 clients x 2 while held"]
    assert all(r[1] == r[2] == "8" and r[3] == "none" and int(r[4]) <= int(r[5]) for r in rows)
    assert "6 silent: 6 closed by the server" in out
    answered, failed = map(
        int, re.search(r"2 slow senders \(a byte every 0.02 s\): (\d+) requests answered, (\d+) failed", out).groups()
    )
    assert answered >= 2 and failed == 0


@pytest.mark.slow
def test_bench_search_rows_agree_with_each_other_and_with_the_studies(tmp_path):
    import json

    from conftest import write_digits_run

    space = {"stages": 1, "width": 8, "training": {"lr": {"float": [0.01, 0.1], "log": True}}}
    config = write_digits_run(
        tmp_path, space, f"sqlite:///{tmp_path}/unused.db", {"name": "b"}, {"folds": 2, "epochs": 2}
    )
    out = run_script(
        "bench_search.py",
        "--config",
        str(config),
        "--budget-seconds",
        "40",
        "--seeds",
        "1",
        "--strategies",
        "random,tpe+hyperband",
        "--baseline",
        "--export",
        "--out",
        str(tmp_path / "out"),
    )
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["strategy"] for r in results["runs"]] == ["random", "tpe+hyperband"]
    for run in results["runs"]:
        curve = run["curve"]
        assert curve and all(
            a[0] <= b[0] and a[1] > b[1] for a, b in zip(curve, curve[1:])
        )  # improvements only, in time
        assert all(t <= 40 for t, _, _ in curve)  # nothing after the budget counts
        best = run["best"]
        assert best["1"] == curve[-1][1] == run["best_trial"]["cv_loss"] and run["best_trial"]["number"] == curve[-1][2]
        known = [best[f] for f in ("0.25", "0.5", "1") if best[f] is not None]
        assert known == sorted(known, reverse=True)  # best-so-far never rises
        assert 0 <= run["pruned"] < run["trials"] and 0 < run["best_trial"]["test_accuracy"] <= 1
    assert results["baseline"][0]["cv_loss"] > 0
    table = (tmp_path / "out" / "table.md").read_text()
    assert (
        table.count("\n| ") == 4
        and "| baseline: hand-designed 2-stage CNN + BatchNorm" in table
        and table in out + "\n"
    )
    assert (tmp_path / "out" / "curves.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_bench_search_ranks_strategies_across_its_written_tasks_with_random_at_twice_the_budget(tmp_path):
    import json

    out = run_script(
        "bench_search.py",
        "--tasks",
        "signals,images",
        "--budget-seconds",
        "15",
        "--seeds",
        "1",
        "--epochs",
        "1",
        "--strategies",
        "tpe/2+hyperband,random@2x",
        "--out",
        str(tmp_path / "out"),
    )
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    runs = {(r["task"], r["strategy"]): r for r in results["runs"]}
    assert set(runs) == {(t, s) for t in ("signals", "images") for s in ("tpe/2+hyperband", "random@2x")}
    assert all(
        runs[t, "random@2x"]["budget_seconds"] == 30 and runs[t, "tpe/2+hyperband"]["budget_seconds"] == 15
        for t in ("signals", "images")
    )
    # no wall-time assertion: under a loaded test run, loading may take a short budget before any trial starts
    rank_rows = re.findall(r"^\| (tpe/2\+hyperband|random@2x) \| ([12]) \| ([12]) \| ([\d.]+) \|$", out, re.M)
    assert sorted(r[0] for r in rank_rows) == ["random@2x", "tpe/2+hyperband"]  # one rank row each, both tasks ranked
    for _, *task_ranks, median in rank_rows:
        assert float(median) == sum(map(int, task_ranks)) / 2  # the median of two ranks
    assert "**signals**" in out and "**images**" in out and (tmp_path / "out" / "curves.png").exists()


@pytest.mark.slow
def test_bench_data_times_first_and_cached_loads_against_image_folder_and_judges_the_target():
    out = run_script("bench_data.py", "--images", "200", "--size", "16", "--repeats", "1")
    medians = dict(
        re.findall(
            r"^  (first load \(decode \+ cache\)|cached load|ImageFolder \+ DataLoader\(2\), one epoch)\s+([\d.]+) s",
            out,
            re.M,
        )
    )
    assert len(medians) == 3
    speedup = float(re.search(r"cached load: ([\d.]+)x faster than the first decode", out).group(1))
    assert speedup == pytest.approx(
        float(medians["first load (decode + cache)"]) / float(medians["cached load"]), rel=0.15
    )  # printed medians are rounded
    assert "bytes per sample in memory: 768 as uint8, 3,072 as float32" in out
    assert re.search(r"target: cached load >= 10x faster than a first decode: (met|NOT met)", out)
    epochs = dict(
        re.findall(
            r"^  (float32 in memory \(before\)|uint8 in memory|uint8 streamed from the cache|"
            r"ImageFolder \+ DataLoader\(2\))\s+([\d.]+) s",
            out,
            re.M,
        )
    )
    assert len(epochs) == 4 and "one training epoch of 180 images" in out
    stream = float(re.search(r"streamed / in-memory uint8 ([\d.]+)x", out).group(1))
    assert stream == pytest.approx(
        float(epochs["uint8 streamed from the cache"]) / float(epochs["uint8 in memory"]), rel=0.1, abs=0.02
    )
    assert re.search(r"target: streamed epoch within 1.3x of in-memory: (met|NOT met)", out)
    assert re.search(r"target: uint8 epoch no slower than float32: (met|NOT met)", out)


@pytest.mark.slow
def test_bench_fingerprint_times_both_versions_interleaved_and_prints_their_ratio():
    out = run_script("bench_fingerprint.py", "--repeats", "2", "--train", "500")
    medians = {
        int(v): float(m)
        for v, m in re.findall(
            r"^fingerprint version (\d): median ([\d.]+) s \(range [\d.]+-[\d.]+, "
            r"2 runs\)$",
            out,
            re.M,
        )
    }
    assert set(medians) == {1, 2}
    assert re.search(r"^version 2 / version 1: [\d.]+x$", out, re.M)


@pytest.mark.slow
def test_bench_foreign_times_our_loop_and_a_plain_loop_over_the_same_timm_model():
    pytest.importorskip("timm")
    out = run_script("bench_foreign.py", "--device", "cpu", "--model", "test_resnet", "--epochs", "1", "--repeats", "2")
    assert "timm test_resnet (norm batch) on digits" in out and "2 interleaved runs each" in out
    rows = dict(re.findall(r"^  (bnnas|plain)\s+([\d.]+)\s+\([\d.]+-[\d.]+\)\s+\d+$", out, re.M))
    assert set(rows) == {"bnnas", "plain"}
    ratio = float(re.search(r"plain / bnnas: ([\d.]+)", out).group(1))
    assert ratio == pytest.approx(float(rows["plain"]) / float(rows["bnnas"]), abs=0.005)  # printed rounded
    assert re.search(r"target: bnnas within 5% of plain \(>= 0.95\): (met|NOT met)$", out, re.M)


@pytest.mark.slow
def test_bench_mlp_times_a_hand_written_loop_our_loop_and_the_folds_together_over_the_same_mlp():
    out = run_script("bench_mlp.py", "--epochs", "1", "--repeats", "3", "--folds", "3", "--width", "32")
    assert "breast_cancer: 455 training samples, 3 folds x 1 epochs, MLP 3 x 32" in out and "3 interleaved" in out
    rows = {
        name: float(median)
        for name, median in re.findall(
            r"^  (hand-written|sequential|together)\s+([\d.]+)\s+[\d.]+-[\d.]+\s+\d+$", out, re.M
        )
    }
    assert set(rows) == {"hand-written", "sequential", "together"}
    ratio = float(re.search(r"sequential / hand-written time: ([\d.]+)", out).group(1))
    assert ratio == pytest.approx(rows["sequential"] / rows["hand-written"], abs=0.005)
    assert re.search(r"target <= 1.05: (met|NOT met)$", out, re.M)
    assert re.search(r"together speed-up over sequential: [\d.]+x .*target > 1: (met|NOT met)$", out, re.M)
