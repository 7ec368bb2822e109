"""Runs a dlsuite command and SIGKILLs itself at a chosen moment: the faults
of tests/test_kill_resume.py, at points a timer could not hit reliably.

    python kill_worker.py POINT N dlsuite-arguments...

POINT is where the N-th time (counted from 1) the process dies:
    batch       after a training batch (and any checkpoint it wrote)
    checkpoint  inside a checkpoint's write: half of it on disk, not renamed
    model       inside the final model.keras save, the file half written
    export      after the export's SavedModel is written, before its rename
The process exits with the command's status if it never gets there.
"""

import os
import signal
import sys


def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point, count):
    hits = [0]

    def hit():
        hits[0] += 1
        return hits[0] == count

    if point == "batch":
        from dlsuite.apps.core import checkpoints

        original = checkpoints.ResumeCheckpoint.on_train_batch_end

        def on_train_batch_end(self, batch, logs=None):
            original(self, batch, logs)
            if hit():
                die()

        checkpoints.ResumeCheckpoint.on_train_batch_end = on_train_batch_end
    elif point == "checkpoint":
        from dlsuite.apps.core import checkpoints

        savez = checkpoints.np.savez

        def half_savez(file, **arrays):
            if not hit():
                return savez(file, **arrays)
            savez(file, **arrays)
            file.truncate(file.tell() // 2)
            file.flush()
            die()

        checkpoints.np.savez = half_savez
    elif point == "model":
        import keras

        save = keras.Model.save

        def half_save(self, path, *args, **kwargs):
            name = os.path.basename(str(path))
            if not (name.startswith(".model.") and hit()):
                return save(self, path, *args, **kwargs)
            save(self, path, *args, **kwargs)
            os.truncate(path, os.path.getsize(path) // 2)
            die()

        keras.Model.save = half_save
    elif point == "export":
        from dlsuite.apps.caption import export as caption_export
        from dlsuite.apps.core import versions
        from dlsuite.apps.lm import export as lm_export
        from dlsuite.apps.vision import export as vision_export

        write_version = versions.write_version_atomically

        def write_then_die(model_dir, version, write):
            def write_and_die(folder):
                result = write(folder)
                if hit():
                    die()
                return result

            return write_version(model_dir, version, write_and_die)

        for module in (vision_export, lm_export, caption_export):  # each imported the function by name
            module.write_version_atomically = write_then_die
    else:
        raise SystemExit(f"unknown point {point!r}")


if __name__ == "__main__":
    point, count, *argv = sys.argv[1:]
    arm(point, int(count))
    from dlsuite.apps import cli

    sys.exit(cli.main(argv))
