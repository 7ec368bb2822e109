"""The benchmark suite runs and reports: `python -m benchmarks --quick`.

These tests check that every benchmark runs and prints its results, and that
the results table is written where asked; they do not check how fast
anything is (that is what the figures in benchmarks/RESULTS.md are for).
"""

import json
import os
import pathlib
import statistics
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

# benchmark module -> results its quick run must print (it may print more).
EXPECTED = {
    "train_throughput": {"train_vgg16"},
    "bfloat16": {"train_vgg16_bf16_vs_keras_f32", "train_vgg16_bf16_vs_f32", "train_lstm_2x32_bf16_vs_f32",
                 "train_gru_2x32_bf16_vs_f32", "serve_lenet5_b1_bf16_vs_f32", "serve_lenet5_b4_bf16_vs_f32"},
    "input_pipeline": {"pipeline_64_first_epoch", "pipeline_64_steady", "decode_64"},
    "lm_speed": {"generate_stateful_vs_prefix", "generate_export_vs_stateful", "train_lstm_2x32", "train_gru_2x32"},
    "lstm_tuning": {"lstm_2x32_unroll_seq10", "lstm_2x32_batch32", "lstm_2x32_steps_per_execution4"},
    "serving_latency": {"serving_lenet5_b1", "serving_lenet5_b4", "predict_files_lenet5_b1", "predict_files_lenet5_b4",
                        "serving_lm_generate_2x32"},
    "serving_http": {"http_lenet5_c1", "http_lenet5_c8"},
    # One row per app: a new app in apps/cli.py SUBCOMMANDS is measured without listing it here.
    "caption_speed": {"caption_cached_features_vs_encoder", "caption_beam3_vs_greedy"},
    "startup": {"startup_help", "startup_classify_help", "startup_lm_help", "startup_models_help"},
    "memory": {"memory_lenet5_b8"},
    "checkpoint_cost": {"checkpoint_cost_lenet5", "checkpoint_cost_lstm_1x32"},
    "data_scale": {f"data_scale_{size}_{figure}_{run}" for size in ("100", "500")
                   for figure in ("first_batch", "images_per_s", "peak_memory") for run in ("run1", "run2")},
}
# PyTorch is the reference of these rows where it is installed (`pip install -e ".[bench]"`).
TORCH_ROWS = {
    "lm_speed": {"generate_stateful_vs_torch", "generate_export_vs_torch", "train_lstm_2x32_vs_torch",
                 "train_gru_2x32_vs_torch"},
    "bfloat16": {"train_vgg16_bf16_vs_torch", "train_lstm_2x32_bf16_vs_torch_autocast",
                 "train_gru_2x32_bf16_vs_torch_autocast"},
}
KEYS = {
    "name", "benchmark", "mode", "ours", "reference", "ratio", "unit", "ours_samples",
    "reference_samples", "config", "versions", "cores", "cpu", "command", "date",
}


