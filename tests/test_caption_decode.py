"""dlsuite caption decoding: the decoder's step and teacher forcing agree, searches are exact where
they can be checked by enumeration, BLEU is NLTK's corpus BLEU. Tiny random models, no training."""

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

from dlsuite.apps.caption import decode as caption_decode, model as caption_model

TOKENS = ["", "[UNK]", "<start>", "<end>", "a", "red", "circle"]


def tiny_decoder(*, cell="lstm", attention=False, end_bias=0.0, scale=1.0):
    decoder = caption_model.CaptionDecoder(TOKENS, units=8, embedding=4, cell=cell, attention=attention)
    model = caption_model.build_training_model(decoder, feature_shape=(2, 2, 3), caption_length=4)
    kernel, bias = decoder.logits.get_weights()
    bias[caption_model.END_ID] += end_bias
    decoder.logits.set_weights([kernel * scale, bias])
    return decoder, model


def compiled(search):
    """`search` (a caption_decode function) as one graph: eager while-loops step op by op, slowly."""
    @tf.function
    def run(decoder, pixels, **options):
        context, states = decoder.start(pixels)
        return search(decoder.step, states, context, **options)

    return lambda decoder, pixels, **options: caption_decode.as_numpy(run(decoder, tf.constant(pixels), **options))


def features(count=5, seed=0):
    return np.random.default_rng(seed).uniform(0, 3, (count, 2, 2, 3)).astype("float32")


def teacher_forced(model, features, token_ids, lengths):
    """log P(words, <end>) of decoded captions, by one teacher-forced pass."""
    count, steps = len(token_ids), model.inputs[1].shape[1]
    inputs, targets = np.zeros((count, steps), np.int32), np.zeros((count, steps), np.int32)
    for i, (row, length) in enumerate(zip(token_ids, lengths)):
        inputs[i, 0] = caption_model.START_ID
        inputs[i, 1:1 + length] = row[:length]
        targets[i, :length] = row[:length]
        targets[i, length] = caption_model.END_ID
    return caption_decode.caption_log_likelihood(model([features, inputs]), targets).numpy()


@pytest.mark.parametrize("cell,attention", [("lstm", False), ("gru", False), ("lstm", True), ("gru", True)])
def test_step_by_step_equals_teacher_forcing_and_survives_saving(cell, attention, tmp_path):
    decoder, model = tiny_decoder(cell=cell, attention=attention)
    pixels = features(3)
    tokens = np.array([[2, 4, 5, 6], [2, 4, 6, 0], [2, 5, 5, 5]], np.int32)
    logits = model([pixels, tokens]).numpy()
    assert logits.shape == (3, 4, len(TOKENS)) and logits.dtype == np.float32
    context, states = decoder.start(pixels)
    stepped = []
    for t in range(4):
        step_logits, states = decoder.step(tokens[:, t], states, context)
        stepped.append(step_logits)
    np.testing.assert_allclose(np.stack(stepped, axis=1), logits, atol=1e-5)
    model.save(tmp_path / "m.keras")
    reloaded = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(reloaded([pixels, tokens]).numpy(), logits, atol=1e-6)
    assert reloaded.get_layer(decoder.name).vocabulary == TOKENS


def test_an_image_blind_decoder_gives_every_image_the_same_words():
    decoder = caption_model.CaptionDecoder(TOKENS, units=8, embedding=4, image_blind=True)
    model = caption_model.build_training_model(decoder, feature_shape=(2, 2, 3), caption_length=4)
    tokens = np.array([[2, 4, 5, 6]] * 3, np.int32)
    logits = model([features(3), tokens]).numpy()
    np.testing.assert_allclose(logits[0], logits[1], atol=1e-6)
    np.testing.assert_allclose(logits[0], logits[2], atol=1e-6)


def _exhaustive(model, pixels, *, max_length, alpha):
    """Best length-normalized caption of each image among every word sequence up to max_length."""
    words = [4, 5, 6]
    best = []
    for i in range(len(pixels)):
        candidates = [sequence for n in range(1, max_length + 1) for sequence in itertools.product(words, repeat=n)]
        token_ids = np.zeros((len(candidates), max_length), np.int32)
        lengths = np.array([len(c) for c in candidates])
        for row, candidate in enumerate(candidates):
            token_ids[row, :len(candidate)] = candidate
        log_likelihood = teacher_forced(model, np.repeat(pixels[i:i + 1], len(candidates), 0), token_ids, lengths)
        scores = log_likelihood / ((5 + lengths + 1) / 6) ** alpha
        best.append((float(scores.max()), candidates[int(scores.argmax())]))
    return best


