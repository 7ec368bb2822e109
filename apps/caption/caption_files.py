"""Readers for the captions files people have, each giving references per image name.

* Flickr8k/Flickr30k token files (`1000268201_693b08cb0e.jpg#0<TAB>A child ...`);
* the Kaggle CSVs: Flickr8k's `image,caption` and Flickr30k's
  `image_name| comment_number| comment`;
* COCO captions JSON (`images` + `annotations`);
* Karpathy's `dataset_*.json`, with its own splits.

Empty captions are skipped with a warning (`CaptionsFile.warnings`); a
malformed line is an error that names the line. Images are not opened here.
"""

import csv
import dataclasses
import io
import json
import os

from dlsuite.apps.core.errors import UsageError


@dataclasses.dataclass
class CaptionsFile:
    """What a captions file says: references per image name, optional splits, problems found."""

    captions: dict  # name -> [caption, ...] in file order
    splits: dict | None = None  # name -> "train" / "validation" / "test" (Karpathy JSON only)
    warnings: list = dataclasses.field(default_factory=list)


def read_captions_file(path):
    """Parses a captions file in any of the formats of the module docstring.

    Raises:
        UsageError: a missing or unreadable file, or a malformed line/entry,
            naming the line number.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UsageError(f"--captions {path!r} does not exist; pass a Flickr token file, a CSV or a COCO captions JSON")
    try:
        with open(path, encoding="utf-8-sig") as handle:
            text = handle.read()
    except UnicodeDecodeError as error:
        raise UsageError(f"--captions {path!r} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    except OSError as error:
        raise UsageError(f"cannot read --captions {path!r}: {error.strerror or error}") from None
    if path.lower().endswith(".json") or text.lstrip().startswith("{"):
        return _read_json(path, text)
    first = next((line for line in text.splitlines() if line.strip()), "")
    header = [cell.strip().lower() for cell in first.replace("|", ",").split(",")]
    if "\t" not in first and any(h in ("image", "image_name") for h in header) and any(
            h in ("caption", "comment") for h in header):
        return _read_csv(path, text, delimiter="|" if "|" in first else ",")
    return _read_token_lines(path, text)


def _add(found, warnings, name, caption, where):
    caption = " ".join(str(caption).split())
    if not caption:
        warnings.append(f"{where}: empty caption for {name}, skipped")
        return
    found.setdefault(name, []).append(caption)


def _read_token_lines(path, text):
    """Flickr8k/30k: `name.jpg#N<TAB>caption` (the #N is optional)."""
    found, warnings = {}, []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        name, tab, caption = line.partition("\t")
        name = name.strip()
        if not tab or not name:
            shown = line if len(line) <= 60 else line[:57] + "..."
            raise UsageError(f"--captions {path!r} line {number}: expected IMAGE#N<TAB>CAPTION (Flickr token format), "
                             f"received {shown!r}")
        name = name.split("#", 1)[0] if "#" in name else name
        _add(found, warnings, name, caption, f"{path} line {number}")
    if not found:
        raise UsageError(f"--captions {path!r} holds no captions")
    return CaptionsFile(found, warnings=warnings)


def _read_csv(path, text, *, delimiter):
    """Kaggle Flickr8k `image,caption` or Flickr30k `image_name| comment_number| comment`."""
    found, warnings = {}, []
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    header = [cell.strip().lower() for cell in next(reader)]
    image_column = next(i for i, h in enumerate(header) if h in ("image", "image_name"))
    caption_column = next(i for i, h in enumerate(header) if h in ("caption", "comment"))
    for row in reader:
        number = reader.line_num
        if not row or not any(cell.strip() for cell in row):
            continue
        if len(row) <= max(image_column, caption_column):
            raise UsageError(f"--captions {path!r} line {number}: expected {len(header)} columns "
                             f"({delimiter.join(header)}), received {len(row)}")
        _add(found, warnings, row[image_column].strip(), row[caption_column], f"{path} line {number}")
    if not found:
        raise UsageError(f"--captions {path!r} holds no captions")
    return CaptionsFile(found, warnings=warnings)


def _read_json(path, text):
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise UsageError(f"--captions {path!r} line {error.lineno}: not valid JSON ({error.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise UsageError(f"--captions {path!r}: expected a COCO captions JSON ({{\"images\": [...], "
                         "\"annotations\": [...]}}) or a Karpathy dataset_*.json")
    if "annotations" in data:
        return _read_coco(path, data)
    return _read_karpathy(path, data)


def _read_coco(path, data):
    found, warnings = {}, []
    file_names = {}
    for index, image in enumerate(data["images"]):
        if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
            raise UsageError(f"--captions {path!r}: images[{index}] needs \"id\" and \"file_name\", received {image!r:.80}")
        file_names[image["id"]] = image["file_name"]
    unknown = 0
    for index, annotation in enumerate(data["annotations"]):
        if not isinstance(annotation, dict) or "image_id" not in annotation or "caption" not in annotation:
            raise UsageError(f"--captions {path!r}: annotations[{index}] needs \"image_id\" and \"caption\", "
                             f"received {annotation!r:.80}")
        name = file_names.get(annotation["image_id"])
        if name is None:
            unknown += 1
            continue
        _add(found, warnings, name, annotation["caption"], f"{path} annotations[{index}]")
    if unknown:
        warnings.append(f"{path}: {unknown} annotations name an image id not in \"images\", skipped")
    for name in file_names.values():
        if name not in found:
            warnings.append(f"{path}: image {name} has no captions, skipped")
    if not found:
        raise UsageError(f"--captions {path!r} holds no captions")
    return CaptionsFile(found, warnings=warnings)


def _read_karpathy(path, data):
    """Karpathy and Li's dataset_flickr8k.json / dataset_coco.json, with their splits."""
    found, warnings, splits = {}, [], {}
    names = {"train": "train", "restval": "train", "val": "validation", "test": "test"}
    for index, image in enumerate(data["images"]):
        if not isinstance(image, dict) or "filename" not in image or "sentences" not in image:
            raise UsageError(f"--captions {path!r}: images[{index}] needs \"filename\" and \"sentences\" "
                             f"(Karpathy format), received {image!r:.80}")
        name = os.path.join(image.get("filepath", ""), image["filename"])
        for sentence in image["sentences"]:
            text = sentence.get("raw") or " ".join(sentence.get("tokens", [])) if isinstance(sentence, dict) else sentence
            _add(found, warnings, name, text, f"{path} images[{index}]")
        if name not in found:
            warnings.append(f"{path}: image {name} has no captions, skipped")
        if image.get("split") in names:
            splits[name] = names[image["split"]]
    if not found:
        raise UsageError(f"--captions {path!r} holds no captions")
    return CaptionsFile(found, splits=splits or None, warnings=warnings)
