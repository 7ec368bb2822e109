"""One task of the parameter-server tests in `test_parameter_server.py`.

Run as `python ps_cluster_task.py dlsuite ARGS...` with TF_CONFIG set: the
`dlsuite` command line, with `engine.fit` dispatching a
`ParameterServerStrategy` to `parameter_server.fit` where engine.py does not
do it itself yet.
"""

import inspect
import sys


def _dispatching_fit():
    from dlsuite.apps.core import distribute, engine, parameter_server

    if "parameter_server" in inspect.getsource(engine.fit):
        return
    plain_fit = engine.fit

    def fit(model, train, validation, *, strategy, run_dir, **kwargs):
        if not distribute.is_parameter_server(strategy):
            return plain_fit(model, train, validation, strategy=strategy, run_dir=run_dir, **kwargs)
        for unused in ("jit_compile", "monitors", "compile"):
            kwargs.pop(unused, None)
        resume_dir = kwargs.pop("resume_dir", None)
        kwargs["resume_paths"] = engine.run_paths(resume_dir) if resume_dir else None
        return parameter_server.fit(model, train, validation, strategy=strategy, paths=engine.run_paths(run_dir),
                                    **kwargs)

    engine.fit = fit


if __name__ == "__main__":
    from dlsuite.apps import cli

    _dispatching_fit()
    sys.exit(cli.main(sys.argv[2:]))
