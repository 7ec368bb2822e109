"""--mixed-precision auto on a CPU (issue 28 items 1 and 5): bfloat16 where the
processor's flags show it native (core/cpu_features.py, read from fake
/proc/cpuinfo files here), float32 elsewhere; config.json records the policy
and why; --resume trains in the recorded policy whatever the machine."""

import json

import keras
import pytest

from dlsuite.apps import cli
from dlsuite.apps.core import cpu_features, engine
from dlsuite.apps.core.errors import UsageError

# Flags lines as Linux writes them (shortened).
ZEN4 = "fpu vme sse sse2 avx avx2 avx512f avx512bw avx512_bf16 avx512_vnni"
SAPPHIRE_RAPIDS = "fpu sse2 avx2 avx512f amx_bf16 amx_tile amx_int8"
NO_BF16 = "fpu vme sse sse2 avx avx2 fma"  # this suite's EPYC: no AVX-512 at all
AMX_TILE_ONLY = "fpu sse2 avx2 amx_tile amx_int8"


def cpuinfo(tmp_path, *flag_lines, key="flags", name="cpuinfo"):
    """A /proc/cpuinfo with one processor per flags line."""
    path = tmp_path / name
    path.write_text("".join(f"processor\t: {index}\nmodel name\t: test CPU\n{key}\t\t: {flags}\n\n"
                            for index, flags in enumerate(flag_lines)))
    return path


@pytest.mark.parametrize("lines, key, native, why", [
    ([ZEN4], "flags", True, "this CPU computes bfloat16 natively (avx512_bf16)"),
    ([SAPPHIRE_RAPIDS], "flags", True, "this CPU computes bfloat16 natively (amx_bf16)"),
    ([ZEN4 + " amx_bf16"] * 2, "flags", True, "this CPU computes bfloat16 natively (avx512_bf16, amx_bf16)"),
    ([NO_BF16], "flags", False, "this CPU has no native bfloat16 (no avx512_bf16 or amx_bf16 flag)"),
    ([AMX_TILE_ONLY], "flags", False, "no avx512_bf16 or amx_bf16 flag"),
    ([ZEN4, NO_BF16], "flags", False, "no avx512_bf16 or amx_bf16 flag"),  # one processor without: not native
    (["fp asimd bf16 sve"], "Features", False, "no avx512_bf16 or amx_bf16 flag"),  # Arm: not measured, float32
    ([], "flags", None, "is unknown (no flags in"),
])
def test_native_bfloat16_from_the_flags(lines, key, native, why, tmp_path):
    support = cpu_features.bfloat16(cpuinfo(tmp_path, *lines, key=key))
    assert support.native is native and why in support.why


def test_no_cpuinfo_is_unknown(tmp_path):
    """macOS and Windows have no /proc/cpuinfo: unknown, not a guess."""
    support = cpu_features.bfloat16(tmp_path / "missing")
    assert support.native is None
    assert support.why == (f"whether this CPU computes bfloat16 natively is unknown ({tmp_path / 'missing'}: "
                           "No such file or directory)")


def test_the_default_path_is_read_when_none_is_given(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_features, "CPUINFO", str(cpuinfo(tmp_path, ZEN4)))
    assert cpu_features.bfloat16().native is True


@pytest.mark.parametrize("mode, lines, policy, reason", [
    ("auto", [ZEN4], "mixed_bfloat16", "auto: this CPU computes bfloat16 natively (avx512_bf16)"),
    ("auto", [SAPPHIRE_RAPIDS], "mixed_bfloat16", "auto: this CPU computes bfloat16 natively (amx_bf16)"),
    ("auto", [NO_BF16], "float32",
     "auto: this CPU has no native bfloat16 (no avx512_bf16 or amx_bf16 flag)"),
    ("auto", [], "float32", "auto: whether this CPU computes bfloat16 natively is unknown"),
    ("off", [ZEN4], "float32", "off"),
    ("on", [NO_BF16], "mixed_bfloat16", "on: bfloat16 on a CPU"),
])
def test_precision_on_a_cpu(mode, lines, policy, reason, tmp_path):
    precision = engine.choose_precision(mode, "cpu", cpuinfo=cpuinfo(tmp_path, *lines))
    assert precision.policy == policy and precision.reason.startswith(reason)


