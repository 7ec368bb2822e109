"""Runs `dlsuite tune APP`'s search with keras-tuner, for every app.

The recipe `run` follows, the seed's advice on tuning: treat the search as
learning on the validation set, so every trial trains on the training split
and is scored on one held-out validation split; sample at random within
ranges (random search is the default; Hyperband and Bayesian optimization are
there too); then take the best trial's model, score it once on the test split
and export it as the app's `train` does.

The tuning directory (`--dir`, default `runs/tune/<app>_<data>_<tuner>`) holds

    tune.json                  what was searched; a rerun must match it to resume
    trials/                    keras-tuner's project: oracle.json, trial_NN/ (trial.json,
                               checkpoint.weights.h5, run.json with worker, time, error)
    trials.csv                 one row a trial: hyperparameters, objective, epochs, time
    best_hyperparameters.json  the best trial's values
    objective.png              the objective against each searched hyperparameter
    metrics.json, model.keras  the best model's test score, and the model (confusion.png for classify)

This module writes tune.json, the run.json of each trial, metrics.json and
the model; `report` writes trials.csv, best_hyperparameters.json and
objective.png from the trial records read here.

Run the same command again and the search resumes: finished trials are kept,
an interrupted one runs again, a larger --max-trials adds trials. A trial
that fails (an infeasible configuration, a NaN or diverging loss) is recorded
with its error and the search goes on, until --max-failures trials fail in a row.

A distributed search uses keras-tuner's own environment variables: the same
command on every machine, with KERASTUNER_ORACLE_IP and KERASTUNER_ORACLE_PORT
naming the chief, and KERASTUNER_TUNER_ID "chief" on the chief (it hands out
trials and reports at the end) and a distinct id on each worker (tuner0,
tuner1, ...: they run the trials).

The apps come from the app table (`apps/table.py`): each names its task and
its `tuning.py` (hyperparameters, default space, objectives). Nothing here
imports TensorFlow or keras-tuner at import time: the parser imports this
module, and `dlsuite --help` stays fast.
"""

import contextlib
import dataclasses
import json
import os
import pathlib
import shutil
import sys
import time
import warnings

from dlsuite.apps import table
from dlsuite.apps.core import atomic, choices, versions
from dlsuite.apps.core.errors import UsageError
from dlsuite.apps.tune import report
from dlsuite.apps.tune import space as search_space

TUNERS = ("random", "hyperband", "bayesian")
PROJECT = "trials"  # keras-tuner's project folder inside --dir
RUN_FILE = "run.json"  # what the worker that ran a trial records beside trial.json
CHECKPOINT = "checkpoint.weights.h5"  # keras-tuner's best-epoch weights of a trial
# The options that must match for a rerun to resume a search (with the space and data options).
RESUME_KEYS = ("app", "tuner", "objective", "seed", "space", "data")
# Options of `tune` itself (the dests of the `cli` parser), as opposed to the app's data options.
_TUNE_OPTIONS = {"app", "tuner", "max_trials", "epochs", "objective", "space", "dir", "overwrite", "max_failures",
                 "strategy", "seed", "export", "export_dir", "no_export", "func", "command", "config"}

