"""Processes forked from a Python that has already imported TensorFlow, for the tests that run
`dlsuite` as real processes (killed, resumed, in clusters) and would otherwise pay TensorFlow's
import, about 5 s of CPU, for each of the dozens they start.

A child is a process of its own: its own pid, environment, working folder and standard streams;
SIGKILL kills it alone; TensorFlow's runtime (its threads, devices, TF_CONFIG) starts in it after
the fork, as in a fresh process. Only the import is shared, so only TensorFlow is preloaded
(it imports Keras with it): dlsuite reads the environment when imported, and each child imports
it itself. Not for a test that needs a process without Keras (a TensorFlow-only client) or with
its own KERAS_HOME: Keras reads that when imported.

    process = zygote.Popen([sys.executable, "kill_worker.py", ...], env=env, stdout=subprocess.PIPE)

takes the arguments of `subprocess.Popen` the tests use (the command as `python SCRIPT`,
`python -m MODULE`, `python -c CODE` or the `dlsuite` console script; env, cwd, stdout, stderr,
text) and gives the methods they call. `run` is `subprocess.run`'s counterpart.

A zygote (one per pytest worker and per value of the variables TensorFlow reads when imported,
started on first use) forks only from its single thread and reaps its children itself,
reporting each exit status to the test that started it. (multiprocessing's forkserver, which
benchmarks/data_scale.py uses, has one server per process started with one environment, and gives
no Popen to stream a child's output or kill it from a test.)
"""

import atexit
import json
import os
import pathlib
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

_DLSUITE_SCRIPT = pathlib.Path(sys.executable).parent / "dlsuite"


# ---------------------------------------------------------------- the zygote process

def _child(request, fds):
    """In the forked child: become the process the request describes; never returns."""
    status = 1
    try:
        for fd, target in zip(fds, (0, 1, 2)):
            os.dup2(fd, target)
        for fd in set(fds):
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        import runpy

        kind, target, argv = request["kind"], request["target"], request["argv"]
        try:
            if kind == "script":
                sys.argv, sys.path[0] = [target, *argv], os.path.dirname(os.path.abspath(target))
                runpy.run_path(target, run_name="__main__")
            elif kind == "module":
                sys.argv, sys.path[0] = [target, *argv], os.getcwd()
                runpy.run_module(target, run_name="__main__", alter_sys=True)
            else:  # code, run as `python -c` runs it (or as the console script, named argv0)
                sys.argv, sys.path[0] = [request["argv0"], *argv], ""
                exec(compile(target, "<string>", "exec"), {"__name__": "__main__"})
            status = 0
        except SystemExit as exit:
            code = exit.code
            status = code if isinstance(code, int) else (0 if code is None else 1)
            if code is not None and not isinstance(code, int):
                print(code, file=sys.stderr)
        except BaseException:  # noqa: BLE001  (a fresh interpreter prints it and exits 1)
            import traceback

            traceback.print_exc()
            status = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(status)


def _serve(path):
    import tensorflow  # noqa: F401  (the import every child shares)

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    parent = os.getppid()
    waiting = {}  # child pid -> the connection that asked for it
    while os.getppid() == parent:  # the pytest worker is gone: so is the zygote
        readable, _, _ = select.select([listener], [], [], 0.05)
        if readable:
            connection, _ = listener.accept()
            message, fds, _, _ = socket.recv_fds(connection, 1 << 20, 3)
            pid = os.fork()
            if pid == 0:
                for other in (listener, connection, *waiting.values()):
                    other.close()
                _child(json.loads(message), fds)
            for fd in fds:
                os.close(fd)
            connection.sendall(f"{pid}\n".encode())
            waiting[pid] = connection
        while waiting:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            connection = waiting.pop(pid, None)
            if connection is not None:
                try:
                    connection.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
                except OSError:
                    pass
                connection.close()


# ---------------------------------------------------------------- the test's side

# TensorFlow and the Keras it imports read these once, when imported (the C++ log level, oneDNN,
# Keras's folder and backend): a child whose values differ from a zygote's gets a zygote of its own.
_READ_AT_IMPORT = ("TF_CPP_MIN_LOG_LEVEL", "TF_CPP_MAX_VLOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS", "KERAS_HOME",
                   "KERAS_BACKEND")
_zygotes = {}  # the values of _READ_AT_IMPORT -> the socket of the zygote started with them


