"""The command line in the test's own process: `support-gateway ARGS` on real files.

A command run as a child process pays ~0.8 s of interpreter start and imports before it
does anything; the suite ran about a hundred of them. `run` calls the same entry point the
executable calls (`gateway.entry.main`: pipe-mode `ingest`'s fast path, else the full CLI)
with its own stdin, stdout and stderr, and returns what `subprocess.run(...,
capture_output=True)` would: the exit code (argparse's `SystemExit` included) and the two
streams. Everything a command may change for the whole process is put back afterwards: the
environment (the test run's `GATEWAY_*` variables are hidden, as the child processes had
them removed), the working directory, the umask (`ingest` sets 0077), the root logger and
the loggers the CLI quietens.

The command runs in a thread of its own, so a command that calls `asyncio.run` (`process`)
works from an async test whose loop is running, and one command runs at a time. What still
needs a real process stays one: `serve` (signals, the pipeline child), the executable under
an MTA (`tests/integration/test_pipe_mode.py`), a reader that closes the pipe
(`test_ops.py`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal, overload

from gateway.logs import QUIET

_ONE_AT_A_TIME = threading.Lock()
#: Loggers whose level the CLI sets (gateway/logs.py `setup_logging`).
_LEVELLED = (*QUIET, "gateway.security.sender_auth.dkimpy")


@contextlib.contextmanager
def _process_state(env_extra: dict[str, str] | None, cwd: Path | None) -> Iterator[None]:
    saved_env = dict(os.environ)
    saved_cwd = os.getcwd()
    saved_umask = os.umask(0o022)
    os.umask(saved_umask)
    root = logging.getLogger()
    saved_root = (list(root.handlers), root.level)
    saved_levels = {name: logging.getLogger(name).level for name in _LEVELLED}
    try:
        for key in [k for k in os.environ if k.startswith("GATEWAY_")]:
            del os.environ[key]
        os.environ.update(env_extra or {})
        if cwd is not None:
            os.chdir(cwd)
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)
        os.umask(saved_umask)
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved_root[0]:
            root.addHandler(handler)
        root.setLevel(saved_root[1])
        for name, level in saved_levels.items():
            logging.getLogger(name).setLevel(level)


def _stream(data: bytes = b"") -> io.TextIOWrapper:
    return io.TextIOWrapper(
        io.BytesIO(data), encoding="utf-8", errors="surrogateescape", write_through=True
    )


def _value(stream: io.TextIOWrapper) -> bytes:
    stream.flush()
    buffer = stream.buffer
    assert isinstance(buffer, io.BytesIO)
    return buffer.getvalue()


def _call(argv: list[str], stdin: bytes) -> tuple[int, bytes, bytes]:
    from gateway.entry import main

    out, err, inp = _stream(), _stream(), _stream(stdin)
    saved = sys.stdin, sys.stdout, sys.stderr
    sys.stdin, sys.stdout, sys.stderr = inp, out, err
    try:
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse: usage errors and --help
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        return code, _value(out), _value(err)
    finally:
        sys.stdin, sys.stdout, sys.stderr = saved


@overload
def run(
    argv: Sequence[str],
    *,
    stdin: bytes | None = ...,
    env_extra: dict[str, str] | None = ...,
    cwd: Path | None = ...,
    text: Literal[True] = ...,
) -> subprocess.CompletedProcess[str]: ...
@overload
def run(
    argv: Sequence[str],
    *,
    stdin: bytes | None = ...,
    env_extra: dict[str, str] | None = ...,
    cwd: Path | None = ...,
    text: Literal[False],
) -> subprocess.CompletedProcess[bytes]: ...
def run(
    argv: Sequence[str],
    *,
    stdin: bytes | None = None,
    env_extra: dict[str, str] | None = None,
    cwd: Path | None = None,
    text: bool = True,
) -> subprocess.CompletedProcess[str] | subprocess.CompletedProcess[bytes]:
    """`support-gateway *argv` in this process (see the module docstring)."""
    args = [str(a) for a in argv]
    result: list[tuple[int, bytes, bytes]] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            result.append(_call(args, stdin or b""))
        except BaseException as exc:  # re-raised in the caller's thread
            failure.append(exc)

    with _ONE_AT_A_TIME, _process_state(env_extra, cwd):
        thread = threading.Thread(target=target, name="cli " + " ".join(args[:4]))
        thread.start()
        thread.join()
    if failure:
        raise failure[0]
    code, out, err = result[0]
    if text:
        return subprocess.CompletedProcess(
            args, code, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
        )
    return subprocess.CompletedProcess(args, code, out, err)