def run(args):
    """Checks the input, searches, reports the trials, finishes the best model;
    returns the exit status. `args` is what the `tune APP` parser (`cli`) parsed."""
    entry = table.get(args.app)
    app = entry.search()
    objective = args.objective
    if objective not in app.objectives:
        raise UsageError(f"--objective {objective!r} is not reported by {args.app}; choose one of {', '.join(app.objectives)}")
    role, address = _search_role()
    fixed = {option: getattr(args, option) for option in app.fixing_options if getattr(args, option) is not None}
    if args.space:
        space = search_space.load(args.space, args.app, epochs=args.epochs, options=fixed)
    else:
        space = search_space.build(args.app, epochs=args.epochs, options=fixed)
    if args.tuner == "hyperband" and "epochs" in space.searched():
        raise UsageError("hyperband chooses each trial's epochs itself (up to --epochs); remove 'epochs' from the space")
    if args.strategy in choices.UNTUNABLE_STRATEGIES:
        why = "Keras fit fails under it" if args.strategy == "multi-worker" else "a trial trains with Keras fit, which does not drive it"
        raise UsageError(f"--strategy {args.strategy} cannot train a trial ({why}); spread trials over machines "
                         "with a distributed search instead: see `dlsuite tune --help`")
    if args.export is not None:
        versions.check_export_name(args.export)
    directory = pathlib.Path(args.dir or os.path.join("runs", "tune", f"{args.app}_{_slug(app.data_name(args))}_{args.tuner}"))
    if role != "worker":  # the chief writes the search and the export: both checked before any trial
        atomic.check_writable(directory, what="the tuning directory", option="dir",
                              hint="pass --dir with a writable folder")
        if not args.no_export:
            versions.check_export_dir(args.export_dir)
    max_trials = args.max_trials or (None if args.tuner == "hyperband" else app.max_trials)

    from dlsuite.apps.core import distribute, engine

    task_class = entry.task_class()
    engine.set_intra_op_threads(task_class.intra_op_threads())  # before TensorFlow starts
    strategy = distribute.make_strategy(args.strategy)

    from dlsuite.apps.tune import hypermodels

    engine.set_seed(args.seed, deterministic=engine.device_kind() == "cpu")
    extras = {dest: getattr(args, dest) for dest, _, _ in app.extra_options}
    task = task_class(_app_config(task_class.config_class, args), **extras)
    task.check()
    hypermodel = hypermodels.TaskHyperModel.prepare(
        task, space=space, objective=(objective, app.objectives[objective]), seed=args.seed,
        verbose=1 if sys.stdout.isatty() else 2)
    try:
        return _run_search(args, app, hypermodel, space, directory=directory, max_trials=max_trials, role=role,
                       address=address, strategy=strategy)
    finally:
        hypermodel.close()


def _run_search(args, app, hypermodel, space, *, directory, max_trials, role, address, strategy):
    """Runs the search (or this worker's share of it) and reports; returns the exit status."""
    objective = args.objective
    hypermodel.check()

    settings = json.loads(json.dumps({
        "app": args.app, "tuner": args.tuner, "objective": objective, "seed": args.seed, "space": space.to_json(),
        # The app's data options: a search resumes only on the same data.
        "data": {name: value for name, value in vars(args).items() if name not in _TUNE_OPTIONS},
    }))
    if role != "worker":
        # Every check is done before the first file is written.
        _check_resumable(directory, settings, overwrite=args.overwrite)
        _create(directory)
        if args.overwrite:
            for name in (PROJECT, "metrics.json", "trials.csv", "best_hyperparameters.json", "objective.png"):
                path = directory / name
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        _write_json(directory / "tune.json", {**settings, "max_trials": max_trials, "epochs": args.epochs})

    tuner = _make_tuner(args.tuner, hypermodel, objective=objective, direction=app.objectives[objective],
                        max_trials=max_trials, seed=args.seed, max_failures=args.max_failures, directory=directory,
                        strategy=strategy, epochs=args.epochs, role=role, address=address)
    done = sum(1 for trial in tuner.oracle.trials.values() if trial.status in ("COMPLETED", "FAILED")) if role != "worker" else 0
    print(f"{args.tuner} search over {args.app} ({hypermodel.describe()}), objective {objective} "
          f"({app.objectives[objective]}), {max_trials or 'as many'} trial{'s' if max_trials != 1 else ''}"
          + (f", {done} done before" if done else "") + f"; dir {directory}", flush=True)
    print(f"space: {space.describe()}", flush=True)
    if role == "worker":
        print(f"{tuner.tuner_id}: asking the chief at {address} for trials", flush=True)

    stopped = None
    try:
        tuner.search(verbose=0)
    except _TooManyFailures as failures:  # seen by the chief
        stopped = str(failures)
    except RuntimeError:
        # keras-tuner's own limit (max_consecutive_failed_trials), raised by the oracle.
        if _failure_streak(tuner.oracle) < args.max_failures:
            raise
        stopped = _failures_text(args.max_failures)
    except _rpc_errors(role) as error:  # on a worker: the chief stopped or went away
        details = error.details() if hasattr(error, "details") else str(error)
        print(f"dlsuite: error: the chief at {address} stopped answering ({_last_line(details)}); "
              "see its output for why", file=sys.stderr)
        return 1
    if role == "worker":
        print(f"{tuner.tuner_id}: ran trials {', '.join(tuner.ran) or 'none'}; the chief reports the results")
        return 0
    return _report_and_finish(tuner, hypermodel, space, directory=directory, objective=objective,
                              direction=app.objectives[objective], stopped=stopped, args=args)


def _rpc_errors(role):
    if role != "worker":
        return ()
    import grpc

    return grpc.RpcError


def _slug(text):
    from dlsuite.apps.core import rundir

    return rundir.slug(text)