def _address(env):
    """The socket of the zygote for a child with environment `env`, started on first use."""
    key = tuple(env.get(name) for name in _READ_AT_IMPORT)
    if key not in _zygotes:
        path = os.path.join(tempfile.mkdtemp(prefix="dlsuite-zygote-"), "socket")
        zygote_env = {name: value for name, value in os.environ.items() if name not in _READ_AT_IMPORT}
        zygote_env.update({name: value for name, value in zip(_READ_AT_IMPORT, key) if value is not None})
        process = subprocess.Popen([sys.executable, __file__, path], env=zygote_env, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not os.path.exists(path):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the zygote did not start (exit status {process.poll()})")
            time.sleep(0.05)
        atexit.register(process.kill)
        _zygotes[key] = path
    return _zygotes[key]


def _target(args):
    """(kind, target, argv, argv[0] for code) of a command line a test would give subprocess."""
    args = [str(arg) for arg in args]
    if pathlib.Path(args[0]) == _DLSUITE_SCRIPT:  # what the console script runs
        return "code", "import sys; from dlsuite.apps.cli import main; sys.exit(main())", args[1:], args[0]
    if args[0] != sys.executable:
        raise ValueError(f"zygote runs Python commands, not {args[0]}")
    if args[1] == "-m":
        return "module", args[2], args[3:], None
    if args[1] == "-c":
        return "code", args[2], args[3:], "-c"
    return "script", args[1], args[2:], None


def _fd(stream, default, opened):
    """(fd for the child, the read end we keep or None) for a Popen stdout/stderr argument; the fds
    made here for the child are added to `opened`, for the caller to close once they are sent."""
    if stream is None:
        return default, None
    if stream == subprocess.PIPE:
        read, write = os.pipe()
        opened.append(write)
        return write, read
    if stream == subprocess.DEVNULL:
        opened.append(os.open(os.devnull, os.O_WRONLY))
        return opened[-1], None
    return (stream if isinstance(stream, int) else stream.fileno()), None


class Popen:
    """The part of `subprocess.Popen` the tests use, for a child of the zygote."""

    def __init__(self, args, *, env=None, cwd=None, stdout=None, stderr=None, text=False, stdin=None):
        del stdin  # the child reads /dev/null, as the tests' processes do
        kind, target, argv, argv0 = _target(args)
        opened = [os.open(os.devnull, os.O_RDONLY)]
        out_fd, out_read = _fd(stdout, 1, opened)
        err_fd, err_read = (out_fd, None) if stderr == subprocess.STDOUT else _fd(stderr, 2, opened)
        env = dict(os.environ if env is None else env)
        request = {"kind": kind, "target": target, "argv": argv, "argv0": argv0, "cwd": str(cwd or os.getcwd()),
                   "env": env}
        self._connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._connection.connect(_address(env))
        socket.send_fds(self._connection, [json.dumps(request).encode()], [opened[0], out_fd, err_fd])
        for fd in opened:  # the child has its copies now
            os.close(fd)
        self._replies = self._connection.makefile("r")
        self.pid = int(self._replies.readline())
        self.args, self.returncode = args, None
        self.stdout = os.fdopen(out_read, "r" if text else "rb") if out_read is not None else None
        self.stderr = os.fdopen(err_read, "r" if text else "rb") if err_read is not None else None

    def poll(self):
        if self.returncode is None and select.select([self._connection], [], [], 0)[0]:
            self._read_status()
        return self.returncode

    def _read_status(self):
        line = self._replies.readline()
        self.returncode = int(line) if line else -signal.SIGKILL  # the zygote itself died
        self._replies.close()
        self._connection.close()

    def wait(self, timeout=None):
        if self.returncode is None:
            if not select.select([self._connection], [], [], timeout)[0]:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self._read_status()
        return self.returncode

    def send_signal(self, signum):
        if self.poll() is None:  # not yet reaped: the pid is still this child's
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass

    def kill(self):
        self.send_signal(signal.SIGKILL)

    def terminate(self):
        self.send_signal(signal.SIGTERM)

    def communicate(self, timeout=None):
        """(stdout, stderr) read to their ends, then the exit status; TimeoutExpired as subprocess's."""
        results = {}

        def read(name, stream):
            results[name] = stream.read()

        readers = [threading.Thread(target=read, args=(name, stream), daemon=True)
                   for name, stream in (("stdout", self.stdout), ("stderr", self.stderr)) if stream is not None]
        for reader in readers:
            reader.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        for reader in readers:
            reader.join(None if deadline is None else max(0, deadline - time.monotonic()))
            if reader.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout)
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        for stream in (self.stdout, self.stderr):
            if stream is not None:
                stream.close()
        return results.get("stdout"), results.get("stderr")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for stream in (self.stdout, self.stderr):
            if stream is not None and not stream.closed:
                stream.close()
        self.wait()


def run(args, *, capture_output=False, text=False, timeout=None, env=None, cwd=None, stdout=None, stderr=None):
    """`subprocess.run` for a child of the zygote."""
    if capture_output:
        stdout = stderr = subprocess.PIPE
    process = Popen(args, env=env, cwd=cwd, stdout=stdout, stderr=stderr, text=text)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    return subprocess.CompletedProcess(args, process.returncode, out, err)


if __name__ == "__main__":
    _serve(sys.argv[1])
