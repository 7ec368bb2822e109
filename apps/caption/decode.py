"""Decoding captions word by word, and judging them: greedy, beam search, log-likelihood, BLEU.

Both searches are written in TensorFlow ops around `tf.while_loop`, batched
over images, so the same code runs eagerly, under `tf.function` for
evaluation, and inside the exported SavedModel's graph. They take a `step`
function, `step(tokens (N,), states, context) -> (logits (N, V), states)`,
where `states` (a list) and `context` (a dict) are tensors with the batch
first, as `CaptionDecoder.start` and `CaptionDecoder.step` give them.

A caption has 1 to `max_length` words: the first step may not emit <end>,
the step after the last word may emit nothing else, so every caption ends and
its log-likelihood includes P(<end>).
Scores are the model's own log-probabilities (log-softmax of the logits, no
renormalization), so a caption's log-likelihood is the same whether it comes
out of a search or is scored by teacher forcing. Padding, [UNK] and <start>
are never emitted. Length normalization is GNMT's (Wu et al., 2016):
score = log P(y) / ((5 + |y|) / 6) ** alpha, |y| counting the <end> token;
alpha = 0 ranks by log-likelihood alone, which favours short captions.

Beam search keeps the `beam_size` best unfinished prefixes per image and the
`beam_size` best finished captions, and stops once no unfinished prefix can
beat the worst finished one. A prefix the greedy path needs can fall out of a
beam, so `decode` also runs greedy search and keeps, per image, whichever of
the two scores higher: a beam is never worse than greedy by the score both
maximize (`Decoded.greedy_won` says where greedy's was kept).
"""

import collections

import numpy as np
import tensorflow as tf

from dlsuite.apps.caption.model import BANNED_IDS, END_ID, START_ID, words

Decoded = collections.namedtuple("Decoded", "token_ids lengths log_likelihood score greedy_won")
Decoded.__doc__ = """Decoded captions of a batch of B images.

Fields:
    token_ids: int32 (B, max_length), the words, 0-padded (no <end>).
    lengths: int32 (B,), the number of words.
    log_likelihood: float32 (B,), log P(words, <end>).
    score: float32 (B,), the length-normalized log-likelihood.
    greedy_won: bool (B,), True where greedy's caption beat the beam's own.
"""

NEGATIVE_INFINITY = float("-inf")


def length_penalty(length, alpha):
    """GNMT's ((5 + length) / 6) ** alpha; `length` counts the <end> token."""
    return tf.pow((5.0 + tf.cast(length, tf.float32)) / 6.0, alpha)


def log_probabilities(logits, *, only_end=False, no_end=False):
    """(N, V) logits -> log-softmax with padding, [UNK] and <start> at -inf (not renormalized).

    `only_end` (a bool scalar): every token but <end> at -inf, for the step
    after the last word a caption may have; `no_end`: <end> at -inf, for the
    first step (no caption is empty).
    """
    vocab_size = tf.shape(logits)[-1]
    banned = tf.reduce_sum(tf.one_hot(list(BANNED_IDS), vocab_size), axis=0) > 0  # (V,)
    is_end = tf.equal(tf.range(vocab_size), END_ID)
    banned |= tf.logical_and(only_end, ~is_end) | tf.logical_and(no_end, is_end)
    log_p = tf.nn.log_softmax(tf.cast(logits, tf.float32), axis=-1)
    return tf.where(banned, NEGATIVE_INFINITY, log_p)


def _loose(loop_vars):
    """Shape invariants that let every dimension vary: the batch and beam sizes may be dynamic."""
    return tf.nest.map_structure(lambda value: tf.TensorShape([None] * value.shape.rank), loop_vars)


def _batch_size(states):
    return tf.shape(tf.nest.flatten(states)[0])[0]


def _put(ids, t, new, max_length):
    """ids (..., T) with column t set to `new` (...)."""
    column = tf.one_hot(t, max_length, dtype=tf.int32)  # (T,)
    return ids * (1 - column) + new[..., None] * column


