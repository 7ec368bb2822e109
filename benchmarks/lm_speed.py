"""Language-model speed: stateful generation against re-reading the prefix,
the export's in-graph sampling loop, and training tokens per second of the
app's LSTM/GRU against a plain Keras model of the same shape and against
PyTorch's nn.LSTM/nn.GRU (issue 17).

PyTorch is a reference only, never a dependency of dlsuite: install it with
`pip install -e ".[bench]"` (torch==2.13.0, the CPU build). Without it the
PyTorch rows are skipped with a message on stderr and the others still run.

    python -m benchmarks.lm_speed            # 2x512 and 1x256 char models, batch 64 x 100; 500 generated
                                             # tokens (slow: the prefix baseline is O(N^2), ~2-3 minutes a
                                             # repeat on 2 cores)
    python -m benchmarks.lm_speed --quick    # tiny models, 10 tokens
    python -m benchmarks.lm_speed --part training   # the training rows only (a few minutes)
"""

import functools
import statistics
import tempfile
import time

import numpy as np

from benchmarks import common, torch_reference

WARMUP = 1
# Tokens a --quick generation row samples: each token is a call, and the rows only have to come out.
QUICK_TOKENS = 10
VOCAB_CHARS = "".join(chr(c) for c in range(32, 127)) + "\n"


def _vocabulary():
    from dlsuite.apps.lm.text import Vocabulary

    return Vocabulary(level="char", tokens=["", "[UNK]", *VOCAB_CHARS])


def _app_model(cell, *, units, vocab_size, layers=2):
    from dlsuite import models

    return models.build(cell, vocab_size=vocab_size, units=units, layers=layers, embedding_dim=64,
                        classifier_activation=None)


def _plain_model(cell, *, units, vocab_size, layers=2):
    """What a user would write by hand: Embedding, the recurrent layers, Dense."""
    import keras

    layer = keras.layers.LSTM if cell == "lstm" else keras.layers.GRU
    return keras.Sequential([
        keras.Input((None,), dtype="int32"),
        keras.layers.Embedding(vocab_size, 64),
        *[layer(units, return_sequences=True) for _ in range(layers)],
        keras.layers.Dense(vocab_size),
    ])


def generation(*, units, length, repeats, mode):
    from dlsuite.apps.lm import export as lm_export, generate

    vocabulary = _vocabulary()
    model = _app_model("lstm", units=units, vocab_size=vocabulary.size)

    def stateful():
        return sum(1 for _ in generate.generate(model, vocabulary, prompt="a", length=length, temperature=0.8, seed=1))

    def prefix():
        return sum(1 for _ in generate.prefix_generate(model, vocabulary, prompt="a", length=length, temperature=0.8, seed=1))

    rates = common.interleaved({"stateful": stateful, "prefix": prefix}, warmup=1, repeats=repeats)
    config = {"model": f"2x{units} char LSTM (random weights)", "vocabulary": vocabulary.size, "tokens": length, "repeats": repeats}
    common.report("generate_stateful_vs_prefix", ours=rates["stateful"], reference=rates["prefix"], mode=mode,
                  unit="tokens/s", bar=10, config=config,
                  ours_label="apps.lm.generate.generate: one cell step per token, state carried",
                  reference_label="apps.lm.generate.prefix_generate: the whole prefix re-run for each token")

    # The export, the Python loop and (where installed) PyTorch's loop, interleaved in one run.
    worker = torch_reference.TorchWorker.start(who="lm_speed")
    with tempfile.TemporaryDirectory() as folder:
        served = lm_export.ExportedLanguageModel.load(
            lm_export.export_language_model(model, vocabulary, name="bench", base_dir=folder))
        runs = {"export": lambda: len(served.generate("a", length, 0.8, seed=1)) and length, "stateful": stateful}
        if worker is not None:
            worker.setup("generate", cell="lstm", units=units, layers=2, vocab_size=vocabulary.size,
                         start_id=int(vocabulary.encode("a")[0]))
            runs["torch"] = functools.partial(worker.run, length=length)
        try:
            rates = common.interleaved(runs, warmup=1, repeats=repeats)
        finally:
            if worker is not None:
                worker.close()
    export_label = "the SavedModel's generate signature (sampling loop inside the graph)"
    common.report("generate_export_vs_stateful", ours=rates["export"], reference=rates["stateful"], mode=mode,
                  unit="tokens/s", config=config, ours_label=export_label,
                  reference_label="apps.lm.generate.generate in Python, one compiled step per token")
    if worker is None:
        return
    torch_config = {**config, **worker.info}
    torch_label = ("PyTorch (own process): the same 2-layer nn.LSTM, one token per call, (h, c) carried, "
                   "softmax / T, torch.multinomial")
    common.report("generate_stateful_vs_torch", ours=rates["stateful"], reference=rates["torch"],
                  mode=mode, unit="tokens/s", config=torch_config,
                  ours_label="apps.lm.generate.generate, the Python loop: one compiled step per token",
                  reference_label=torch_label)
    common.report("generate_export_vs_torch", ours=rates["export"], reference=rates["torch"],
                  mode=mode, unit="tokens/s", config=torch_config, ours_label=export_label,
                  reference_label=torch_label)


