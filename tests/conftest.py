"""Shared test settings: quiet TensorFlow, deterministic seeds."""

import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Caches the suite writes (manifests, image caches, token files) stay out of
# ~/.cache/dlsuite; each test gets its own folder below (`_own_cache_folder`).
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="dlsuite-test-cache-")
# --mixed-precision auto decides from the processor's flags (core/cpu_features): the suite's
# thresholds were measured in float32, so every process it starts sees a CPU without native
# bfloat16, on any machine; tests/test_cpu_bfloat16.py gives the decision its own files.
_CPUINFO = os.path.join(tempfile.mkdtemp(prefix="dlsuite-test-cpuinfo-"), "cpuinfo")
with open(_CPUINFO, "w", encoding="utf-8") as _file:
    _file.write("processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma\n")
os.environ["DLSUITE_CPUINFO"] = _CPUINFO
# pytest-xdist workers share the cores: TensorFlow's default intra-op pool (a thread a core)
# in each made them spin against each other. A share each ran test_caption.py and
# test_diagnose.py on 2 workers and 2 cores in 123 s, not 162 s. Through the environment, so
# that the runs a test starts compute as the test's own process does: a killed-and-resumed
# run must end with the weights of one never killed, to the bit, and a sum split over
# another number of threads rounds differently (CI failed on exactly that with the setting
# in this process only).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", str(max(1, len(os.sched_getaffinity(0)) // _WORKERS)))

import keras  # noqa: E402
import pytest  # noqa: E402

# The README runs the suite on two pytest-xdist workers, a file at a time, in
# collection order: the longest files go first, so that no long file starts
# last while the other worker sits idle (measured on 2 cores: 10:21 with the
# benchmarks' 3-minute quick run starting last). Ordered by the files' times in
# a run of the whole suite (`--durations=0`, summed per file).
LONGEST_FIRST = ("test_benchmarks.py", "test_transfer.py", "test_classify.py", "test_lifecycle.py",
                 "test_cnn_models.py", "test_parameter_server.py", "test_kill_resume.py", "test_caption.py",
                 "test_tune.py", "test_diagnose.py", "test_lm.py", "test_lm_export.py", "test_image_scale.py",
                 "test_export.py", "test_serve.py", "test_monitors.py", "test_fused_rnn.py", "test_shards.py",
                 "test_features.py", "test_precise_bn.py", "test_distribute.py")


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order inside a file stays


@pytest.fixture(autouse=True)
def _own_cache_folder(tmp_path_factory, monkeypatch):
    """Manifests, image caches and token files of this test only, not ~/.cache/dlsuite."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    """Each test starts from the same seed and a clean Keras name scope."""
    keras.utils.set_random_seed(0)
    yield
    # Without the full garbage collection (0.4 s a test); memory stays bounded
    # because each test's models go out of scope anyway.
    keras.backend.clear_session(free_memory=False)
    keras.mixed_precision.set_global_policy("float32")  # a run may have set mixed


@pytest.fixture()
def interrupt_at_epoch_end(monkeypatch):
    """`interrupt_at_epoch_end(n)`: the n-th epoch end from now raises
    KeyboardInterrupt, as Ctrl-C would, after the epoch's checkpoint; later
    epoch ends (a resumed run) pass."""
    from dlsuite.apps.core.checkpoints import ResumeCheckpoint

    original, ends = ResumeCheckpoint.on_epoch_end, []

    def arm(count):
        def on_epoch_end(self, epoch, logs=None):
            original(self, epoch, logs)
            ends.append(epoch)
            if len(ends) == count:
                raise KeyboardInterrupt

        monkeypatch.setattr(ResumeCheckpoint, "on_epoch_end", on_epoch_end)

    return arm
