"""Text at scale: the memory and time of `lm train --text FILE --max-chars 0`'s data step.

    python -m benchmarks.text_scale             # 10, 100 and 500 MB of text
    python -m benchmarks.text_scale --quick     # 1 MB
    python -m benchmarks.text_scale --sizes 50  # any sizes, in MB

For each size a text file is written (the standard library's docstrings,
`text.default_corpus()`, repeated as chapters, each with its paragraphs in
another seeded order), then `lm train`'s data step runs through the task's
own code in a fresh Python process: `LanguageModelTask.load_data` (reading,
vocabulary, token file, split, unigram baseline), `batches`, and the first
training batch of epoch 0. The peak resident memory is the child's
`ru_maxrss` (`os.wait4`), so each figure is that run's alone, TensorFlow's
import included; the seconds are the data step's, after the imports. Each
size runs twice: first with an empty token cache (the token file is
written), then again (it is reused). `--quick` forks each run from
multiprocessing's forkserver instead (the one `data_scale --quick` started,
when it ran first), which imported TensorFlow once: a forked process counts
only the pages it touches, so its peak is lower than a fresh process's.

Issue #25's target: 500 MB of text under 2 GB of peak resident memory (the
in-memory loader held 1.23 GB for a 204 MB file with the default cap, before
the first batch). `text_rows` returns the rows; run as a script, this module
prints one JSON line per row, then a table.
"""

import argparse
import concurrent.futures
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from benchmarks import common

FULL_SIZES_MB = (10, 100, 500)
QUICK_SIZES_MB = (1,)
# --quick's 1 MB repeats this much of the corpus (reading all of the standard library's takes 2 s).
QUICK_CORPUS_CHARS = 300_000
BAR_MIB = 2048  # #25: 500 MB of text under 2 GB
MB = 10**6
MIB = 2**20


def write_text(path, size_bytes, corpus):
    """Writes `size_bytes` of English-like text to `path`, a chapter at a time.

    Chapter i is "Chapter i" and the paragraphs of `corpus` in an order drawn
    from seed i, so no two chapters repeat each other word for word.
    """
    import numpy as np

    paragraphs = corpus.split("\n\n")
    written, chapter = 0, 0
    with open(path, "wb") as file:
        while written < size_bytes:
            chapter += 1
            order = np.random.default_rng(chapter).permutation(len(paragraphs))
            body = "\n\n".join(paragraphs[i] for i in order)
            block = f"Chapter {chapter}\n\n{body}\n\n".encode()
            block = block[:size_bytes - written]  # ASCII: every cut is a character boundary
            file.write(block)
            written += len(block)


def data_step(path, *, cache_dir, level="char"):
    """`lm train --text path --max-chars 0`'s data step in this process; returns what it found."""
    from dlsuite.apps.lm import text  # noqa: F401  (TensorFlow's import, before the clock starts)
    from dlsuite.apps.lm.task import LanguageModelTask, LMConfig

    started = time.perf_counter()
    task = LanguageModelTask(LMConfig(text=str(path), max_chars=0, level=level, token_cache=str(cache_dir)))
    task.check()
    task.load_data()
    batches = task.batches(task.config.batch_size)
    x, _ = next(iter(batches.train.epoch(0)))
    return {"seconds": time.perf_counter() - started, "characters": task.characters, "tokens": task.tokens,
            "vocabulary_size": task.vocabulary.size, "token_file": str(task.corpus.token_file),
            "token_file_mib": task.corpus.token_file.stat().st_size / MIB, "written": task.corpus.seconds is not None,
            "first_batch": list(x.shape), "steps_per_epoch": batches.steps_per_epoch}


def _forked_step(path, cache_dir, level):
    """`data_step` in a process forked from the forkserver: (its result, the process's peak resident MiB)."""
    gc.freeze()  # as benchmarks/data_scale.py's forked children do: the server's objects stay uncopied
    result = data_step(path, cache_dir=cache_dir, level=level)
    return result, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MIB  # KiB on Linux