def training(cell, *, units, layers=2, batch, seq_len, steps, repeats, mode):
    """Training tokens/s of the app's model against plain Keras and, where installed, PyTorch.

    All sides take the same steps on the same batch, interleaved: Adam(0.003)
    with the gradients' global norm clipped to 5, sparse cross-entropy from
    logits on every time step.
    """
    import keras

    vocab_size = len(VOCAB_CHARS) + 2
    rng = np.random.default_rng(0)
    x = rng.integers(2, vocab_size, (batch, seq_len)).astype("int32")
    y = rng.integers(2, vocab_size, (batch, seq_len)).astype("int32")
    models = {"ours": _app_model(cell, units=units, vocab_size=vocab_size, layers=layers),
              "plain": _plain_model(cell, units=units, vocab_size=vocab_size, layers=layers)}
    for model in models.values():
        model.compile(optimizer=keras.optimizers.Adam(0.003, global_clipnorm=5.0),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    if mode == "quick":
        common.build_optimizers(*models.values())

    cpu_seconds = {name: [] for name in models}

    def step(name, model):
        def run():
            cpu_start = time.process_time()
            for _ in range(steps):
                loss = model.train_on_batch(x, y)
            float(np.asarray(loss))
            cpu_seconds[name].append(time.process_time() - cpu_start)
            return steps * batch * seq_len
        return run

    runs = {name: step(name, model) for name, model in models.items()}
    worker = torch_reference.TorchWorker.start(who="lm_speed")
    if worker is not None:
        worker.setup("train", cell=cell, units=units, layers=layers, vocab_size=vocab_size,
                     tokens=x.tolist(), targets=y.tolist())
        runs["torch"] = functools.partial(worker.run, steps=steps)
    try:
        rates = common.interleaved(runs, warmup=WARMUP, repeats=repeats)
    finally:
        if worker is not None:
            worker.close()
            cpu_seconds["torch"] = worker.cpu_seconds
    # CPU seconds a step (warm-ups left out): the work each side does, which other processes on
    # a shared machine change less than the wall time.
    cpu_per_step = {name: statistics.median(times[WARMUP:]) / steps for name, times in cpu_seconds.items()}
    details = "CPU s/step: " + ", ".join(f"{name} {seconds:.3g}" for name, seconds in cpu_per_step.items())
    shape = f"{layers}x{units}"
    config = {"batch": batch, "seq_len": seq_len, "steps_per_repeat": steps, "repeats": repeats,
              "optimizer": "Adam(0.003, global_clipnorm=5)"}
    ours_label = (f"the lm app's model: models.build(cell, layers={layers}, units, embedding 64) "
                  "(FusedLSTM/FusedGRU), train_on_batch")
    common.report(f"train_{cell}_{shape}", ours=rates["ours"], reference=rates["plain"], mode=mode, unit="tokens/s",
                  bar=1.0, config=config, ours_label=ours_label, cpu_seconds_per_step=cpu_per_step,
                  details=details, reference_label=f"keras.Sequential(Embedding, {layers} x LSTM/GRU, Dense), train_on_batch, same process and threads")
    if worker is not None:
        common.report(f"train_{cell}_{shape}_vs_torch", ours=rates["ours"], reference=rates["torch"], mode=mode,
                      unit="tokens/s", bar=1.0, config={**config, **worker.info}, ours_label=ours_label,
                      reference_label=(f"PyTorch (own process): Embedding, nn.{cell.upper()}({units}, num_layers={layers}), Linear; "
                                       "Adam(0.003), clip_grad_norm_(5), cross_entropy"),
                      plain_keras_vs_torch=_median_ratio(rates["plain"], rates["torch"]),
                      cpu_seconds_per_step=cpu_per_step, details=details)


def _median_ratio(ours, reference):
    return statistics.median(ours) / statistics.median(reference)


def main(argv=None):
    args = common.parse_args(__doc__, argv, parts=("training", "generation"))
    mode = "quick" if args.quick else "full"
    repeats = common.MIN_REPEATS
    from dlsuite.apps.core import engine
    from dlsuite.apps.lm.task import LanguageModelTask

    # TensorFlow set up as `dlsuite lm` sets it up (one intra-op thread on 2 cores); the plain
    # Keras rows run in this process too, so with the same threads.
    engine.set_intra_op_threads(LanguageModelTask.intra_op_threads())
    if args.quick:
        if "generation" in args.part:
            generation(units=32, length=QUICK_TOKENS, repeats=repeats, mode=mode)
        if "training" in args.part:
            for cell in ("lstm", "gru"):
                training(cell, units=32, batch=8, seq_len=20, steps=1, repeats=repeats, mode=mode)
        return
    if "training" in args.part:
        # More repeats than the minimum: these rows carry the bar, on a machine often shared.
        for cell in ("lstm", "gru"):
            training(cell, units=512, batch=64, seq_len=100, steps=1, repeats=repeats + 4, mode=mode)
        for cell in ("lstm", "gru"):
            training(cell, units=256, layers=1, batch=64, seq_len=100, steps=2, repeats=repeats + 4, mode=mode)
    if "generation" in args.part:
        generation(units=512, length=500, repeats=repeats, mode=mode)


if __name__ == "__main__":
    main()