def greedy(step, states, context, *, max_length, alpha=0.7):
    """The most likely next word, each step, until <end> or `max_length` words.

    Returns:
        A `Decoded` (greedy_won all True).
    """
    batch = _batch_size(states)
    max_length = tf.convert_to_tensor(max_length, tf.int32)
    alpha = tf.convert_to_tensor(alpha, tf.float32)

    def body(t, tokens, states, done, log_likelihood, steps, ids):
        logits, states = step(tokens, states, context)
        log_p = log_probabilities(logits, only_end=t >= max_length, no_end=t == 0)  # (B, V)
        choice = tf.argmax(log_p, axis=-1, output_type=tf.int32)
        gained = tf.gather(log_p, choice, batch_dims=1)
        log_likelihood += tf.where(done, 0.0, gained)
        steps += tf.where(done, 0, 1)
        ended = tf.equal(choice, END_ID)
        ids = _put(ids, t, tf.where(done | ended, 0, choice), max_length)
        return t + 1, choice, states, done | ended, log_likelihood, steps, ids

    loop_vars = (tf.constant(0), tf.fill([batch], START_ID), states, tf.zeros([batch], tf.bool), tf.zeros([batch]),
                 tf.zeros([batch], tf.int32), tf.zeros([batch, max_length], tf.int32))
    _, _, _, done, log_likelihood, steps, ids = tf.while_loop(
        lambda t, tokens, states, done, *rest: (t <= max_length) & ~tf.reduce_all(done),
        body, loop_vars, shape_invariants=_loose(loop_vars),
    )
    return Decoded(ids, steps - 1, log_likelihood, log_likelihood / length_penalty(steps, alpha),
                   tf.ones([batch], tf.bool))


def _gather_beams(values, indices):
    """values (B, k, ...) -> rows `indices` (B, n) of each batch entry."""
    return tf.gather(values, indices, batch_dims=1)


def beam_search(step, states, context, *, beam_size, max_length, alpha=0.7):
    """Beam search with length normalization (see the module docstring), batched.

    Args:
        step, states, context: as in the module docstring.
        beam_size: int or int32 scalar tensor, >= 1.
        max_length: the most words a caption may have.
        alpha: length-normalization exponent (0: none).

    Returns:
        A `Decoded` of the best finished caption per image (greedy_won all False).
    """
    batch = _batch_size(states)
    k = tf.convert_to_tensor(beam_size, tf.int32)
    max_length = tf.convert_to_tensor(max_length, tf.int32)
    alpha = tf.convert_to_tensor(alpha, tf.float32)
    # Beams of one image sit next to each other: rows b*k .. b*k + k - 1.
    states = tf.nest.map_structure(lambda s: tf.repeat(s, k, axis=0), states)
    context = tf.nest.map_structure(lambda s: tf.repeat(s, k, axis=0), context)
    # Only the first beam is alive at the start, or all k would grow the same words.
    alive_log_p = tf.tile(tf.where(tf.range(k) == 0, 0.0, NEGATIVE_INFINITY)[None], [batch, 1])  # (B, k)
    empty_ids = tf.zeros([batch, k, max_length], tf.int32)
    worst = tf.fill([batch, k], NEGATIVE_INFINITY)

    def body(t, tokens, states, alive_log_p, alive_ids, finished):
        logits, states = step(tokens, states, context)
        log_p = log_probabilities(logits, only_end=t >= max_length, no_end=t == 0)  # (B*k, V)
        vocab_size = tf.shape(log_p)[-1]
        total = tf.reshape(alive_log_p[..., None] + tf.reshape(log_p, [batch, k, vocab_size]), [batch, -1])
        # 2k candidates: even if k of them end here, k unfinished ones remain.
        candidates = tf.minimum(2 * k, k * vocab_size)
        top_log_p, top_index = tf.math.top_k(total, k=candidates)  # (B, 2k)
        parents, word = top_index // vocab_size, top_index % vocab_size
        ended = tf.equal(word, END_ID)
        candidate_ids = _put(_gather_beams(alive_ids, parents), t, tf.where(ended, 0, word), max_length)

        # Finished: the old k and the candidates that end here; keep the best k.
        finished_ids, finished_score, finished_log_p, finished_steps = finished
        end_score = tf.where(ended, top_log_p / length_penalty(t + 1, alpha), NEGATIVE_INFINITY)
        merged_score = tf.concat([finished_score, end_score], axis=1)
        best_score, best = tf.math.top_k(merged_score, k=k)
        finished = (
            _gather_beams(tf.concat([finished_ids, candidate_ids], axis=1), best),
            best_score,
            _gather_beams(tf.concat([finished_log_p, top_log_p], axis=1), best),
            _gather_beams(tf.concat([finished_steps, tf.fill(tf.shape(word), t + 1)], axis=1), best),
        )

        # Alive: the best k candidates that did not end.
        alive_log_p, keep = tf.math.top_k(tf.where(ended, NEGATIVE_INFINITY, top_log_p), k=k)
        alive_ids = _gather_beams(candidate_ids, keep)
        rows = tf.reshape(_gather_beams(parents, keep) + tf.range(batch)[:, None] * k, [-1])  # (B*k,)
        states = tf.nest.map_structure(lambda s: tf.gather(s, rows), states)
        tokens = tf.reshape(_gather_beams(word, keep), [-1])
        return t + 1, tokens, states, alive_log_p, alive_ids, finished

    def searching(t, tokens, states, alive_log_p, alive_ids, finished):
        # Log-probabilities only fall and the penalty's divisor only grows, so
        # an alive prefix can at best reach its log P / penalty(max_length).
        best_possible = tf.reduce_max(alive_log_p, axis=1) / length_penalty(max_length + 1, alpha)
        settled = finished[1][:, -1] >= best_possible
        return (t <= max_length) & ~tf.reduce_all(settled)

    finished = (empty_ids, worst, tf.zeros([batch, k]), tf.zeros([batch, k], tf.int32))
    loop_vars = (tf.constant(0), tf.fill([batch * k], START_ID), states, alive_log_p, empty_ids, finished)
    _, _, _, _, _, finished = tf.while_loop(searching, body, loop_vars, shape_invariants=_loose(loop_vars))
    finished_ids, finished_score, finished_log_p, finished_steps = finished
    return Decoded(finished_ids[:, 0], finished_steps[:, 0] - 1, finished_log_p[:, 0], finished_score[:, 0],
                   tf.zeros([batch], tf.bool))