def _benchmarks(*args, timeout):
    # The benchmarks pick their own threads, as on a user's machine, not the pytest worker's share.
    env = {key: value for key, value in os.environ.items() if key != "TF_NUM_INTRAOP_THREADS"}
    return subprocess.run(
        [sys.executable, "-m", "benchmarks", *args], cwd=ROOT, capture_output=True, text=True,
        timeout=timeout, env=env,
    )


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    results = tmp_path_factory.mktemp("benchmarks") / "RESULTS.md"
    # About 1.5 minutes alone on 2 cores; the limit leaves room for a busy machine.
    run = _benchmarks("--quick", "--results", str(results), timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    printed = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    return run, printed, results


def test_quick_run_prints_every_result_with_its_fields(quick_run):
    _, printed, _ = quick_run
    names = {}
    for result in printed:
        assert KEYS <= result.keys(), f"{result['name']} lacks {sorted(KEYS - result.keys())}"
        names.setdefault(result["benchmark"], set()).add(result["name"])
        assert result["mode"] == "quick"
        assert result["ours"] > 0 and result["reference"] > 0
        assert result["ratio"] == pytest.approx(result["ours"] / result["reference"], rel=1e-2)
        assert len(result["ours_samples"]) >= 5 and len(result["reference_samples"]) >= 5
        assert result["command"].startswith(f"python -m benchmarks.{result['benchmark']}")
        assert "--quick" in result["command"]
    for benchmark, expected in EXPECTED.items():
        assert expected <= names.get(benchmark, set()), f"{benchmark} printed {names.get(benchmark)}"
    from benchmarks import torch_reference

    if torch_reference.available():
        for benchmark, expected in TORCH_ROWS.items():
            assert expected <= names[benchmark], f"{benchmark} printed {names[benchmark]}"


def test_without_torch_the_torch_rows_are_skipped_with_a_message(monkeypatch, capsys):
    from benchmarks import torch_reference

    monkeypatch.setattr(torch_reference, "available", lambda: False)
    assert torch_reference.TorchWorker.start(who="lm_speed") is None
    assert "PyTorch is not installed, skipping the PyTorch rows" in capsys.readouterr().err


def test_a_part_runs_only_its_rows(monkeypatch, capsys):
    """`--part training`: lm_speed's training rows, no generation rows (PyTorch left out)."""
    from benchmarks import lm_speed, torch_reference

    monkeypatch.setattr(torch_reference, "available", lambda: False)
    lm_speed.main(["--quick", "--part", "training"])
    names = [json.loads(line)["name"] for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert names == ["train_lstm_2x32", "train_gru_2x32"]


def test_quick_run_reports_flop_utilisation(quick_run):
    _, printed, _ = quick_run
    for result in printed:
        if result["benchmark"] == "train_throughput":
            assert result["matmul_peak_gflops"] > 0
            assert set(result["utilisation"]) == {"ours", "reference"}
            assert result["forward_gflops_per_image"]["ours"] > 0


def test_quick_run_writes_the_table_where_asked(quick_run):
    _, printed, results = quick_run
    table = results.read_text(encoding="utf-8")
    stored = json.loads(results.with_suffix(".json").read_text(encoding="utf-8"))
    assert {r["name"] for r in stored} == {r["name"] for r in printed}
    for result in printed:
        assert f"`{result['name']}`" in table
        assert result["command"] in table
    assert "cores" in table and "TF " in table and "Keras " in table


def test_unknown_benchmark_is_refused_with_the_known_ones():
    run = _benchmarks("--only", "no_such_benchmark", timeout=60)
    assert run.returncode == 2
    assert "train_throughput" in run.stderr and "input_pipeline" in run.stderr


def test_quick_startup_rows_import_no_tensorflow(quick_run):
    """The full run times every app (tests/test_cli.py checks each parser imports no TensorFlow)."""
    from benchmarks import startup as startup_benchmark

    _, printed, _ = quick_run
    startup = {result["name"]: result for result in printed if result["benchmark"] == "startup"}
    assert {"startup_help"} | {f"startup_{app}_help" for app in startup_benchmark.QUICK_APPS} == set(startup)
    for result in startup.values():
        assert result["imports_tensorflow"] is False, f"{result['config']['command']} imports TensorFlow"


def test_quick_caption_row_reports_the_cache_cost_and_break_even(quick_run):
    _, printed, _ = quick_run
    (cached,) = [r for r in printed if r["name"] == "caption_cached_features_vs_encoder"]
    assert cached["caching_seconds"] > 0 and len(cached["caching_samples"]) >= 5
    # Break-even = caching time over the time one cached epoch saves.
    saved = cached["epoch_seconds"]["encoder"] - cached["epoch_seconds"]["cached"]
    assert saved <= 0 or cached["break_even_epochs"] == pytest.approx(cached["caching_seconds"] / saved, rel=1e-2)
    assert cached["config"]["captions_per_epoch"] == 4 * cached["config"]["train_images"]


def test_quick_memory_row_sets_the_estimate_beside_the_measurement(quick_run):
    _, printed, _ = quick_run
    (memory,) = [r for r in printed if r["benchmark"] == "memory"]
    assert memory["unit"] == "MiB"
    assert memory["ours"] == pytest.approx(memory["estimate_mib"]["total"], rel=1e-3)
    assert set(memory["ours_samples"]) == {memory["ours"]}  # computed once, not timed
    assert [row["what"].split()[0] for row in memory["rows"]] == ["weights", "step", "total"]
    # The rows split the median sample (of --quick's 6, the lower middle one) into its parts.
    assert memory["rows"][-1]["measured"] == pytest.approx(statistics.median_low(memory["reference_samples"]),
                                                           rel=1e-3)
    assert len(memory["measured_mib"]) == memory["config"]["processes"] == 2
    assert all(len(run["steps"]) == 3 for run in memory["measured_mib"])
