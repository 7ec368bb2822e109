"""Export a captioner as a SavedModel that answers encoded images with text, and read it back.

The graph holds the whole recipe: decoding the JPEG/PNG/BMP/GIF bytes,
resizing to the encoder's input, the CNN, and greedy or beam-search decoding
word by word (`caption_decode`, a `tf.while_loop` inside the graph), then
joining the words. TensorFlow Serving, or any TensorFlow program, sends bytes
and gets a sentence back; loading needs TensorFlow alone. The signatures:

===============  ===========================================  ==================================
signature        inputs                                       outputs
===============  ===========================================  ==================================
serving_default  image_bytes: string (N,)                     caption: string (N,),
                                                              log_likelihood, score: float32 (N,)
caption          image_bytes: string (N,), beam_size: int32   the same
                 (), max_length: int32 (), alpha: float32
                 () (beam_size 1: greedy; alpha 0: no
                 length normalization)
score            image_bytes: string (N,), caption: string    log_likelihood: float32 (N,),
                 (N,)                                         words: int32 (N,)
===============  ===========================================  ==================================

`serving_default` decodes with the beam size, length normalization and
maximum length of the training run (assets/dlsuite.json). `score` is the
model's log-likelihood of given captions (lower-cased, punctuation stripped
and split as in training, cut to the export's max_length words, <end>
included); a word outside the vocabulary makes it -inf, since the model can
never say it.

The export lands in `base_dir/NAME/<version>/` through a temporary folder
renamed into place (`versions.write_version_atomically`). `assets/dlsuite.json`
holds the format, sizes and decoding defaults, `assets/vocabulary.json` the
tokens; `ExportedCaptioner.load` reads them without running the graph.
"""

import json
import pathlib

import numpy as np
import tensorflow as tf

from dlsuite.apps.core import exported, saved_models
from dlsuite.apps.core.errors import UsageError
from dlsuite.apps.core.versions import check_export_name, write_version_atomically
from dlsuite.apps.vision import export as vision_export

FORMAT = "dlsuite.image_captioner"
FORMAT_VERSION = 1
METADATA_FILE = exported.METADATA_FILE
VOCABULARY_FILE = "vocabulary.json"
SIGNATURES = ("serving_default", "caption", "score")
EXPORT = exported.ExportFormat(
    name=FORMAT, version=FORMAT_VERSION, signatures=SIGNATURES, assets=(VOCABULARY_FILE,), stop="",
    not_ours=(f"an image captioner exported by dlsuite (no valid assets/{METADATA_FILE}); "
              "train one with `dlsuite caption train`"),
)


def export_captioner(encoder, decoder, *, name, base_dir="saved_models", version=None, beam_size=3, alpha=0.7,
                     max_length=20, metadata=None):
    """Exports encoder + decoder to `base_dir/name/<version>/`.

    Args:
        encoder: Keras model, float32 pixels 0..255 (batch, H, W, C) -> feature map.
        decoder: the trained `CaptionDecoder` (its vocabulary goes along).
        name: the model's folder name under `base_dir` (`versions.check_export_name`).
        base_dir: the folder holding every exported model.
        version: a positive int, or None for the next one.
        beam_size, alpha, max_length: `serving_default`'s decoding.
        metadata: more JSON-able facts to store (encoder name, BLEU, ...).

    Returns:
        The `pathlib.Path` of the new version folder.
    """
    check_export_name(name)
    shape = tuple(encoder.input.shape[1:])
    if len(shape) != 3 or None in shape or shape[-1] not in (1, 3):
        raise UsageError(f"the encoder must take fixed-size images (H, W, 1 or 3), received {shape}")
    input_size, channels = shape[:2], shape[2]

    def write(folder):
        _write_saved_model(encoder, decoder, folder, input_size=input_size, channels=channels, beam_size=beam_size,
                           alpha=alpha, max_length=max_length)
        assets = pathlib.Path(folder) / "assets"
        assets.mkdir(exist_ok=True)
        (assets / VOCABULARY_FILE).write_text(json.dumps(decoder.vocabulary) + "\n", encoding="utf-8")
        facts = {"format": FORMAT, "format_version": FORMAT_VERSION, "input_size": list(input_size),
                 "channels": channels, "vocabulary_size": len(decoder.vocabulary), "beam_size": int(beam_size),
                 "alpha": float(alpha), "max_length": int(max_length), "signatures": list(SIGNATURES),
                 **(metadata or {})}
        (assets / METADATA_FILE).write_text(json.dumps(facts, indent=2) + "\n", encoding="utf-8")

    return write_version_atomically(pathlib.Path(base_dir) / name, version, write)


