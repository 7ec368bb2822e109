"""The language-modeling task: a recurrent LM (LSTM, GRU, IRNN, biLM) on a text.

The recipe: gather the text, build the vocabulary, split by position (the
last part validates; the tuner also holds out a test part at the very end),
train with gradient clipping (the seed's fix for exploding RNN gradients),
report loss, perplexity and bits per character against the unigram
baseline, export a SavedModel that serves generated text.
"""

import dataclasses
import math

import numpy as np

from dlsuite.apps.core import task, train_args
from dlsuite.apps.core.errors import UsageError


@dataclasses.dataclass
class LMConfig(train_args.TrainingConfig):
    """Everything a language-model run needs; saved as config.json."""

    text: str | None = None
    dataset: str | None = None
    data_dir: str | None = None
    max_chars: int = 1_000_000  # 0: the whole text
    token_cache: str | None = None  # where --text's token files go; None: token_file.default_cache_dir()
    level: str = "char"
    max_tokens: int | None = None
    cell: str = "lstm"
    layers: int = 2
    units: int = 512
    embedding: int = 64
    seq_len: int = 100
    # The default recipe, with `lm train`'s Adam at 0.003 decaying to 0 along a
    # cosine (docs/lm.md, "The default run"). On 2 CPU cores and 1M characters
    # an epoch takes about 2.2 minutes; the five default epochs reached 1.46
    # nats/char on the stdlib docstrings and 1.18 on the King James Bible.
    dropout: float = 0.1
    irnn: bool = False
    validation_fraction: float = 0.1
    epochs: int = 5
    batch_size: int | None = 64


def build_language_model(config, vocab_size):
    """The registry model for `config`: logits over the vocabulary at every step."""
    from dlsuite import models

    if config.cell == "bilstm":
        return models.build("bilm", vocab_size=vocab_size, cell="lstm", layers_per_direction=config.layers,
                            units=config.units, embedding_dim=config.embedding, dropout=config.dropout)
    name = "irnn" if config.irnn else {"rnn": "simple_rnn"}.get(config.cell, config.cell)
    return models.build(name, vocab_size=vocab_size, layers=config.layers, units=config.units,
                        embedding_dim=config.embedding, dropout=config.dropout, classifier_activation=None)


def load_corpus(config):
    """The `token_file.Corpus` of the text `config` names, cut to --max-chars (0: all of it).

    A text file is encoded once into a token file and read from disk; the
    default corpus and TFDS texts are held in memory.
    """
    from dlsuite.apps.lm import text, token_file

    spec, limit = config.text or config.dataset, config.max_chars or None
    if spec is not None and not str(spec).startswith(text.TFDS_PREFIX):
        corpus = token_file.load(spec, level=config.level, max_tokens=config.max_tokens, max_chars=limit,
                                 cache_dir=config.token_cache or token_file.default_cache_dir())
    else:
        name, whole = text.load_text(spec, data_dir=config.data_dir)
        corpus = token_file.in_memory(name, whole, level=config.level, max_tokens=config.max_tokens, max_chars=limit)
    return corpus


def perplexity_figures(nats_per_token, *, tokens, characters, split="validation"):
    """Loss, perplexity and bits per character from the mean loss per token."""
    return {
        f"{split}_loss": float(nats_per_token),
        f"{split}_perplexity": math.exp(min(float(nats_per_token), 700.0)),
        "bits_per_character": float(nats_per_token) * tokens / max(1, characters) / math.log(2),
    }


