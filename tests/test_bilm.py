"""The ELMo-style biLM: shapes, direction of each half, save/load, embeddings."""

import keras
import numpy as np
import pytest

from dlsuite import models
from dlsuite.models.bilm import embedding_model

VOCAB, TIME = 12, 9


@pytest.fixture()
def bilm():
    return models.build("bilm", vocab_size=VOCAB, units=6, embedding_dim=4, layers_per_direction=2)


def test_two_heads_over_the_vocabulary(bilm):
    tokens = np.random.default_rng(0).integers(0, VOCAB, (3, TIME)).astype("int32")
    forward, backward = bilm(tokens)
    assert forward.shape == backward.shape == (3, TIME, VOCAB)
    # One embedding shared by both directions (ELMo), two recurrent stacks.
    assert [l.name for l in bilm.layers if isinstance(l, keras.layers.Embedding)] == ["embedding"]
    assert {l.name for l in bilm.layers if isinstance(l, keras.layers.LSTM)} == {
        "forward_rnn_1", "forward_rnn_2", "backward_rnn_1", "backward_rnn_2"}


def test_forward_reads_left_to_right_and_backward_right_to_left(bilm):
    """Changing token 4 may change the forward outputs at positions >= 4 only
    and the backward outputs at positions <= 4 only. A backward stack that was
    not reversed would change at positions >= 4 and fail."""
    tokens = np.random.default_rng(1).integers(0, VOCAB, (1, TIME)).astype("int32")
    changed = tokens.copy()
    changed[0, 4] = (tokens[0, 4] + 1) % VOCAB
    forward_a, backward_a = (np.asarray(t) for t in bilm(tokens))
    forward_b, backward_b = (np.asarray(t) for t in bilm(changed))
    forward_moved = np.abs(forward_a - forward_b).max(axis=-1)[0] > 1e-7
    backward_moved = np.abs(backward_a - backward_b).max(axis=-1)[0] > 1e-7
    assert list(forward_moved) == [False] * 4 + [True] * (TIME - 4)
    assert list(backward_moved) == [True] * 5 + [False] * (TIME - 5)


def test_round_trip_and_embeddings(bilm, tmp_path):
    tokens = np.random.default_rng(2).integers(0, VOCAB, (2, TIME)).astype("int32")
    bilm.save(tmp_path / "bilm.keras")
    restored = keras.saving.load_model(tmp_path / "bilm.keras", safe_mode=True)
    for ours, theirs in zip(bilm(tokens), restored(tokens)):
        np.testing.assert_allclose(ours, theirs, atol=1e-6)
    embeddings = embedding_model(restored)(tokens)
    assert embeddings.shape == (2, TIME, 12)  # forward 6 + backward 6


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"cell": "transformer"}, "Unknown cell 'transformer'"),
        ({"units": 0}, "units must be a positive integer, received 0"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\), received 1.0"),
        ({"classes": 5}, "classes must equal vocab_size 12, received 5"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        models.build("bilm", vocab_size=VOCAB, **kwargs)