def _write_saved_model(encoder, decoder, path, *, input_size, channels, beam_size, alpha, max_length):
    import keras  # Only exporting needs Keras; loading needs TensorFlow alone.

    from dlsuite.apps.caption import decode as caption_decode
    from dlsuite.apps.caption.model import END_ID, START_ID, STRIP_PUNCTUATION, UNKNOWN_ID

    tokens = tf.constant(decoder.vocabulary)  # id -> word, for joining the words
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(decoder.vocabulary[4:]),
                                            tf.range(4, len(decoder.vocabulary), dtype=tf.int32)),
        default_value=UNKNOWN_ID)

    def pixels_of(image_bytes):
        return vision_export.decode_images(image_bytes, input_size, channels)

    # One traced function that both caption endpoints call: the encoder and the beam search are
    # traced once, not once per endpoint.
    @tf.function(input_signature=[tf.TensorSpec((None,), tf.string), tf.TensorSpec((), tf.int32),
                                  tf.TensorSpec((), tf.int32), tf.TensorSpec((), tf.float32)])
    def describe(image_bytes, beam, length, length_alpha):
        features = encoder(pixels_of(image_bytes), training=False)
        context, states = decoder.start(features)
        found = caption_decode.decode(decoder.step, states, context, beam_size=beam, max_length=length,
                                      alpha=length_alpha)
        words = tf.gather(tokens, found.token_ids)  # (N, max_length), padding is ""
        captions = tf.strings.strip(tf.strings.reduce_join(words, axis=1, separator=" "))
        # Padding joins as runs of spaces; one space between words.
        captions = tf.strings.regex_replace(captions, " +", " ")
        return {"caption": captions, "log_likelihood": found.log_likelihood, "score": found.score}

    def serving_default(image_bytes):
        return describe(image_bytes, tf.constant(beam_size), tf.constant(max_length), tf.constant(alpha, tf.float32))

    def caption(image_bytes, beam_size, max_length, alpha):
        return describe(image_bytes, beam_size, max_length, alpha)

    def score(image_bytes, caption):
        text = tf.strings.regex_replace(tf.strings.lower(caption), STRIP_PUNCTUATION, "")
        ids = table.lookup(tf.strings.split(text)).to_tensor(default_value=0, shape=[None, max_length])  # (N, L)
        count = tf.reduce_sum(tf.cast(ids > 0, tf.int32), axis=1)
        batch = tf.shape(ids)[0]
        inputs = tf.concat([tf.fill([batch, 1], START_ID), ids], axis=1)  # (N, L + 1)
        targets = tf.concat([ids, tf.zeros([batch, 1], tf.int32)], axis=1)
        targets += tf.one_hot(count, max_length + 1, dtype=tf.int32) * END_ID
        logits = decoder(encoder(pixels_of(image_bytes), training=False), inputs, training=False)
        return {"log_likelihood": caption_decode.caption_log_likelihood(logits, targets), "words": count}

    images = tf.TensorSpec((None,), tf.string, name="image_bytes")
    archive = keras.export.ExportArchive()
    # No archive.track(model) (keras-team/keras#23553, see vision/export.py); the table is no variable.
    archive.track(table)
    archive.add_endpoint("serving_default", serving_default, input_signature=[images])
    archive.add_endpoint("caption", caption, input_signature=[
        images, tf.TensorSpec((), tf.int32, name="beam_size"), tf.TensorSpec((), tf.int32, name="max_length"),
        tf.TensorSpec((), tf.float32, name="alpha")])
    archive.add_endpoint("score", score, input_signature=[images, tf.TensorSpec((None,), tf.string, name="caption")])
    archive.write_out(str(path), verbose=False)


