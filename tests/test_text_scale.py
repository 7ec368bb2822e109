"""benchmarks/text_scale.py: its text and its data step, at a toy size (the
measured rows come from `python -m benchmarks.text_scale`)."""

from benchmarks import text_scale


def test_the_text_is_english_like_and_exactly_the_size_asked(tmp_path):
    path = tmp_path / "text.txt"
    text_scale.write_text(path, 50_000, "The first paragraph is here.\n\nThe second one follows it.\n\nA third.")
    content = path.read_text(encoding="ascii")
    assert len(content) == 50_000 and content.startswith("Chapter 1\n\n")
    chapters = content.split("Chapter ")[1:-1]
    assert len(chapters) > 100 and len(set(chapter.split("\n\n", 1)[1] for chapter in chapters)) > 1  # reordered


def test_the_data_step_writes_the_token_file_then_reuses_it(tmp_path):
    path = tmp_path / "text.txt"
    text_scale.write_text(path, 20_000, "Return the value of the named attribute of an object.\n\nSee the docs.")
    first = text_scale.data_step(path, cache_dir=tmp_path / "tokens")
    assert first["written"] and first["characters"] == first["tokens"] == 20_000
    assert first["first_batch"] == [64, 100] and first["token_file"].startswith(str(tmp_path / "tokens"))
    again = text_scale.data_step(path, cache_dir=tmp_path / "tokens")
    assert not again["written"] and again["token_file"] == first["token_file"]