def perplexity_callback():
    """A callback adding val_perplexity = exp(val_loss) to the epoch logs, so
    that a search can optimize it and keras-tuner's checkpoint sees it."""
    import keras

    class Perplexity(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if logs is not None and "val_loss" in logs:
                logs["val_perplexity"] = math.exp(min(float(logs["val_loss"]), 700.0))

    return Perplexity()


def _bilm_pairs(x, y):
    """(w[0:T+1], w[1:T+2]) windows -> input w[1:T+1], forward targets w[2:T+2]
    and backward targets w[0:T]."""
    return x[:, 1:], (y[:, 1:], x[:, :-1])


class LanguageModelTask(task.Task):
    """`dlsuite lm train`.

    Args:
        config: an `LMConfig`.
        test_fraction: the end of the text held out for a test score (the
            tuner's); 0 scores the validation part, as `lm train` reports.
    """

    app = "lm"
    config_class = LMConfig

    def __init__(self, config, *, test_fraction=0.0):
        super().__init__(config)
        self.test_fraction = test_fraction

    @classmethod
    def intra_op_threads(cls):
        from dlsuite.models import fused_rnn

        return fused_rnn.intra_op_threads()

    @property
    def bidirectional(self):
        return self.config.cell == "bilstm"

    @property
    def metrics(self):
        return [["accuracy"], ["accuracy"]] if self.bidirectional else ("accuracy",)

    def check(self):
        config = self.config
        if config.irnn and config.cell != "rnn":
            raise UsageError(f"irnn applies to cell rnn (a ReLU simple RNN), received cell {config.cell}", option="irnn")
        if not 0 <= config.dropout < 1:
            raise UsageError(f"dropout must be in [0, 1), received {config.dropout}", option="dropout")
        for option, value in (("validation_fraction", config.validation_fraction), ("test_fraction", self.test_fraction)):
            if not 0 < value < 0.5 and not (option == "test_fraction" and value == 0):
                raise UsageError(f"{option} must be in (0, 0.5), received {value}", option=option)
        if not isinstance(config.max_chars, int) or config.max_chars < 0:
            raise UsageError(f"max_chars must be 0 (the whole text) or a number of characters, received "
                             f"{config.max_chars!r}", option="max_chars")
        if config.optimizer.get("optimizer") == "lbfgs":
            raise UsageError("optimizer lbfgs is for small image models; language models train with adam, rmsprop "
                             "or sgd", option="optimizer")

    def window(self, seq_len=None):
        """Tokens a training window holds: the biLM needs one of context each side."""
        return (seq_len or self.config.seq_len) + (1 if self.bidirectional else 0)

    def load_data(self, *, longest_window=None):
        from dlsuite.apps.lm import text

        self.corpus = load_corpus(self.config)
        self.name, self.vocabulary, ids = self.corpus.name, self.corpus.vocabulary, self.corpus.ids
        self.characters, self.tokens = self.corpus.characters, int(len(ids))
        window = longest_window or self.window()
        self.test_ids = None
        if self.test_fraction:  # the test part is the end of the text; validation the part before it
            ids, self.test_ids = text.split_by_position(ids, validation_fraction=self.test_fraction, min_tokens=window)
        self.train_ids, self.validation_ids = text.split_by_position(
            ids, validation_fraction=self.config.validation_fraction / (1 - self.test_fraction), min_tokens=window + 1)
        self.baseline_nats = text.unigram_entropy(self.train_ids, self.validation_ids, self.vocabulary.size)

    def windows(self, ids, batch_size, *, shuffle):
        from dlsuite.apps.lm import text

        batches = text.windows(self._readable(ids), seq_len=self.window(), batch_size=batch_size, shuffle=shuffle,
                               seed=self.config.seed)
        return batches.map(_bilm_pairs) if self.bidirectional else batches

    def _readable(self, ids):
        """`ids` as the input pipeline can read them on this run's strategy.

        A parameter server's workers rebuild the pipeline from its graph, where
        no Python function runs: ids on disk come into memory, as a constant
        of the graph (#25: such a run holds its text in memory).
        """
        return np.asarray(ids) if self.config.strategy == "parameter-server" else ids

    def train_examples(self):
        return max(1, (len(self.train_ids) - 1) // self.window())

    def batches(self, batch_size):
        from dlsuite.apps.lm import text

        train = text.window_order(self._readable(self.train_ids), seq_len=self.window(), batch_size=batch_size,
                                  seed=self.config.seed, then=_bilm_pairs if self.bidirectional else None)
        return task.Batches(
            train=train,
            validation=self.windows(self.validation_ids, batch_size, shuffle=False),
            steps_per_epoch=max(1, -(-(len(self.train_ids) - 1) // self.window() // batch_size)),
            batch_size=batch_size, train_examples=self.train_examples())

    def build_model(self):
        return build_language_model(self.config, self.vocabulary.size)

    def loss(self):
        import keras

        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        return [loss, loss] if self.bidirectional else loss

    def objective_callbacks(self, objective):
        return [perplexity_callback()] if objective == "val_perplexity" else []

    def resolved(self, model, batches):
        token_file = self.corpus.token_file
        return {"corpus": self.name, "characters": self.characters, "text_characters": self.corpus.total_characters,
                "token_file": None if token_file is None else str(token_file), "tokens": self.tokens,
                "vocabulary_size": self.vocabulary.size, "train_tokens": int(len(self.train_ids)),
                "validation_tokens": int(len(self.validation_ids)),
                "unigram_perplexity": math.exp(self.baseline_nats)}

    def write_inputs(self, run_dir):
        from dlsuite.apps.core import rundir

        rundir.write_json(run_dir / "vocabulary.json", self.vocabulary.to_json())

    def describe(self, model, batches):
        # The first line a run prints (`lm train`, `tune lm`): what --max-chars left out and where
        # the token file is, said here rather than while loading, so that `diagnose --json`'s
        # stdout stays JSON.
        config, corpus = self.config, self.corpus
        used = f"{corpus.characters:,} characters"
        if corpus.characters < corpus.total_characters:
            used = f"the first {used} of {corpus.total_characters:,} (--max-chars 0 uses all of it)"
        stored = ""
        if corpus.token_file is not None:
            how = "reused" if corpus.seconds is None else f"written in {corpus.seconds:.1f} s"
            stored = f" in {corpus.token_file} ({how})"
        return (f"{config.layers}x{config.units} {config.cell} on {self.name}: {used}, {self.tokens:,} {config.level} "
                f"tokens ({self.vocabulary.size} in the vocabulary){stored}; unigram baseline perplexity "
                f"{math.exp(self.baseline_nats):.2f}")

    def title(self):
        return f"{self.config.cell} on {self.name}"

    def evaluate(self, model, run_dir):
        split, ids = ("test", self.test_ids) if self.test_ids is not None else ("validation", self.validation_ids)
        model.compile(loss=self.loss())
        evaluation = model.evaluate(self.windows(ids, self.config.batch_size or 64, shuffle=False), verbose=0,
                                    return_dict=True)
        forward = evaluation["forward_predictions_loss"] if self.bidirectional else evaluation["loss"]
        characters = self.vocabulary.decoded_length
        figures = perplexity_figures(forward, tokens=len(ids), characters=characters(ids), split=split)
        figures["unigram_perplexity"] = math.exp(self.baseline_nats)
        figures["unigram_bits_per_character"] = (self.baseline_nats * len(self.validation_ids)
                                                 / characters(self.validation_ids) / math.log(2))
        if self.bidirectional:
            figures["backward_perplexity"] = math.exp(evaluation["backward_predictions_loss"])
        return figures

    def export(self, model, figures, *, name=None, base_dir=None):
        from dlsuite.apps.core import rundir
        from dlsuite.apps.lm import export as lm_export

        config = self.config
        kind = "bilstm" if self.bidirectional else ("irnn" if config.irnn else config.cell)
        split = "test" if self.test_ids is not None else "validation"
        score = {f"{split}_perplexity": figures[f"{split}_perplexity"]}
        return lm_export.export_language_model(
            model, self.vocabulary, name=name or f"{kind}_{rundir.slug(self.name)}", base_dir=base_dir,
            metadata={"cell": config.cell, "layers": config.layers, "units": config.units, "seq_len": config.seq_len,
                      **score, **self.export_facts()})

    def report(self, figures):
        split = "test" if self.test_ids is not None else "validation"
        return (f"{split} loss {figures[f'{split}_loss']:.4f} nats/token, perplexity "
                f"{figures[f'{split}_perplexity']:.2f} (unigram {figures['unigram_perplexity']:.2f}), "
                f"{figures['bits_per_character']:.3f} bits/char")
