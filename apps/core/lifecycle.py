"""The run lifecycle: one recipe that trains, scores and ships any task.

    1. check the config and every output path (nothing written yet)
    2. strategy (first: multi-worker needs it before any TensorFlow op),
       seed, precision
    3. load the data, fix the batch size, build the model in the strategy's
       scope: a bad dataset, weight file or layer count fails here, and a run
       directory this step made is removed again
    4. the run directory (the chief's; a scratch one on the other workers),
       config.json
    5. each phase through `engine.fit`, resumed where an interrupted run left it
    6. on the chief: curves, the best model, test scoring, model.keras,
       export, metrics.json

`--resume RUN_DIR` goes through the same steps with the run's saved config,
in the precision policy it recorded (not one decided anew on this machine):
a phase that finished is read back, the interrupted one continues from its
last checkpoint (mid-epoch, exactly: `checkpoints`), a phase not reached yet
starts. The checkpoints go only once metrics.json is written, so a run
killed while it scores or exports resumes into those steps.
"""

import dataclasses
import os
import pathlib
import shutil

from dlsuite.apps.core import export_precision, train_args, versions
from dlsuite.apps.core.errors import UsageError

# What a finished or stopped run leaves; a run that has it is not resumed.
METRICS_FILE = "metrics.json"


def check_outputs(config):
    """Raises UsageError for a run directory, export name or export folder
    that cannot be written; creates nothing."""
    from dlsuite.apps.core import atomic

    atomic.check_writable(config.out or "runs", what="the run directory", option="out",
                          hint="pass --out with a folder you can write to")
    if config.no_export:
        return
    if config.export is not None:
        versions.check_export_name(config.export)
    versions.check_export_dir(config.export_dir)


def _check_export_precision(config, policy):
    """Refuses, before training, a bfloat16 export of a model that will not train in bfloat16."""
    if config.no_export or config.export_precision != "bfloat16" or policy == "mixed_bfloat16":
        return
    raise UsageError(f"--export-precision bfloat16 needs a model trained in mixed_bfloat16, and this run trains in "
                     f"{policy}: pass --mixed-precision on (bfloat16 on a CPU), or --export-precision float32",
                     option="export_precision")


def check_resumable(run_dir):
    """Raises UsageError unless `run_dir` holds a run that can go on."""
    run_dir = pathlib.Path(run_dir)
    if (run_dir / METRICS_FILE).exists():
        raise UsageError(f"resume {str(run_dir)!r}: that run finished; start a new run instead "
                         f"({run_dir / METRICS_FILE} says how it ended)", option="resume")


def resumed_config(config_class, run_dir):
    """The config an interrupted run saved, checked to be resumable."""
    config = train_args.saved_config(config_class, run_dir)
    check_resumable(run_dir)
    return config


def recorded_precision(run_dir):
    """The `engine.Precision` a run's config.json recorded (resolved.policy and
    policy_reason), which its resume trains in; None where it holds none.

    Raises:
        UsageError: config.json records a policy that is not one of engine.POLICIES.
    """
    from dlsuite.apps.core import engine, rundir

    path = pathlib.Path(run_dir) / "config.json"
    try:
        saved = rundir.read_json(path)
    except (OSError, ValueError):  # no readable config: `resumed_config` says so
        return None
    resolved = saved.get("resolved") if isinstance(saved, dict) else None
    policy = resolved.get("policy") if isinstance(resolved, dict) else None
    if policy is None:
        return None
    if policy not in engine.POLICIES:
        raise UsageError(f"resume {str(run_dir)!r}: {path} records the policy {policy!r}, not one of "
                         f"{', '.join(engine.POLICIES)} (was config.json edited?)", option="resume")
    why = resolved.get("policy_reason")
    return engine.Precision(policy, f"resume: the policy this run started in; {why}" if why else
                            "resume: the policy this run started in, from its config.json")


def phase_state(phase_dir):
    """"new", "interrupted" (a checkpoint to go on from) or "finished", from what a phase left.

    Raises:
        UsageError: the phase trained epochs but their checkpoints are gone
            (going on from fresh weights would quietly end worse).
    """
    from dlsuite.apps.core import checkpoints, engine, rundir

    paths = engine.run_paths(phase_dir)
    store = checkpoints.Store(paths["resume"])
    if store.finished:
        return "finished"
    if store.has_any():
        return "interrupted"
    trained = len(rundir.read_history(paths["history"]).get("loss", []))
    # One epoch's row without a checkpoint is a kill between the two writes;
    # more, or a checkpoint noted but gone, is a run whose checkpoints were deleted.
    if store.was_written() or trained > 1:
        raise UsageError(f"resume {str(phase_dir)!r}: {trained} epochs were trained but their checkpoints in "
                         f"{store.folder} are gone; the run cannot go on from where it stopped: start a new run",
                         option="resume")
    return "new"  # not started, or killed before its first checkpoint