class ExportedCaptioner:
    """A captioner exported by `export_captioner`, loaded with TensorFlow alone.

    Attributes:
        path: the version folder.
        metadata: assets/dlsuite.json (input size, decoding defaults, training figures).
        vocabulary: the token list.
    """

    def __init__(self, path, saved_model, metadata, vocabulary):
        self.path = path
        self._saved_model = saved_model  # owns the variables the signatures use
        self._signatures = saved_model.signatures
        self.metadata = metadata
        self.vocabulary = vocabulary

    @classmethod
    def load(cls, path, *, trust_model=False):
        """Loads a version folder, or the NAME folder's highest version.

        Args:
            trust_model: run it even if it reads or writes files or prints (see `core.saved_models`).

        Raises:
            UsageError: nothing there, a SavedModel that `export_captioner` did not write, or one that is
                damaged or untrusted.
        """
        found = exported.read(path, EXPORT)
        saved_model = saved_models.load(found.path, trust_model=trust_model, signatures=found.signatures)
        return cls(found.path, saved_model, found.metadata, found.assets[VOCABULARY_FILE])

    def caption_bytes(self, contents, *, beam_size=None, max_length=None, alpha=None):
        """Encoded images (list of bytes) -> dict: caption (list of str), log_likelihood and score (NumPy).

        None takes the export's default (its training run's) beam size, maximum length and alpha.
        """
        beam_size = self.metadata["beam_size"] if beam_size is None else int(beam_size)
        max_length = self.metadata["max_length"] if max_length is None else int(max_length)
        alpha = self.metadata["alpha"] if alpha is None else float(alpha)
        if beam_size < 1 or max_length < 1 or alpha < 0:
            raise UsageError(f"beam size and max length must be >= 1 and alpha >= 0, received {beam_size}, "
                             f"{max_length} and {alpha}")
        outputs = self._signatures["caption"](image_bytes=tf.constant(contents, tf.string),
                                              beam_size=tf.constant(beam_size, tf.int32),
                                              max_length=tf.constant(max_length, tf.int32),
                                              alpha=tf.constant(alpha, tf.float32))
        return {"caption": [text.decode("utf-8") for text in outputs["caption"].numpy().tolist()],
                "log_likelihood": outputs["log_likelihood"].numpy(), "score": outputs["score"].numpy()}

    def score_bytes(self, contents, captions):
        """The model's log-likelihood of `captions` (one per image) -> float32 (N,)."""
        outputs = self._signatures["score"](image_bytes=tf.constant(contents, tf.string),
                                            caption=tf.constant(list(captions), tf.string))
        return outputs["log_likelihood"].numpy()

    def caption_files(self, paths, *, beam_size=None, max_length=None, alpha=None, batch_size=16):
        """Captions for image files, read here and decoded inside the graph.

        Raises:
            UsageError: a file that cannot be read or decoded, named.
        """
        results = {"caption": [], "log_likelihood": [], "score": []}
        for start in range(0, len(paths), batch_size):
            chunk = [pathlib.Path(p) for p in paths[start:start + batch_size]]
            contents = [_read(path) for path in chunk]
            try:
                found = self.caption_bytes(contents, beam_size=beam_size, max_length=max_length, alpha=alpha)
            except tf.errors.InvalidArgumentError:
                raise UsageError(f"cannot decode {vision_export.first_undecodable(chunk, contents)}: expected a JPEG, "
                                 "PNG, BMP or GIF image") from None
            for key in results:
                results[key].extend(found[key])
        return {"caption": results["caption"], "log_likelihood": np.array(results["log_likelihood"], np.float32),
                "score": np.array(results["score"], np.float32)}


def _read(path):
    try:
        return path.read_bytes()
    except OSError as error:
        raise UsageError(f"cannot read image {str(path)!r}: {error.strerror or error}") from None
