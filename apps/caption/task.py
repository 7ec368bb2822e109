"""The captioning task: a CNN encoder and a recurrent decoder, scored by BLEU.

The recipe: load images with their reference captions, build the vocabulary
from the training captions, build the encoder (any registry CNN or
keras.applications backbone without its top, `vision/backbones.py`), run it
once over every image and cache the feature maps in the run directory (or,
with `--fine-tune-encoder`, cache the resized pixels and train encoder and
decoder end to end), train the decoder with teacher forcing on every
(image, reference) pair, then decode the test images greedily and with beam
search, score corpus BLEU-1..4 against all references of each image next to
the image-blind baseline (the most frequent training caption), export a
SavedModel that turns image bytes into a sentence.
"""

import dataclasses
import pathlib
import sys

from dlsuite.apps.caption import batches as pair_batches, feature_cache
from dlsuite.apps.core import task, train_args
from dlsuite.apps.core.errors import UsageError

# The offline default encoder, chosen by measurement on scenes (2,000 images,
# 12 epochs, test BLEU-4 with beam 3, before features were standardized): a
# randomly initialized, frozen VGG-11 cut after its fourth block (a 4x4x512
# map at 64x64) 0.57; its last block (2x2x512) 0.49, as five random blocks
# blur shape and colour; block3_pool (8x8x256) 0.47; ResNet-18 and LeNet-5
# (Caffe) below VGG-11's last block on the earlier grammar. With the defaults
# below (4,000 scenes, 8 epochs, dropout 0.5) it reaches 0.60 in about 200 s
# of CPU. Random filters need no download; on photos use ImageNet weights.
DEFAULT_ENCODER = ("vgg11", "block4_pool")


@dataclasses.dataclass
class CaptionConfig(train_args.TrainingConfig):
    """A captioning run; saved as config.json beside the model."""

    dataset: str = "scenes"
    images: str | None = None
    captions: str | None = None
    validation_captions: str | None = None  # captions files that are those splits whole
    test_captions: str | None = None
    data_dir: str | None = None
    scenes_count: int = 4000
    scenes_size: int = 64
    max_images: int | None = None
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    strict: bool = False
    encoder: str | None = None
    encoder_weights: str | None = "none"
    trust_model: bool = False  # a SavedModel --encoder-weights may read or write files or print
    encoder_layer: str | None = None
    input_size: list | None = None
    preprocess: str = "auto"
    fine_tune_encoder: bool = False
    decoder: str = "lstm"
    attention: bool = False
    units: int = 256
    embedding: int = 128
    pooling: str = "flatten"
    dropout: float = 0.5
    max_length: int = 20
    max_tokens: int | None = None
    image_blind: bool = False
    beam: int = 3
    alpha: float = 0.7
    epochs: int = 8
    batch_size: int | None = 64


def load_data_and_encoder(config, weights):
    """The captioned images, the vocabulary of their training captions and the encoder.

    Args:
        config: a checked `CaptionConfig`.
        weights: the encoder's weights, as `_check_config` resolved them.

    Returns:
        (`splits.CaptionData`, `caption_model.Vocabulary`, `backbones.Base` cut at --encoder-layer).
    """
    from dlsuite.apps.vision import backbones, classifier, pipeline
    from dlsuite.apps.caption import data as caption_data, model as caption_model

    data = caption_data.load(
        config.dataset, images=config.images, captions=config.captions, seed=config.seed,
        validation_fraction=config.validation_fraction, test_fraction=config.test_fraction,
        scenes_count=config.scenes_count, scenes_size=config.scenes_size, data_dir=config.data_dir,
        max_images=config.max_images, strict=config.strict, validation_captions=config.validation_captions,
        test_captions=config.test_captions)
    for warning in data.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    vocabulary = caption_model.Vocabulary.build(
        [reference for references in data.train.captions for reference in references], max_tokens=config.max_tokens)

    # The encoder sees the images' own size when they share one and its weights do not dictate another.
    input_size = config.input_size
    if input_size is None and data.image_shape and weights is None:
        input_size = list(data.image_shape[:2])
    probe = pipeline.batches(data.train.images.map(lambda image: (image, 0)),
                             image_size=tuple(input_size or (64, 64)), channels=data.channels, batch_size=64,
                             training=False, cache=False)
    base = backbones.build_base(config.encoder, weights=weights, input_size=input_size, channels=data.channels,
                                statistics=classifier.channel_statistics(probe, max_batches=8),
                                preprocessing=config.preprocess, trust_model=config.trust_model)
    if config.encoder_layer:
        base = _cut_encoder(base, config.encoder_layer)
    return data, vocabulary, base


