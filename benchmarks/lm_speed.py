"""Language-model speed: stateful generation against re-reading the prefix,
the export's in-graph sampling loop, and training tokens per second of the
app's LSTM/GRU against a plain Keras model of the same shape.

    python -m benchmarks.lm_speed            # 2x512 char models, 500 generated tokens (slow: the
                                             # prefix baseline is O(N^2), ~2-3 minutes a repeat on 2 cores)
    python -m benchmarks.lm_speed --quick    # tiny models, 40 tokens
"""

import tempfile

import numpy as np

from benchmarks import common

VOCAB_CHARS = "".join(chr(c) for c in range(32, 127)) + "\n"


def _vocabulary():
    from dlsuite.apps.lm.text import Vocabulary

    return Vocabulary(level="char", tokens=["", "[UNK]", *VOCAB_CHARS])


def _app_model(cell, *, units, vocab_size):
    from dlsuite import models

    return models.build(cell, vocab_size=vocab_size, units=units, layers=2, embedding_dim=64, classifier_activation=None)


def _plain_model(cell, *, units, vocab_size):
    """What a user would write by hand: Embedding, two recurrent layers, Dense."""
    import keras

    layer = keras.layers.LSTM if cell == "lstm" else keras.layers.GRU
    return keras.Sequential([
        keras.Input((None,), dtype="int32"),
        keras.layers.Embedding(vocab_size, 64),
        layer(units, return_sequences=True),
        layer(units, return_sequences=True),
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
                  ours_label="apps.generate.generate: one cell step per token, state carried",
                  reference_label="apps.generate.prefix_generate: the whole prefix re-run for each token")

    with tempfile.TemporaryDirectory() as folder:
        served = lm_export.ExportedLanguageModel.load(
            lm_export.export_language_model(model, vocabulary, name="bench", base_dir=folder))
        exported = common.interleaved({
            "export": lambda: len(served.generate("a", length, 0.8, seed=1)) and length,
            "stateful": stateful,
        }, warmup=1, repeats=repeats)
    common.report("generate_export_vs_stateful", ours=exported["export"], reference=exported["stateful"], mode=mode,
                  unit="tokens/s", config=config,
                  ours_label="the SavedModel's generate signature (sampling loop inside the graph)",
                  reference_label="apps.generate.generate in Python, one compiled step per token")


def training(cell, *, units, batch, seq_len, steps, repeats, mode):
    import keras

    vocab_size = len(VOCAB_CHARS) + 2
    rng = np.random.default_rng(0)
    x = rng.integers(2, vocab_size, (batch, seq_len)).astype("int32")
    y = rng.integers(2, vocab_size, (batch, seq_len)).astype("int32")
    models = {"ours": _app_model(cell, units=units, vocab_size=vocab_size),
              "plain": _plain_model(cell, units=units, vocab_size=vocab_size)}
    for model in models.values():
        model.compile(optimizer=keras.optimizers.Adam(0.003, global_clipnorm=5.0),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    def step(model):
        def run():
            for _ in range(steps):
                loss = model.train_on_batch(x, y)
            float(np.asarray(loss))
            return steps * batch * seq_len
        return run

    rates = common.interleaved({name: step(model) for name, model in models.items()}, warmup=1, repeats=repeats)
    common.report(f"train_{cell}_2x{units}", ours=rates["ours"], reference=rates["plain"], mode=mode, unit="tokens/s",
                  bar=1.0, config={"batch": batch, "seq_len": seq_len, "steps_per_repeat": steps, "repeats": repeats,
                                   "optimizer": "Adam(0.003, global_clipnorm=5)"},
                  ours_label="the lm app's model: models.build(cell, layers=2, units, embedding 64), train_on_batch",
                  reference_label="keras.Sequential(Embedding, 2 x LSTM/GRU, Dense), train_on_batch")


def main(argv=None):
    args = common.parse_args(__doc__, argv)
    mode = "quick" if args.quick else "full"
    repeats = common.MIN_REPEATS
    if args.quick:
        generation(units=32, length=40, repeats=repeats, mode=mode)
        for cell in ("lstm", "gru"):
            training(cell, units=32, batch=8, seq_len=20, steps=1, repeats=repeats, mode=mode)
    else:
        for cell in ("lstm", "gru"):
            training(cell, units=512, batch=64, seq_len=100, steps=1, repeats=repeats, mode=mode)
        generation(units=512, length=500, repeats=repeats, mode=mode)


if __name__ == "__main__":
    main()
