"""One line, not a traceback: how every command-line tool reports a failure.

A user who mistypes a path, runs out of disk or presses Ctrl-C wants one line that says what
happened and a non-zero status, not a 1,900-line traceback whose useful line is buried in the
middle. :func:`run` wraps an absl ``main``: any exception becomes

    PROG: error: WHAT HAPPENED            (exit status 1)
    PROG: interrupted                     (Ctrl-C, exit status 130)

on stderr. The traceback is still there for whoever needs it: ``--verbosity=1`` (absl's
``-v 1``) or ``ATTENTION_JAX_TRACEBACK=1`` prints it before the line.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from collections.abc import Callable

from absl import app, flags

TRACEBACK_ENV = "ATTENTION_JAX_TRACEBACK"


class CommandError(Exception):
    """An error whose message is already the whole story (no type name is prepended)."""


def describe(error: BaseException) -> str:
    """The one line for `error`: its message, with the cause a user can act on first."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" writing {error.filename}" if error.filename else ""
        return f"disk full{where}: free some space (nothing half-written was kept)"
    if isinstance(error, (CommandError, ValueError, TypeError, OSError, KeyError)):
        message = str(error) if not isinstance(error, KeyError) else repr(error.args[0])
        if isinstance(error, OSError) and error.strerror and error.filename:
            message = f"{error.filename}: {error.strerror}"
        if not isinstance(error, (CommandError, ValueError)):
            message = f"{type(error).__name__}: {message}"
        return _first_line(message) or type(error).__name__
    return _first_line(f"{type(error).__name__}: {error}") or type(error).__name__


def _first_line(message: str) -> str:
    """Messages from deep libraries can span lines; keep the first non-empty one."""
    for line in message.splitlines():
        if line.strip():
            return line.strip()
    return ""


def wants_traceback() -> bool:
    """--verbosity >= 1 on the command line, or ATTENTION_JAX_TRACEBACK set to non-zero."""
    if os.environ.get(TRACEBACK_ENV, "").strip() not in ("", "0"):
        return True
    try:
        flag = flags.FLAGS["verbosity"]
        return bool(flag.present) and int(flag.value) >= 1
    except (KeyError, flags.UnparsedFlagAccessError, TypeError, ValueError):
        return False


def guarded(main: Callable[[list[str]], object], prog: str) -> Callable[[list[str]], object]:
    """`main` with failures reported as one line (see the module docstring)."""

    def wrapped(argv):
        show = wants_traceback()  # read before main: the tools lower absl's verbosity
        try:
            return main(argv)
        except (SystemExit, app.UsageError):
            raise  # sys.exit(message) and usage errors already print one line
        except KeyboardInterrupt:
            if show:
                traceback.print_exc()
            print(f"{prog}: interrupted", file=sys.stderr, flush=True)
            sys.exit(130)
        except Exception as e:
            if show:
                traceback.print_exc()
            message = describe(e)
            if not show and not isinstance(e, (CommandError, ValueError, OSError)):
                message += f" (--verbosity=1 or {TRACEBACK_ENV}=1 shows the traceback)"
            print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
            sys.exit(1)

    return wrapped


def run(main: Callable[[list[str]], object], prog: str, **kwargs) -> None:
    """``absl.app.run(main)`` with :func:`guarded` error reporting."""
    app.run(guarded(main, prog), **kwargs)