def run(task, *, run_dir=None):
    """Runs `task` end to end; returns the exit status.

    Args:
        task: a `task.Task` holding its config.
        run_dir: an interrupted run's directory to resume, or None for a new run.
    """
    config = task.config
    task.check()
    check_outputs(config)
    if run_dir is not None:
        check_resumable(run_dir)

    import tensorflow as tf

    from dlsuite.apps.core import distribute, engine

    engine.set_intra_op_threads(task.intra_op_threads())  # before TensorFlow starts
    strategy = distribute.make_strategy(config.strategy)  # before any other TensorFlow op

    chief = distribute.is_chief(strategy)
    device = engine.device_kind()
    engine.set_seed(config.seed, deterministic=device == "cpu")
    precision = engine.set_precision(config.mixed_precision, device,
                                     recorded=recorded_precision(run_dir) if run_dir is not None else None)
    _check_export_precision(config, precision.policy)
    task.load_data()
    batch_size = task.batch_size(config.batch_size or engine.default_batch_size(device))

    resume_root = run_dir  # every worker reads the chief's checkpoints there (a shared file system, as config.json)
    resume = run_dir is not None
    run_dir, created = _run_directory(task, run_dir, strategy, chief)
    try:
        task.prepare_inputs(run_dir)
        with strategy.scope():
            model = task.build_model()
        batches = task.batches(batch_size)
        if chief and not resume:
            from dlsuite.apps.core import rundir

            rundir.write_json(run_dir / "config.json", {"config": config, "resolved": {
                **task.resolved(model, batches), "batch_size": batches.batch_size, "policy": precision.policy,
                "policy_reason": precision.reason, "device": device,
                "strategy": type(strategy).__name__, "replicas": strategy.num_replicas_in_sync,
                "parameters": model.count_params(),
                "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads()}})  # 0: TensorFlow's choice
            task.write_inputs(run_dir)
    except UsageError:  # bad input (or a full disk) found only now: leave nothing behind
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    print(f"{task.describe(model, batches)}, {model.count_params():,} parameters, "
          f"{distribute.describe(strategy)}; run dir {run_dir}", flush=True)
    print(f"precision: {precision.policy} ({precision.reason})", flush=True)
    if distribute.is_parameter_server(strategy):
        from dlsuite.apps.core import parameter_server

        sharding = parameter_server.describe_sharding(model)
        if sharding:
            print(sharding, flush=True)

    trained = train_phases(task, model, batches, strategy=strategy, run_dir=run_dir, resume=resume,
                           resume_root=resume_root)
    if not chief:  # the chief scores and exports
        engine.release_worker_dir(run_dir)
        return 0
    return finish(task, model, trained, run_dir=run_dir, batches=batches)


def _run_directory(task, run_dir, strategy, chief):
    """(run directory, the folder to remove if the run fails before training,
    or None): the resumed one, the chief's new one, or a worker's scratch copy
    (TensorFlow's convention)."""
    from dlsuite.apps.core import distribute, rundir

    config = task.config
    if not chief:
        return pathlib.Path(distribute.worker_dir(config.out or f"runs/{task.app}/worker", strategy)), None
    if run_dir is not None:
        return pathlib.Path(run_dir), None
    path = rundir.run_path(config.out, task.app)
    missing = [folder for folder in (path, *path.parents) if not folder.exists()]
    return rundir.create(path, task.app), (missing[-1] if missing else None)  # runs/ itself on a first run


@dataclasses.dataclass
class Trained:
    """What the phases of a run left: the merged history, the best
    checkpoint over all phases, each phase's epochs, or why training stopped."""

    history: dict
    best_checkpoint: str | None
    phase_epochs: dict
    stopped: object = None  # the loop_parts.FitResult of a phase that stopped (NaN)
    phase_dirs: list = dataclasses.field(default_factory=list)  # where each phase keeps its checkpoints


def train_phases(task, model, batches, *, strategy, run_dir, resume=False, callbacks=(), initial_epoch=0,
                 verbose=None, trial=False, resume_root=None):
    """Trains `model` through each of `task.phases()`; returns a `Trained`.

    A phase with a name trains in `run_dir/<name>`; the model goes into the
    next phase with the best weights of the one before. Fine-tuning may not
    beat the phase before it, so the best checkpoint over all phases counts.

    With `trial` (a tuner's trial, compiled by its `build`), the phases lie
    on one epoch axis from `initial_epoch` (Hyperband continues a trial
    there) and keras-tuner keeps the best epoch's weights instead of
    checkpoints/best.keras.

    `resume_root` is the run directory being resumed, whose checkpoints
    every worker of a cluster resumes from (a worker trains in a scratch
    `run_dir`); by default `run_dir`.
    """
    from dlsuite.apps.core import engine, rundir

    phases = [phase for phase in task.phases() if phase.epochs > 0]
    history, phase_epochs, best, phase_dirs = {}, {}, (float("inf"), None), []
    start = 0  # the phase's first epoch on a trial's epoch axis
    for index, phase in enumerate(phases):
        end = start + phase.epochs
        first = max(start, initial_epoch) if trial else 0
        start = end
        if trial and initial_epoch >= end:
            continue
        phase_dir = run_dir / phase.name if phase.name else run_dir
        resume_dir = pathlib.Path(resume_root or run_dir) / (phase.name or "")
        phase_dirs.append(phase_dir)
        state = phase_state(resume_dir) if resume else "new"
        if resume and state == "new" and index == 0:
            print(f"resume {run_dir}: no checkpoint was written before the run stopped; it starts over", flush=True)
        with strategy.scope():
            described = phase.prepare(model) if phase.prepare and not (trial and index == 0) else None
        if state == "finished":
            result = _read_back(resume_dir)
            print(f"phase {phase.name or 'train'}: finished before ({len(result.history.get('loss', []))} epochs), "
                  "read back", flush=True)
        else:
            if len(phases) > 1 and not trial:
                print(f"phase {phase.name}: {phase.epochs} epochs"
                      + (f", {described}" if described else "") + f", lr {phase.optimizer.learning_rate:g}"
                      + (", resumed" if state == "interrupted" else ""), flush=True)
            result = engine.fit(
                model, batches.train, batches.validation, strategy=strategy, optimizer_config=phase.optimizer,
                loss=task.loss(), metrics=task.metrics, epochs=end if trial else phase.epochs,
                steps_per_epoch=batches.steps_per_epoch, global_batch_size=batches.batch_size, run_dir=phase_dir,
                early_stopping=task.config.early_stopping, jit_compile=engine.jit_setting(task.config.jit_compile),
                resume=state == "interrupted", monitors=task.config.monitor or (),
                callbacks=[*task.metric_callbacks(), *callbacks], initial_epoch=first, verbose=verbose,
                compile=not (trial and index == 0), best_checkpoint=not trial,
                checkpoint_every=None if trial else task.config.checkpoint_every, resume_dir=resume_dir,
            )
        phase_epochs[phase.name] = len(result.history.get("loss", []))
        for key, values in result.history.items():
            history.setdefault(key, []).extend(values)
        if result.stopped_reason:
            return Trained(history, best[1], phase_epochs, stopped=result, phase_dirs=phase_dirs)
        phase_best = min(result.history.get("val_loss") or [float("inf")])
        if result.best_checkpoint and (best[1] is None or phase_best <= best[0]):
            best = (phase_best, result.best_checkpoint)
        if result.best_checkpoint and index + 1 < len(phases):
            model.load_weights(result.best_checkpoint)  # the next phase starts from this one's best
    if any(phase.name for phase in phases):  # the run's own history.csv: every phase's epochs
        rundir.write_history(run_dir / "history.csv", history)
    return Trained(history, best[1], phase_epochs, phase_dirs=phase_dirs)


def _read_back(phase_dir):
    """The FitResult of a phase that finished before the run was interrupted."""
    from dlsuite.apps.core import engine, loop_parts, rundir

    paths = engine.run_paths(phase_dir)
    history = rundir.read_history(paths["history"])
    history.pop("epoch", None)
    best = paths["best"] if os.path.exists(paths["best"]) else None
    return loop_parts.FitResult(history=history, stopped_reason=None, best_checkpoint=best,
                            epochs_run=len(history.get("loss", [])))


def finish(task, model, trained, *, run_dir, batches):
    """The chief's part after training: curves, the best model, its test
    score, model.keras, the export and metrics.json; returns the exit status."""
    from dlsuite.apps.core import engine, loop_parts, rundir

    if trained.history:
        rundir.plot_curves(trained.history, run_dir / "curves.png", title=task.title())
    if trained.stopped is not None:  # metrics.json says why, and the run is not resumed
        status = engine.report_stop(trained.stopped, run_dir)
        _drop_checkpoints(trained)
        return status
    model = engine.final_model(loop_parts.FitResult(trained.history, None, trained.best_checkpoint, 0), model)
    config = task.config
    if config.precise_bn is not None:
        figures, report = _with_precise_batch_norm(task, model, batches, run_dir)
    else:
        figures, report = task.evaluate(model, run_dir), None
    task.save_model(model, run_dir / "model.keras")
    metrics = {"status": "finished", **figures, "epochs_run": len(trained.history.get("loss", []))}
    if report is not None:
        metrics["precise_bn"] = report
    if trained.history.get("val_loss"):
        metrics.setdefault("validation_loss", min(trained.history["val_loss"]))
    if len(trained.phase_epochs) > 1:
        metrics["phases"] = trained.phase_epochs
    metrics["export"] = None if config.no_export else str(task.export(
        export_precision.in_precision(model, config.export_precision), figures, name=config.export,
        base_dir=config.export_dir))
    rundir.write_json(run_dir / METRICS_FILE, metrics)
    _drop_checkpoints(trained)
    print(f"{task.report(metrics)}; run dir {run_dir}" + (f"; export {metrics['export']}" if metrics["export"] else ""))
    return 0


def _drop_checkpoints(trained):
    """The run ended (metrics.json is written): nothing is left to resume."""
    from dlsuite.apps.core import checkpoints, engine

    for phase_dir in trained.phase_dirs:
        checkpoints.Store(engine.run_paths(phase_dir)["resume"]).clear()


def _with_precise_batch_norm(task, model, batches, run_dir):
    """--precise-bn: scores `model` with its moving averages and with
    recomputed population statistics, and keeps whichever validates better
    (lower validation loss); returns (the kept model's test figures, the
    report for metrics.json)."""
    from dlsuite.apps.core import precise_bn

    moving_weights = model.get_weights()
    moving = {"validation_loss": _validation_loss(task, model, batches), "test": task.evaluate(model, None)}
    from dlsuite.apps.core import epochs

    used = precise_bn.recompute(model, epochs.as_dataset(batches.train), max_batches=task.config.precise_bn or None)
    if not used:
        print("precise batch norm: no batch normalization to recompute", flush=True)
        return task.evaluate(model, run_dir), {"batches": 0}
    recomputed = {"validation_loss": _validation_loss(task, model, batches), "test": task.evaluate(model, run_dir)}
    kept = "recomputed" if recomputed["validation_loss"] <= moving["validation_loss"] else "moving_average"
    if kept == "moving_average":
        model.set_weights(moving_weights)
        task.evaluate(model, run_dir)  # its plots
    scores = {"moving_average": moving, "recomputed": recomputed}
    print(f"precise batch norm over {used} batches: validation loss {moving['validation_loss']:.4f} with the moving "
          f"averages, {recomputed['validation_loss']:.4f} recomputed; keeping the {kept.replace('_', ' ')}", flush=True)
    task.batch_norm_statistics = kept  # the export says which
    return scores[kept]["test"], {
        "batches": used, "exported": kept,
        "validation_loss": {name: score["validation_loss"] for name, score in scores.items()},
        "test": {name: {key: value for key, value in score["test"].items() if isinstance(value, float)}
                 for name, score in scores.items()},
    }


def _validation_loss(task, model, batches):
    """The mean loss of `model` on the validation batches."""
    model.compile(loss=task.loss())
    result = model.evaluate(batches.validation, verbose=0, return_dict=True)
    return float(result["loss"])


def run_from_args(task_class, args):
    """`APP train` with parsed `args`: a new run, or `--resume RUN_DIR`."""
    if getattr(args, "resume", None):
        config = resumed_config(task_class.config_class, args.resume)
        return run(task_class(config), run_dir=pathlib.Path(args.resume))
    return run(task_class(train_args.config_from_args(task_class.config_class, args)))