def _app_config(config_class, args):
    """The app's config dataclass from the data options and --seed (the rest at its defaults)."""
    names = {field.name for field in dataclasses.fields(config_class)} - (_TUNE_OPTIONS - {"seed"})
    return config_class(**{name: getattr(args, name) for name in names if getattr(args, name, None) is not None})


def _search_role():
    """("alone", None), or ("chief" or "worker", "ip:port") from keras-tuner's variables."""
    ip = os.environ.get("KERASTUNER_ORACLE_IP")
    if not ip:
        return "alone", None
    missing = [name for name in ("KERASTUNER_ORACLE_PORT", "KERASTUNER_TUNER_ID") if not os.environ.get(name)]
    if missing:
        raise UsageError(f"KERASTUNER_ORACLE_IP is set ({ip}) but {' and '.join(missing)} not; a distributed search needs "
                         "all three: KERASTUNER_TUNER_ID=chief on the chief and tuner0, tuner1, ... on the workers")
    port = os.environ["KERASTUNER_ORACLE_PORT"]
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"KERASTUNER_ORACLE_PORT must be a port number, received {port!r}")
    role = "chief" if "chief" in os.environ["KERASTUNER_TUNER_ID"] else "worker"
    return role, f"{ip}:{port}"


def _check_resumable(directory, settings, *, overwrite):
    saved_path = directory / "tune.json"
    if overwrite or not saved_path.exists():
        # oracle.json: a search ran here (workers of a starting search write only their tuner files).
        if not overwrite and (directory / PROJECT / "oracle.json").exists():
            raise UsageError(f"{directory} holds trials but no tune.json; pass --overwrite to start over or another --dir")
        return
    try:
        saved = json.loads(saved_path.read_text())
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot read {saved_path} ({error}); pass --overwrite to start over or another --dir") from None
    for key in RESUME_KEYS:
        if saved.get(key) != settings[key]:
            was, now = json.dumps(saved.get(key)), json.dumps(settings[key])
            if len(was) + len(now) > 160 and isinstance(settings[key], dict):
                changed = sorted(k for k in set(settings[key]) | set(saved.get(key) or {})
                                 if (saved.get(key) or {}).get(k) != settings[key].get(k))
                was, now = f"differs in {', '.join(changed)}", ""
            raise UsageError(f"{directory} holds a search with another {key} ({was}{' -> ' + now if now else ''}); "
                             "run the same command to resume it, pass --overwrite to start over, or choose another --dir")


def _create(directory):
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise UsageError(f"cannot write the tuning directory {str(directory)!r} ({error.strerror or error}); "
                         "pass --dir with a writable folder") from None


def _write_json(path, data):
    from dlsuite.apps.core import rundir

    rundir.write_json(path, data)


def _failures_text(count):
    return f"{count} trial{'s' if count > 1 else ''} in a row failed (--max-failures {count})"