def run_child(path, *, cache_dir, level, fork=False):
    """`data_step` in a fresh Python process, or with `fork` one forked from multiprocessing's
    forkserver: (its result, its peak resident MiB, its wall seconds)."""
    if fork:
        context = common.forkserver(["dlsuite.apps.lm.task"])  # data_scale's, when it started one first
        started = time.perf_counter()
        # One worker for one task: every run is a process of its own.
        with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            result, peak = pool.submit(_forked_step, str(path), str(cache_dir), level).result()
        return result, peak, time.perf_counter() - started
    command = [sys.executable, "-m", "benchmarks.text_scale", "--child", str(path), "--cache-dir", str(cache_dir),
               "--level", level]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
    started = time.perf_counter()
    with tempfile.TemporaryFile() as errors:
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, env=env,
                                 cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        out = child.stdout.read()
        _, status, usage = os.wait4(child.pid, 0)  # the child's own rusage: its peak, not the largest so far
        child.returncode = os.waitstatus_to_exitcode(status)
        child.stdout.close()
        wall = time.perf_counter() - started
        if child.returncode != 0:
            errors.seek(0)
            raise RuntimeError(f"{' '.join(command)} exited {child.returncode}:\n{errors.read().decode()[-3000:]}")
    result = json.loads(out.decode().strip().splitlines()[-1])
    return result, usage.ru_maxrss * 1024 / MIB, wall  # ru_maxrss is in KiB on Linux


def text_rows(sizes_mb=FULL_SIZES_MB, quick=False, *, level="char"):
    """Measures the data step on texts of each size; returns one row (a dict) per size.

    Args:
        sizes_mb: the sizes of the texts, in MB (10**6 bytes).
        quick: 1 MB instead of `sizes_mb`, each run forked from the forkserver.
        level: "char" or "word".

    Returns:
        Rows with `name`, `size_mb`, `characters`, `tokens`, `token_file_mib`,
        `peak_mib` and `seconds` (the token file written), `reuse_peak_mib`
        and `reuse_seconds` (it reused), `process_seconds`, `bar_mib`,
        `meets_bar`, and the machine.
    """
    from dlsuite.apps.lm import text

    sizes_mb = QUICK_SIZES_MB if quick else tuple(sizes_mb)
    corpus = text.default_corpus(max_chars=QUICK_CORPUS_CHARS) if quick else text.default_corpus()
    rows = []
    with tempfile.TemporaryDirectory(prefix="dlsuite-text-scale-") as folder:
        for size_mb in sizes_mb:
            path = os.path.join(folder, f"text_{size_mb}mb.txt")
            write_text(path, int(size_mb * MB), corpus)
            cache_dir = os.path.join(folder, f"tokens_{size_mb}mb")
            written, peak, wall = run_child(path, cache_dir=cache_dir, level=level, fork=quick)
            reused, reuse_peak, _ = run_child(path, cache_dir=cache_dir, level=level, fork=quick)
            assert written["written"] and not reused["written"], (written, reused)
            rows.append({
                "name": f"text_scale_{level}_{size_mb}mb", "mode": "quick" if quick else "full", "size_mb": size_mb,
                "level": level, "characters": written["characters"], "tokens": written["tokens"],
                "vocabulary_size": written["vocabulary_size"], "token_file_mib": round(written["token_file_mib"], 1),
                "peak_mib": round(peak, 1), "seconds": round(written["seconds"], 2),
                "reuse_peak_mib": round(reuse_peak, 1), "reuse_seconds": round(reused["seconds"], 2),
                "process_seconds": round(wall, 1), "first_batch": written["first_batch"],
                "steps_per_epoch": written["steps_per_epoch"], "bar_mib": BAR_MIB, "meets_bar": peak < BAR_MIB,
                **common.machine(),
            })
            os.remove(path)  # the next size's disk
    return rows


def _table(rows):
    lines = ["| text | tokens | token file | peak, written | seconds | peak, reused | seconds |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {row['size_mb']} MB | {row['tokens']:,} | {row['token_file_mib']:.0f} MiB "
              f"| {row['peak_mib']:.0f} MiB | {row['seconds']:.1f} | {row['reuse_peak_mib']:.0f} MiB "
              f"| {row['reuse_seconds']:.1f} |" for row in rows]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"texts of {' and '.join(map(str, QUICK_SIZES_MB))} MB")
    parser.add_argument("--sizes", type=lambda value: [int(size) for size in value.split(",")],
                        default=list(FULL_SIZES_MB), help="text sizes in MB, comma-separated (default 10,100,500)")
    parser.add_argument("--level", choices=("char", "word"), default="char")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one data step, in the process run_child starts
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(data_step(args.child, cache_dir=args.cache_dir, level=args.level)), flush=True)
        return
    rows = text_rows(args.sizes, quick=args.quick, level=args.level)
    for row in rows:
        print(json.dumps(row), flush=True)
    print(_table(rows))


if __name__ == "__main__":
    main()
