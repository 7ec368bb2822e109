"""Classification metrics from predicted probabilities and true labels."""

import warnings

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support


def classification_report(probabilities, labels, class_names):
    """Accuracy, top-5 (with more than 5 classes), loss, per-class precision and
    recall, and the confusion matrix, as a JSON-ready dict.

    Args:
        probabilities: (N, K) predicted class probabilities.
        labels: (N,) true class indices.
        class_names: the K names.
    """
    probabilities = np.asarray(probabilities, dtype="float64")
    labels = np.asarray(labels).astype("int64")
    classes = len(class_names)
    predicted = probabilities.argmax(axis=1)
    picked = probabilities[np.arange(len(labels)), labels]
    report = {
        "examples": int(len(labels)),
        "accuracy": float(np.mean(predicted == labels)),
        "loss": float(-np.mean(np.log(np.clip(picked, 1e-12, 1.0)))),
    }
    if classes > 5:
        top5 = np.argsort(-probabilities, axis=1)[:, :5]
        report["top5_accuracy"] = float(np.mean(np.any(top5 == labels[:, None], axis=1)))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=np.arange(classes), zero_division=0
    )
    report["per_class"] = {
        name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for name, p, r, f, s in zip(class_names, precision, recall, f1, support)
    }
    report["confusion_matrix"] = confusion_matrix(labels, predicted, labels=np.arange(classes)).tolist()
    return report


def labelled_predictions(model, batches):
    """(labels, probabilities) of a classifier over labelled batches."""
    labels = np.concatenate([np.asarray(y) for _, y in batches])
    with warnings.catch_warnings():
        # Keras warns "Your input ran out of data" at the end of any dataset whose
        # length tf.data cannot tell (packed shards, TFDS): here the end is the point.
        warnings.filterwarnings("ignore", message="Your input ran out of data")
        return labels, model.predict(batches, verbose=0)


def score_classifier(model, test_batches, class_names, run_dir):
    """The test figures of a classifier for metrics.json, with confusion.png in `run_dir`."""
    from dlsuite.apps.core import rundir

    labels, probabilities = labelled_predictions(model, test_batches)
    report = classification_report(probabilities, labels, class_names)
    if run_dir is not None:
        rundir.plot_confusion(report["confusion_matrix"], class_names, run_dir / "confusion.png")
    return {**{f"test_{key}": report[key] for key in ("accuracy", "loss", "top5_accuracy") if key in report},
            "per_class": report["per_class"], "confusion_matrix": report["confusion_matrix"]}


def report_line(figures):
    """The test figures of `score_classifier` as the line a run ends with."""
    return (f"test accuracy {figures['test_accuracy']:.4f}, loss {figures['test_loss']:.4f}"
            + (f", top-5 {figures['test_top5_accuracy']:.4f}" if "test_top5_accuracy" in figures else ""))
