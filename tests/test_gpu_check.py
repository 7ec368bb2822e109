"""`python -m benchmarks.gpu_check` (issue 27, item 6): without a GPU it says so in one
line and exits 0; the parts that need no GPU (running the checks within their budgets,
the utilisation, the table's device column) are tested here, the checks themselves only
on a GPU."""

import os
import pathlib
import subprocess
import sys
import time

import pytest

from benchmarks import __main__ as runner
from benchmarks import gpu_check

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _gpu_check(*args):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop(runner.RUNNER_ENV, None)
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_without_a_gpu_it_says_so_in_one_line_and_exits_0():
    run = _gpu_check()
    assert run.returncode == 0, run.stderr[-2000:]
    (line,) = run.stdout.splitlines()
    assert line.startswith("gpu_check: no GPU visible to TensorFlow (CUDA_VISIBLE_DEVICES='', ")
    assert line.endswith("nothing to check")


def test_quick_runs_nothing_and_imports_no_tensorflow():
    """The test suite's quick pass over every benchmark must not start the GPU checks."""
    code = ("import sys; from benchmarks import gpu_check; status = gpu_check.main(['--quick']); "
            "print('tensorflow' in sys.modules); sys.exit(status)")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.splitlines() == [gpu_check.QUICK_LINE, "False"]


def test_it_is_registered_with_the_runner_and_its_parts_are_the_checks():
    assert "gpu_check" in runner.BENCHMARKS
    with pytest.raises(SystemExit):
        gpu_check.main(["--part", "no_such_check"])


def test_utilisation_is_training_flops_per_second_over_the_peak():
    # ResNet-50: 8.2 GFLOPs forward an image; 1,000 images/s against a 100 TFLOP/s matmul.
    assert gpu_check.utilisation(8.2e9, 1000, 100e12) == pytest.approx(3 * 8.2e12 / 100e12)


def test_each_check_prints_one_line_and_a_failure_does_not_stop_the_others(capsys):
    def ok(run):
        return "fine", [{"name": "row"}]

    def broken(run):
        raise ValueError("no such kernel\nsecond line")

    def slow(run):
        time.sleep(5)
        return "never", []

    checks = [gpu_check.Check("first", broken, budget=60), gpu_check.Check("second", slow, budget=0.3),
              gpu_check.Check("third", ok, budget=60)]
    run = gpu_check.Run(device="test", gpus=1, work=pathlib.Path("."))
    rows, failed = gpu_check.run_checks(checks, run, total=60)
    out = capsys.readouterr().out.splitlines()
    assert failed == ["first", "second"]
    assert rows == [{"name": "row"}]
    assert out[0] == "FAILED: first: ValueError: no such kernel"
    assert out[1] == "FAILED: second: over its budget of 0.3 s"
    assert out[2].startswith("ok: third: fine (")


def test_a_check_not_started_once_the_total_is_spent(capsys):
    run = gpu_check.Run(device="test", gpus=1, work=pathlib.Path("."))
    rows, failed = gpu_check.run_checks([gpu_check.Check("late", lambda run: ("x", []), budget=60)], run, total=5)
    assert (rows, failed) == ([], ["late"])
    assert capsys.readouterr().out == "FAILED: late: not started, the run's 5 s are spent\n"


def test_a_timed_out_child_is_ended_with_its_children(tmp_path):
    marker = tmp_path / "grandchild-alive"
    grandchild = f"import time; time.sleep(3); open({str(marker)!r}, 'w').close()"
    child = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {grandchild!r}]); time.sleep(60)"
    process = gpu_check._start([sys.executable, "-c", child])
    with pytest.raises(gpu_check.CheckFailed, match="took over 1 s"):
        gpu_check._finish(process, what="sleeper", timeout=1)
    time.sleep(3.5)
    assert not marker.exists()


def test_the_table_names_the_device_of_a_gpu_row():
    row = {"name": "gpu_matmul_float16_vs_float32", "mode": "full", "ours": 700, "reference": 400, "ratio": 1.75,
           "unit": "TFLOP/s", "device": "NVIDIA H100 80GB HBM3", "cores": 16, "cpu": "Xeon"}
    assert "| NVIDIA H100 80GB HBM3, 16 cores, Xeon |" in runner.markdown([row])