def test_set_precision_sets_the_global_policy(tmp_path):
    try:
        precision = engine.set_precision("auto", "cpu", cpuinfo=cpuinfo(tmp_path, ZEN4))
        assert precision == engine.Precision("mixed_bfloat16", "auto: this CPU computes bfloat16 natively (avx512_bf16)")
        assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
        assert engine.set_precision("off", "cpu", cpuinfo=cpuinfo(tmp_path, ZEN4)).policy == "float32"
        assert keras.mixed_precision.global_policy().name == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_onednn_turned_off_keeps_float32(tmp_path, monkeypatch):
    """Without oneDNN, TensorFlow emulates bfloat16 on any CPU."""
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    precision = engine.choose_precision("auto", "cpu", cpuinfo=cpuinfo(tmp_path, ZEN4))
    assert precision.policy == "float32" and "TF_ENABLE_ONEDNN_OPTS=0" in precision.reason


def test_a_recorded_policy_wins_and_a_bad_mode_is_refused(tmp_path):
    recorded = engine.Precision("float32", "resume: the policy this run started in")
    assert engine.choose_precision("auto", "cpu", recorded=recorded, cpuinfo=cpuinfo(tmp_path, ZEN4)) == recorded
    with pytest.raises(UsageError, match="mixed_precision must be one of auto, on, off, received 'maybe'"):
        engine.choose_precision("maybe", "cpu")


TINY = ["classify", "train", "--dataset", "shapes", "--shapes-size", "32", "--shapes-count", "64",
        "--batch-size", "32", "--epochs", "2", "--no-export"]


def test_auto_on_a_bf16_cpu_trains_in_mixed_bfloat16_and_says_why(tmp_path, monkeypatch, capsys,
                                                                  interrupt_at_epoch_end):
    run_dir = tmp_path / "run"
    monkeypatch.setattr(cpu_features, "CPUINFO", str(cpuinfo(tmp_path, ZEN4)))
    interrupt_at_epoch_end(1)  # one epoch says enough; the rest is emulated bfloat16 on this suite's CPU
    try:
        assert cli.main([*TINY, "--out", str(run_dir)]) == 130
        reason = "auto: this CPU computes bfloat16 natively (avx512_bf16)"
        resolved = json.loads((run_dir / "config.json").read_text())["resolved"]
        assert resolved["policy"] == "mixed_bfloat16" and resolved["policy_reason"] == reason
        assert f"\nprecision: mixed_bfloat16 ({reason})\n" in capsys.readouterr().out
        assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_a_float32_run_resumes_in_float32_on_a_bf16_cpu(tmp_path, monkeypatch, capsys, interrupt_at_epoch_end):
    """The run's config.json decides, not the machine that resumes it (issue 28 item 5)."""
    run_dir = tmp_path / "run"
    monkeypatch.setattr(cpu_features, "CPUINFO", str(cpuinfo(tmp_path, NO_BF16, name="first")))
    interrupt_at_epoch_end(1)
    assert cli.main([*TINY, "--out", str(run_dir)]) == 130
    reason = "auto: this CPU has no native bfloat16 (no avx512_bf16 or amx_bf16 flag)"
    assert json.loads((run_dir / "config.json").read_text())["resolved"]["policy_reason"] == reason
    capsys.readouterr()

    monkeypatch.setattr(cpu_features, "CPUINFO", str(cpuinfo(tmp_path, ZEN4, name="then")))
    try:
        assert cli.main(["classify", "train", "--resume", str(run_dir)]) == 0
        assert f"\nprecision: float32 (resume: the policy this run started in; {reason})\n" in capsys.readouterr().out
        assert keras.mixed_precision.global_policy().name == "float32"
        assert keras.saving.load_model(run_dir / "model.keras").get_layer("conv1").compute_dtype == "float32"
        assert json.loads((run_dir / "metrics.json").read_text())["epochs_run"] == 2
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_resume_refuses_a_policy_it_does_not_know(tmp_path):
    from dlsuite.apps.core import lifecycle

    (tmp_path / "config.json").write_text(json.dumps({"config": {}, "resolved": {"policy": "mixed_int4"}}))
    with pytest.raises(UsageError, match="records the policy 'mixed_int4', not one of float32, mixed_float16"):
        lifecycle.recorded_precision(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"config": {}, "resolved": {}}))
    assert lifecycle.recorded_precision(tmp_path) is None
