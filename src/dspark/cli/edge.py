"""The command line's edge: one error boundary for every command, and checks on outputs.

Every ``dspark`` command runs inside :class:`BoundaryGroup` (the typer group class of the
root app, of ``dspark data`` and of ``dspark convert``), so no traceback reaches a user:

- an expected failure (:class:`~dspark.errors.DsparkError`, ``ValueError``, ``OSError``, a
  safetensors error) prints one line ``error: <message>`` and exits 2; ``RuntimeError`` and
  ``TypeError`` too, with ``(full trace written to <path>)`` since they may come from deep
  inside torch;
- anything else is a bug: one line ``error: internal error: <type>: <message> (full trace
  written to <path>)``, and exit 2;
- Ctrl-C prints ``error: interrupted`` and exits 130;
- usage errors (a bad option type, a missing argument) keep click's message and exit 2.

Traces go to ``$DSPARK_CRASH_DIR``, else ``crash/`` under the dspark cache
(``$DSPARK_CACHE`` or ``~/.cache/dspark``), else the temp dir. ``DSPARK_TRACEBACK=1`` lets
every exception through with its traceback, for debugging.

:func:`check_out_dir` and :func:`check_out_file` refuse an output that cannot be written
before a command starts minutes of work, so that no result is computed and then lost. They
create nothing: the nearest existing folder is probed with a temporary file.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
import tempfile
import traceback
from pathlib import Path

import typer
from typer.core import TyperGroup

from dspark.errors import DsparkError

EXIT_ERROR = 2
"""Exit code of every failure, usage errors included (click's convention)."""
EXIT_INTERRUPTED = 130
"""128 + SIGINT, as a shell reports Ctrl-C."""
MAX_MESSAGE = 600
"""Characters of an exception's message kept on the one line."""


class BoundaryGroup(TyperGroup):
    """A typer group whose commands fail with one line (see the module docstring)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException, BrokenPipeError):
            raise  # exit codes, click's usage errors and a closed pipe: typer handles them
        except KeyboardInterrupt:
            typer.echo("error: interrupted", err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except Exception as exc:
            if traceback_wanted():
                raise
            typer.echo(error_line(exc), err=True)
            raise typer.Exit(EXIT_ERROR) from None


def traceback_wanted() -> bool:
    """``DSPARK_TRACEBACK=1``: let exceptions through with their traceback (debugging)."""
    return os.environ.get("DSPARK_TRACEBACK", "").strip() not in ("", "0")


def error_line(exc: BaseException) -> str:
    """The one line a user sees for ``exc``; writes the full trace to a file where it may be a bug."""
    message = one_line(exc)
    if isinstance(exc, (DsparkError, ValueError, OSError)) or type(exc).__name__ == "SafetensorError":
        return f"error: {message}"
    trace = write_trace(exc)
    if isinstance(exc, (RuntimeError, TypeError)):
        return f"error: {message} (full trace written to {trace})"
    return f"error: internal error: {type(exc).__name__}: {message} (full trace written to {trace})"


def one_line(exc: BaseException) -> str:
    """``str(exc)`` with its whitespace runs collapsed to single spaces, cut to ``MAX_MESSAGE``."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 1] + "…"


def crash_dir() -> Path:
    """Where traces of unexpected errors go: $DSPARK_CRASH_DIR, else <dspark cache>/crash."""
    if os.environ.get("DSPARK_CRASH_DIR"):
        return Path(os.environ["DSPARK_CRASH_DIR"]).expanduser()
    try:
        from dspark.target.loading import cache_root  # imports torch (dspark.target): only after a crash
    except Exception:  # the crash may be a broken torch install itself
        return Path.home() / ".cache" / "dspark" / "crash"
    return cache_root() / "crash"


def write_trace(exc: BaseException) -> str:
    """Write the command line and the traceback of ``exc`` to a new file and return its path."""
    from dspark import __version__

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    body = (f"dspark {__version__} · python {sys.version.split()[0]} · {stamp}\n"
            f"argv: {sys.argv!r}\n\n" + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    for folder in (crash_dir(), Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, path = tempfile.mkstemp(prefix=f"dspark-crash-{stamp}-", suffix=".txt", dir=folder)
            with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace") as f:
                f.write(body)
            return path
        except OSError:
            continue
    return "nowhere: no writable folder"


# -- numeric flags -------------------------------------------------------------------------
def check_at_least(*bounds: tuple[str, float | None, float]) -> None:
    """Refuse, in order, the first ``(flag, value, least)`` whose value lies below ``least``
    (a value of None was not given and is not checked)."""
    for flag, value, least in bounds:
        if value is not None and value < least:
            raise DsparkError(f"{flag} must be >= {least}, got {value}")


# -- outputs ------------------------------------------------------------------------------
def check_out_dir(path: str | Path, flag: str = "--out") -> Path:
    """``path`` as an output folder: refused at once unless it is, or can become, a writable folder."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise DsparkError(f"{flag} {path} is a file, not a folder")
    _check_writable(path, path, flag)
    return path


def check_out_file(path: str | Path, flag: str = "--out") -> Path:
    """``path`` as an output file (new, or appended to): refused at once unless it can be written."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise DsparkError(f"{flag} {path} is a folder, not a file")
    if path.exists():
        try:
            open(path, "ab").close()  # opens for appending; writes nothing
        except OSError as exc:
            raise DsparkError(f"{flag} {path} cannot be written: {exc.strerror or exc}") from None
    else:
        _check_writable(path.parent, path, flag)
    return path


def _check_writable(folder: Path, path: Path, flag: str) -> None:
    """Probe the nearest existing folder at or above ``folder`` with a temporary file."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise DsparkError(f"{flag} {path} cannot be created: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise DsparkError(f"{flag} {path} cannot be written ({existing}: {exc.strerror or exc})") from None