@pytest.mark.parametrize("alpha", [0.0, 0.7])
def test_a_beam_wide_enough_finds_the_exhaustive_best_caption(alpha):
    # A confident model whose best captions differ in length and are not all greedy's.
    decoder, model = tiny_decoder(attention=True, scale=6.0)
    pixels = features(4, seed=2)
    # 27 = 3**3: no prefix is ever pruned.
    found = compiled(caption_decode.beam_search)(decoder, pixels, beam_size=27, max_length=3, alpha=alpha)
    expected = _exhaustive(model, pixels, max_length=3, alpha=alpha)
    np.testing.assert_allclose(found.score, [score for score, _ in expected], atol=1e-5)
    assert [tuple(row[:n]) for row, n in zip(found.token_ids, found.lengths)] == [words for _, words in expected]
    assert len({len(words) for _, words in expected}) > 1
    greedy = compiled(caption_decode.greedy)(decoder, pixels, max_length=3, alpha=alpha)
    assert (found.score > greedy.score + 1e-6).any()
    # The search's log-likelihoods are the model's: teacher forcing gives the same.
    np.testing.assert_allclose(teacher_forced(model, pixels, found.token_ids, found.lengths), found.log_likelihood,
                               atol=1e-5)


def test_beam_of_one_is_greedy_and_batches_decode_like_single_images():
    decoder, _ = tiny_decoder(end_bias=-2.0, scale=6.0)
    pixels = features(6, seed=2)
    greedy = compiled(caption_decode.greedy)(decoder, pixels, max_length=5)
    beam_one = compiled(caption_decode.beam_search)(decoder, pixels, beam_size=1, max_length=5)
    np.testing.assert_array_equal(greedy.token_ids, beam_one.token_ids)
    np.testing.assert_allclose(greedy.score, beam_one.score, atol=1e-6)
    decode = compiled(caption_decode.decode)
    batched = decode(decoder, pixels, beam_size=3, max_length=5)
    assert (batched.score >= greedy.score - 1e-6).all()
    for i in range(6):
        single = decode(decoder, pixels[i:i + 1], beam_size=3, max_length=5)
        np.testing.assert_array_equal(single.token_ids[0], batched.token_ids[i])
        np.testing.assert_allclose(single.score[0], batched.score[i], atol=1e-5)


def test_captions_have_one_to_max_length_words_and_always_end():
    decoder, _ = tiny_decoder(end_bias=-20.0)  # never wants to stop
    for beam in (1, 4):
        found = compiled(caption_decode.decode)(decoder, features(3), beam_size=beam, max_length=4)
        assert found.token_ids.shape == (3, 4) and (found.lengths == 4).all()
    decoder, _ = tiny_decoder(end_bias=20.0)  # wants to stop at once, but a caption has a word
    for beam in (1, 4):
        found = compiled(caption_decode.decode)(decoder, features(3), beam_size=beam, max_length=4)
        assert (found.lengths == 1).all() and np.isfinite(found.log_likelihood).all()
        assert np.isfinite(found.log_likelihood).all()
        assert not np.isin(found.token_ids, [caption_model.UNKNOWN_ID, caption_model.START_ID]).any()


def test_decoding_runs_inside_a_graph_with_dynamic_beam_and_length():
    decoder, _ = tiny_decoder(end_bias=-2.0, scale=6.0)

    @tf.function(input_signature=[tf.TensorSpec((None, 2, 2, 3)), tf.TensorSpec((), tf.int32),
                                  tf.TensorSpec((), tf.int32)])
    def run(pixels, beam, length):
        context, states = decoder.start(pixels)
        return caption_decode.decode(decoder.step, states, context, beam_size=beam, max_length=length)

    pixels = features(2)
    context, states = decoder.start(pixels)
    eager = caption_decode.as_numpy(caption_decode.decode(decoder.step, states, context, beam_size=3, max_length=4))
    graph = caption_decode.as_numpy(run(pixels, tf.constant(3), tf.constant(4)))
    np.testing.assert_array_equal(graph.token_ids, eager.token_ids)
    assert run(pixels, tf.constant(1), tf.constant(2)).token_ids.shape == (2, 2)


def test_bleu_is_nltk_corpus_bleu_over_all_references():
    from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu

    references = [["a small red circle", "a red circle"], ["a blue square above a red circle", "there is a blue square"]]
    hypotheses = ["a red circle", "A blue square, above a red circle."]
    scores = caption_decode.bleu(references, hypotheses)
    expected = corpus_bleu([[r.split() for r in refs] for refs in references],
                           [["a", "red", "circle"], "a blue square above a red circle".split()],
                           smoothing_function=SmoothingFunction().method1)
    assert scores["bleu4"] == pytest.approx(expected)
    assert caption_decode.bleu([["a red circle"]], ["a red circle"])["bleu1"] == pytest.approx(1.0)
    assert caption_decode.bleu([["a red circle to the left"]], ["one green square"])["bleu4"] < 0.01