def pair_captions(config, data, vocabulary):
    """Each training and validation image with its references as teacher-forcing ids.

    Returns:
        ({"train"/"validation": batches.caption_pairs}, captions cut at --max-length).
    """
    pairs = {key: pair_batches.caption_pairs(getattr(data, key).captions, vocabulary, max_length=config.max_length)
             for key in ("train", "validation")}
    truncated = pairs["train"][3] + pairs["validation"][3]
    if truncated:
        print(f"warning: {truncated} captions have more than {config.max_length} words and were cut; "
              "raise --max-length to keep them whole", file=sys.stderr)
    return pairs, truncated


def cache_features(config, data, vocabulary, base, *, cache_dir, batch_size):
    """Runs the frozen encoder once over every split (the resized pixels with
    --fine-tune-encoder) into .npy files in `cache_dir`.

    Returns:
        {split: memory-mapped array}.
    """
    what = "pixels" if config.fine_tune_encoder else f"{base.name} features"
    print(f"{data.name}: {data.sizes['train']} train / {data.sizes['validation']} validation / {data.sizes['test']} "
          f"test images, {vocabulary.size} tokens; caching {what} "
          f"({base.input_size[0]}x{base.input_size[1]}x{base.channels} in) in {cache_dir}", flush=True)
    return {
        key: feature_cache.cache_split(getattr(data, key), path=pathlib.Path(cache_dir) / f"{key}.npy",
                                       image_size=base.input_size, channels=base.channels, batch_size=batch_size,
                                       encoder=None if config.fine_tune_encoder else base.model, label=key)
        for key in ("train", "validation", "test")
    }


def make_decoder(config, vocabulary, *, mean, variance):
    """The `CaptionDecoder` of `config` (cell, attention, widths, dropout) over
    features with per-channel `mean` and `variance`."""
    from dlsuite.apps.caption import model as caption_model

    return caption_model.CaptionDecoder(
        vocabulary.tokens, units=config.units, embedding=config.embedding, cell=config.decoder,
        attention=config.attention, pooling=config.pooling, dropout=config.dropout,
        image_blind=config.image_blind, feature_mean=mean, feature_variance=variance, name="caption_decoder")


def export_captioner(config, base, encoder, decoder, *, data_name, test_bleu):
    """Exports the captioner as --export (default <encoder>_<decoder>_<dataset>); returns its version folder."""
    from dlsuite.apps.caption import export as caption_export
    from dlsuite.apps.core import rundir

    name = config.export or "_".join([base.name, config.decoder + ("_attention" if config.attention else "")
                                      + ("_blind" if config.image_blind else ""), rundir.slug(data_name)])
    return caption_export.export_captioner(
        encoder, decoder, name=name, base_dir=config.export_dir, beam_size=config.beam, alpha=config.alpha,
        max_length=config.max_length, metadata={
            "encoder": base.name, "encoder_weights": base.source, "decoder": config.decoder,
            "attention": config.attention, "dataset": dataset_facts(config), "test_bleu": test_bleu})


def _cut_encoder(base, layer_name):
    """The same backbone ending at `layer_name` (still named "backbone")."""
    import keras

    from dlsuite.apps.vision import backbones

    known = base.feature_layers()
    if layer_name not in known:
        raise UsageError(f"encoder_layer {layer_name} is not a layer of {base.name}; choose from {', '.join(known)}", option="encoder_layer")
    output = base.model.get_layer(layer_name).output
    return dataclasses.replace(base, model=keras.Model(base.model.input, output, name=backbones.BACKBONE_LAYER))