def decode(step, states, context, *, beam_size, max_length, alpha=0.7):
    """Greedy search for beam_size 1, else the better of beam search and greedy per image."""
    beam_size = tf.convert_to_tensor(beam_size, tf.int32)
    tf.debugging.assert_positive(beam_size, message="beam size must be >= 1")
    tf.debugging.assert_positive(max_length, message="max_length must be >= 1")
    found = greedy(step, states, context, max_length=max_length, alpha=alpha)

    def with_beam():
        beam = beam_search(step, states, context, beam_size=beam_size, max_length=max_length, alpha=alpha)
        greedy_won = found.score > beam.score
        return Decoded(*[tf.where(greedy_won[:, None] if len(g.shape) == 2 else greedy_won, g, b)
                         for g, b in zip(found[:4], beam[:4])], greedy_won)

    return tf.cond(beam_size > 1, with_beam, lambda: found)


def caption_log_likelihood(logits, targets):
    """Teacher-forced log P(caption) per row: logits (B, T, V), targets (B, T) 0-padded."""
    log_p = log_probabilities(tf.reshape(logits, [-1, tf.shape(logits)[-1]]))
    picked = tf.gather(log_p, tf.reshape(targets, [-1]), batch_dims=1)
    picked = tf.reshape(picked, tf.shape(targets))
    return tf.reduce_sum(tf.where(tf.equal(targets, 0), 0.0, picked), axis=1)


def bleu(references, hypotheses):
    """Corpus BLEU-1..4 (Papineni et al., 2002) with NLTK, every reference of each image counted.

    Args:
        references: one list of reference strings per image.
        hypotheses: one caption string per image.

    Returns:
        {"bleu1": ..., "bleu4": ...} in 0..1. NLTK's smoothing method 1
        (epsilon counts for absent n-grams) keeps a corpus without any
        matching 4-gram at a small positive score rather than 0.
    """
    from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu

    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} reference lists for {len(hypotheses)} captions")
    reference_words = [[words(reference) for reference in image_references] for image_references in references]
    hypothesis_words = [words(hypothesis) for hypothesis in hypotheses]
    smoothing = SmoothingFunction().method1
    return {f"bleu{n}": float(corpus_bleu(reference_words, hypothesis_words, weights=(1.0 / n,) * n,
                                          smoothing_function=smoothing)) for n in range(1, 5)}


def as_numpy(decoded):
    """A `Decoded` of tensors -> of NumPy arrays."""
    return Decoded(*[np.asarray(value) for value in decoded])