def _last_line(text):
    lines = [line.strip() for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


class _TooManyFailures(RuntimeError):
    """The chief saw --max-failures trials in a row fail."""


class _Search:
    """What dlsuite adds to keras-tuner's tuners (mixed in before one):
    the whole space declared up front, a line per trial, a run.json per trial
    (worker, time, error), and a chief that serves trials until they are done."""

    def _configure(self, *, role, address, max_failures):
        self.role, self.address, self.max_failures = role, address, max_failures
        self.ran = []

    # keras-tuner builds a model for every conditional branch to discover the
    # space; ours is declared whole, and building an infeasible first choice
    # would stop the search before it starts. `_make_tuner` installs this as
    # keras-tuner's private hook (compat.POPULATE_INITIAL_SPACE).
    def _declare_initial_space(self):
        hp = self.oracle.get_space()
        self.hypermodel.declare_hyperparameters(hp)
        self.oracle.update_space(hp)

    def run_trial(self, trial, *args, **kwargs):
        # The trial trains in its own folder: history.csv, train.log, backups.
        kwargs["run_dir"] = self.get_trial_dir(trial.trial_id)
        self._results = super().run_trial(trial, *args, **kwargs)
        return self._results

    def on_trial_begin(self, trial):
        self._started, self._results = time.monotonic(), None
        self.ran.append(trial.trial_id)
        values = trial.hyperparameters.values
        shown = ", ".join(f"{name}={report.value_text(values[name])}" for name in self.hypermodel.space.searched() if name in values)
        if "tuner/epochs" in values:
            shown += f", epochs {values['tuner/initial_epoch']}-{values['tuner/epochs']}"
        print(f"trial {trial.trial_id} on {self.tuner_id}: {shown or 'nothing searched'}", flush=True)
        super().on_trial_begin(trial)

    def on_trial_end(self, trial):
        seconds = time.monotonic() - self._started
        failed = trial.status != "COMPLETED"
        error = _last_line(trial.message) if failed else None
        _write_json(pathlib.Path(self.get_trial_dir(trial.trial_id)) / RUN_FILE,
                    {"worker": self.tuner_id, "seconds": seconds, "status": "FAILED" if failed else "COMPLETED", "error": error})
        if failed:
            print(f"trial {trial.trial_id} on {self.tuner_id} failed after {seconds:.1f} s: {error}", flush=True)
        else:
            metrics = self._results[0] if isinstance(self._results, list) else self._results
            objective = self.hypermodel.objective
            print(f"trial {trial.trial_id} on {self.tuner_id}: {objective} {metrics[objective]:.4f} at epoch "
                  f"{int(metrics['best_epoch'])}/{int(metrics['epochs'])}, {seconds:.1f} s", flush=True)
        super().on_trial_end(trial)

    def search(self, *args, **kwargs):
        if self.role != "chief":
            return super().search(*args, **kwargs)
        self.oracle.verbose = 0
        self.save()
        _serve(self.oracle, address=self.address, max_failures=self.max_failures)


def _make_tuner(kind, hypermodel, *, objective, direction, max_trials, seed, max_failures, directory, strategy, epochs,
                role, address):
    import keras_tuner

    from dlsuite.models import compat

    base = {"random": keras_tuner.RandomSearch, "hyperband": keras_tuner.Hyperband,
            "bayesian": keras_tuner.BayesianOptimization}[kind]
    tuner_class = type(base.__name__, (_Search, base), {compat.POPULATE_INITIAL_SPACE: _Search._declare_initial_space})
    common = dict(
        hypermodel=hypermodel, objective=keras_tuner.Objective(objective, direction),
        # keras-tuner takes seed 0 for "pick one at random".
        seed=seed + 1, max_consecutive_failed_trials=max_failures,
        directory=str(directory), project_name=PROJECT, overwrite=False, distribution_strategy=strategy,
    )
    if kind == "hyperband":
        tuner = tuner_class(max_epochs=epochs, factor=3, **common)
        tuner.oracle.max_trials = max_trials  # None: as many as the brackets need
    else:
        tuner = tuner_class(max_trials=max_trials, **common)
    tuner._configure(role=role, address=address, max_failures=max_failures)
    return tuner


def _failure_streak(oracle):
    streak = 0
    for trial_id in oracle.end_order:
        streak = streak + 1 if oracle.trials[trial_id].status == "FAILED" else 0
    return streak


def _serve(oracle, *, address, max_failures, poll_s=1.0):
    """Serves the chief's oracle to the workers with keras-tuner's gRPC
    servicer until every trial is done.

    keras-tuner's own loop (`oracle_chief.start_server`) checks for the end
    every 20 s once the last trial is out; this one checks every second, prints
    each finished trial, and stops when --max-failures trials in a row failed
    (keras-tuner raises that inside the worker's gRPC call, so the chief would
    wait forever).
    """
    from concurrent import futures

    import grpc

    from dlsuite.models import compat

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    servicer = compat.add_oracle_servicer(oracle, server)
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if not bound:
        raise UsageError(f"the chief cannot listen on {address}; set KERASTUNER_ORACLE_PORT to a free port "
                         "(and KERASTUNER_ORACLE_IP to an address of this machine)")
    server.start()
    print(f"chief: serving trials at {address}", flush=True)
    reported = 0
    try:
        while True:
            time.sleep(poll_s)
            ended = list(oracle.end_order)
            for trial_id in ended[reported:]:
                trial = oracle.trials[trial_id]
                result = f"{oracle.objective.name} {trial.score:.4f}" if trial.status == "COMPLETED" else "failed"
                print(f"chief: trial {trial_id} done: {result}", flush=True)
            reported = len(ended)
            if _failure_streak(oracle) >= max_failures:
                raise _TooManyFailures(_failures_text(max_failures))
            if compat.search_finished(oracle, servicer):
                return
    finally:
        server.stop(grace=1)

def _trial_rows(tuner, directory):
    """One row per trial, from the oracle's records and the workers' run.json."""
    rows = []
    for trial in sorted(tuner.oracle.trials.values(), key=lambda t: int(t.trial_id)):
        run = {}
        run_path = directory / PROJECT / f"trial_{trial.trial_id}" / RUN_FILE
        if run_path.exists():
            run = json.loads(run_path.read_text())
        status = trial.status
        if status not in ("COMPLETED", "FAILED") and run.get("status") == "FAILED":
            status = "FAILED"  # the failure that stopped the search, which keras-tuner did not save

        def metric(name):
            return trial.metrics.get_last_value(name) if trial.metrics.exists(name) else None

        epochs, best_epoch = metric("epochs"), metric("best_epoch")
        rows.append(report.TrialRow(
            trial_id=trial.trial_id, status=status, values=dict(trial.hyperparameters.values),
            score=trial.score if status == "COMPLETED" else None,
            epochs=int(epochs) if epochs is not None else None, best_epoch=int(best_epoch) if best_epoch is not None else None,
            seconds=run.get("seconds", metric("seconds")), worker=run.get("worker"),
            error=run.get("error") or (_last_line(trial.message) if status == "FAILED" else None),
        ))
    return rows

def _report_and_finish(tuner, hypermodel, space, *, directory, objective, direction, stopped, args):
    best = report.summarize(_trial_rows(tuner, directory), space, directory=directory, objective=objective,
                            direction=direction, stopped=stopped)
    if best is None:
        return 1
    return _finish(tuner, hypermodel, best, directory=directory, objective=objective, args=args)


def _finish(tuner, hypermodel, best, *, directory, objective, args):
    """Restores (or retrains) the best trial's model, scores it once on the
    test split, saves and exports it; a rerun that finds this done already
    says so instead of exporting again."""
    metrics_path = directory / "metrics.json"
    if metrics_path.exists():
        previous = json.loads(metrics_path.read_text())
        exported = previous.get("export") is None if args.no_export else (
            previous.get("export") and pathlib.Path(previous["export"]).exists())
        if previous.get("status") == "finished" and previous.get("best_trial") == best.trial_id and exported:
            print(f"the best trial {best.trial_id} was already scored and exported: test "
                  + ", ".join(f"{k[5:]} {v:.4f}" for k, v in previous.items() if k.startswith("test_") and isinstance(v, float))
                  + (f"; export {previous['export']}" if previous.get("export") else ""))
            return 0
    trial = tuner.oracle.get_trial(best.trial_id)
    checkpoint = pathlib.Path(tuner.get_trial_dir(best.trial_id)) / CHECKPOINT
    if checkpoint.exists():
        model, how = _restore(tuner, trial, checkpoint), "restored from its best epoch"
    else:  # another machine ran it: train again with its hyperparameters
        model, how = _retrain(tuner, hypermodel, trial, directory), "retrained"
    summary = hypermodel.finish(model, trial.hyperparameters.copy(), out_dir=directory, export_name=args.export, export_dir=args.export_dir,
                                no_export=args.no_export)
    _write_json(metrics_path, {"status": "finished", "best_trial": best.trial_id, "how": how,
                               f"best_{objective}": best.score, **summary})
    figures = ", ".join(f"{key.removeprefix('test_')} {value:.4f}" for key, value in summary.items() if isinstance(value, float))
    print(f"best model ({how}): test {figures}; metrics.json, model.keras in {directory}"
          + (f"; export {summary['export']}" if summary.get("export") else ""), flush=True)
    return 0


def _build(tuner, hp):
    import keras

    keras.backend.clear_session()
    strategy = tuner.distribution_strategy
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        return tuner.hypermodel.build(hp)


def _restore(tuner, trial, checkpoint):
    """The best trial's model at its best epoch (keras-tuner's checkpoint)."""
    model = _build(tuner, trial.hyperparameters.copy())
    with warnings.catch_warnings():
        # A trial that recompiled (transfer's phase 2) saved a larger optimizer;
        # only the weights matter here.
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        model.load_weights(str(checkpoint))
    return model


def _retrain(tuner, hypermodel, trial, directory):
    import keras

    hp = trial.hyperparameters.copy()
    path = directory / "retrain.weights.h5"
    model = _build(tuner, hp)
    checkpoint = keras.callbacks.ModelCheckpoint(str(path), monitor=hypermodel.objective, mode=hypermodel.direction,
                                                 save_best_only=True, save_weights_only=True)
    hypermodel.fit(hp, model, callbacks=[checkpoint], epochs=hp.values.get("tuner/epochs"), run_dir=directory / "retrain")
    model.load_weights(str(path))
    path.unlink()
    return model