def dataset_facts(config):
    """What `evaluate` needs to rebuild the same test split."""
    return {"dataset": config.dataset, "images": config.images, "captions": config.captions, "seed": config.seed,
            "scenes_count": config.scenes_count, "scenes_size": config.scenes_size, "max_images": config.max_images,
            "validation_fraction": config.validation_fraction, "test_fraction": config.test_fraction,
            "data_dir": config.data_dir}


def _set_encoder_trainable(base, *, pretrained):
    """End-to-end training: every encoder layer learns; a pretrained encoder's batch norm keeps its statistics."""
    import keras

    base.model.trainable = True
    if pretrained:
        for layer in base.model.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False


def decode_split(decoder, cache, *, encoder, beam_sizes, max_length, alpha, batch_size):
    """Captions every image of `cache` with each beam width of `beam_sizes` (1: greedy).

    Args:
        decoder: a trained `caption_model.CaptionDecoder`.
        cache: (N, ...) features, or pixels when `encoder` is given.

    Returns:
        {beam width: `caption_decode.Decoded` of the N images}.
    """
    import numpy as np
    import tensorflow as tf

    from dlsuite.apps.caption import decode as caption_decode

    @tf.function(reduce_retracing=True)
    def run(rows, beam):
        features = encoder(rows, training=False) if encoder is not None else rows
        context, states = decoder.start(features)
        return caption_decode.decode(decoder.step, states, context, beam_size=beam, max_length=max_length, alpha=alpha)

    parts = {beam: [] for beam in beam_sizes}  # a width given twice is decoded once
    for start in range(0, len(cache), batch_size):
        rows = tf.constant(np.asarray(cache[start:start + batch_size], dtype=np.float32))
        for beam in parts:
            parts[beam].append(caption_decode.as_numpy(run(rows, tf.constant(beam))))
    return {beam: caption_decode.Decoded(*[np.concatenate([getattr(part, field) for part in chunks])
                                           for field in caption_decode.Decoded._fields])
            for beam, chunks in parts.items()}


def evaluate_split(decoder, cache, references, vocabulary, *, encoder, beam_size, max_length, alpha, batch_size):
    """Greedy and beam captions of every image in `cache`, scored by BLEU and log-likelihood.

    Returns:
        {"beam": {bleu1..4, mean_log_likelihood, mean_score, greedy_kept}, "greedy": {...},
        "beam_not_worse": count of images whose beam score >= greedy's, "captions": beam captions}.
    """
    from dlsuite.apps.caption import decode as caption_decode

    decoded = decode_split(decoder, cache, encoder=encoder, beam_sizes=(1, beam_size), max_length=max_length,
                           alpha=alpha, batch_size=batch_size)
    found = {"greedy": decoded[1], "beam": decoded[beam_size]}
    captions = {key: vocabulary.decode(result.token_ids) for key, result in found.items()}
    figures = {
        key: {**caption_decode.bleu(references, captions[key]), "beam_size": beam,
              "mean_log_likelihood": float(found[key].log_likelihood.mean()),
              "mean_score": float(found[key].score.mean()), "mean_words": float(found[key].lengths.mean()),
              # Where the beam's own best scored below greedy's caption, which was kept instead.
              "greedy_kept": int(found[key].greedy_won.sum()) if beam > 1 else None}
        for key, beam in (("greedy", 1), ("beam", beam_size))
    }
    figures["beam_not_worse"] = int((found["beam"].score >= found["greedy"].score - 1e-5).sum())
    figures["images"] = len(cache)
    figures["captions"] = captions["beam"]
    return figures


def validation_bleu_callback(captioning):
    """A callback adding val_bleu4, the corpus BLEU-4 of the greedy captions of
    the validation images against all their references, at the end of each
    epoch, so that what captioning is judged by can be a search's objective."""
    import keras

    class ValidationBLEU(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if logs is not None:
                logs["val_bleu4"] = captioning.bleu4(self.model.get_layer("caption_decoder"), "validation")

    return ValidationBLEU()


class CaptionTask(task.Task):
    """`dlsuite caption train`."""

    app = "caption"
    config_class = CaptionConfig
    metrics = ()  # token accuracy would count the padding; BLEU is scored after training

    def with_values(self, values):
        trial = super().with_values(values)
        if trial.config.attention:  # attention reads every location: pooling applies without it only
            trial.config.pooling = "flatten"
        return trial

    def objective_callbacks(self, objective):
        return [validation_bleu_callback(self)] if objective == "val_bleu4" else []

    def bleu4(self, decoder, split):
        """Corpus BLEU-4 of the greedy captions of a split's images."""
        import tensorflow as tf

        from dlsuite.apps.caption import decode as caption_decode

        # Each epoch's decoder is new to tf.function: its retracing warning does not apply.
        logger, level = tf.get_logger(), tf.get_logger().level
        logger.setLevel("ERROR")
        try:
            decoded = decode_split(decoder, self.caches[split], encoder=None, beam_sizes=(1,),
                                   max_length=self.config.max_length, alpha=self.config.alpha, batch_size=128)[1]
        finally:
            logger.setLevel(level)
        return caption_decode.bleu(getattr(self.data, split).captions,
                                   self.vocabulary.decode(decoded.token_ids))["bleu4"]

    def check(self):
        from dlsuite.apps.vision import backbones

        config = self.config
        if (config.images is None) != (config.captions is None):
            raise UsageError("images and captions go together: the folder of images and the file of their captions",
                             option=("images", "captions"))
        if config.encoder is None and not backbones.is_model_file(config.encoder_weights):
            config.encoder = DEFAULT_ENCODER[0]
            config.encoder_layer = config.encoder_layer or DEFAULT_ENCODER[1]
        if config.encoder is not None:
            config.encoder = backbones.canonical_name(config.encoder)
        if not 0 <= config.dropout < 1:
            raise UsageError(f"dropout must be in [0, 1), received {config.dropout}", option="dropout")
        if config.alpha < 0:
            raise UsageError(f"alpha must be >= 0, received {config.alpha}", option="alpha")
        if config.attention and config.pooling != "flatten":
            raise UsageError("pooling applies without attention; attention reads every location of the feature map",
                             option=("pooling", "attention"))
        if config.optimizer.get("optimizer") == "lbfgs":
            raise UsageError("optimizer lbfgs is for small image classifiers; captioners train with adam, rmsprop or sgd", option="optimizer")
        self.weights = backbones.check_weights_argument(config.encoder, config.encoder_weights,
                                                        trust_model=config.trust_model)

    def load_data(self):
        self.data, self.vocabulary, self.base = load_data_and_encoder(self.config, self.weights)
        self.pairs, self.truncated = pair_captions(self.config, self.data, self.vocabulary)

    def train_examples(self):
        return len(self.pairs["train"][0])

    def batch_size(self, requested):
        return min(requested, self.train_examples())

    def prepare_inputs(self, work_dir):
        self.caches = cache_features(self.config, self.data, self.vocabulary, self.base,
                                     cache_dir=pathlib.Path(work_dir) / "cache", batch_size=self.config.batch_size or 64)

    def batches(self, batch_size):
        return task.Batches(
            train=pair_batches.caption_order(self.caches["train"], self.pairs["train"], batch_size=batch_size,
                                             seed=self.config.seed),
            validation=pair_batches.caption_batches(self.caches["validation"], self.pairs["validation"],
                                                    batch_size=batch_size, shuffle=False),
            steps_per_epoch=-(-self.train_examples() // batch_size), batch_size=batch_size,
            train_examples=self.train_examples())

    @property
    def feature_shape(self):
        return tuple(int(d) for d in self.base.model.output.shape[1:])

    def feature_statistics(self):
        """The encoder's channel statistics on training images (of its initial weights when fine-tuned)."""
        import numpy as np

        from dlsuite.apps.caption import model as caption_model

        if not hasattr(self, "_statistics"):
            features = self.caches["train"]
            if self.config.fine_tune_encoder:
                features = self.base.model.predict(np.asarray(features[:256], np.float32), batch_size=64, verbose=0)
            self._statistics = caption_model.feature_statistics(features)
        return self._statistics

    def build_model(self):
        from dlsuite.apps.caption import model as caption_model

        config = self.config
        mean, variance = self.feature_statistics()
        decoder = make_decoder(config, self.vocabulary, mean=mean, variance=variance)
        model = caption_model.build_training_model(
            decoder, feature_shape=self.feature_shape, caption_length=config.max_length + 1,
            encoder=self.base.model if config.fine_tune_encoder else None)
        if config.fine_tune_encoder:
            _set_encoder_trainable(self.base, pretrained=self.weights is not None)
        return model

    def loss(self):
        from dlsuite.apps.caption import model as caption_model

        return caption_model.caption_loss()

    def resolved(self, model, batches):
        base = self.base
        return {"encoder": base.name, "encoder_weights": base.source, "preprocessing": base.preprocessing,
                "input_size": list(base.input_size), "channels": base.channels,
                "feature_shape": list(self.feature_shape), "vocabulary_size": self.vocabulary.size,
                "sizes": self.data.sizes, "pairs": {k: len(v[0]) for k, v in self.pairs.items()},
                "truncated_captions": self.truncated}

    def describe(self, model, batches):
        config = self.config
        return (f"{config.decoder}{' + attention' if config.attention else ''} decoder ({config.units} units) on "
                f"{self.feature_shape} features: {self.train_examples()} training captions an epoch")

    def title(self):
        return f"captioning {self.data.name}"

    def encoder_decoder(self, model):
        """(encoder, decoder) of a trained training model, both in the precision `model` computes in
        (the export's float32 copy of a model trained in bfloat16 takes a float32 copy of the frozen encoder)."""
        from dlsuite.apps.core import export_precision
        from dlsuite.apps.vision import backbones

        decoder = model.get_layer("caption_decoder")
        if self.config.fine_tune_encoder:
            return model.get_layer(backbones.BACKBONE_LAYER), decoder
        return export_precision.in_precision(self.base.model, export_precision.compute_precision(model)), decoder

    def evaluate(self, model, run_dir):
        from dlsuite.apps.caption import data as caption_data, decode as caption_decode

        config, test = self.config, self.data.test
        encoder, decoder = self.encoder_decoder(model)
        figures = evaluate_split(decoder, self.caches["test"], test.captions, self.vocabulary,
                                 encoder=encoder if config.fine_tune_encoder else None, beam_size=config.beam,
                                 max_length=config.max_length, alpha=config.alpha,
                                 batch_size=config.batch_size or 64)
        baseline = caption_data.most_frequent_caption(self.data.train.captions)
        figures["baseline"] = {"caption": baseline, **caption_decode.bleu(test.captions, [baseline] * len(test))}
        figures["examples"] = [{"image": name, "caption": caption, "references": references}
                               for name, caption, references in zip(test.names, figures.pop("captions"),
                                                                    test.captions)][:5]
        return {**{key: figures["beam"][key] for key in ("bleu1", "bleu2", "bleu3", "bleu4")}, **figures}

    def save_model(self, model, path):
        from dlsuite.apps.caption import model as caption_model
        from dlsuite.apps.core import atomic

        encoder, decoder = self.encoder_decoder(model)
        atomic.save_model(caption_model.build_captioner(encoder, decoder, caption_length=self.config.max_length + 1),
                          path)

    def export(self, model, figures, *, name=None, base_dir=None):
        encoder, decoder = self.encoder_decoder(model)
        config = dataclasses.replace(self.config, export=name, export_dir=base_dir)
        return export_captioner(config, self.base, encoder, decoder, data_name=self.data.name,
                                test_bleu={key: figures[key] for key in ("bleu1", "bleu2", "bleu3", "bleu4")})

    def report(self, figures):
        beam, greedy, baseline = figures["beam"], figures["greedy"], figures["baseline"]
        return (f"test BLEU-1..4 {beam['bleu1']:.3f} {beam['bleu2']:.3f} {beam['bleu3']:.3f} {beam['bleu4']:.3f} "
                f"(beam {self.config.beam}); greedy BLEU-4 {greedy['bleu4']:.3f}; image-blind baseline "
                f"({baseline['caption']!r}) BLEU-4 {baseline['bleu4']:.3f}; mean log-likelihood beam "
                f"{beam['mean_log_likelihood']:.3f} vs greedy {greedy['mean_log_likelihood']:.3f}")
