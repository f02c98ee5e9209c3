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

import _thread
import errno
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable

from absl import app, flags

TRACEBACK_ENV = "ATTENTION_JAX_TRACEBACK"


class CommandError(Exception):
    """An error whose message is already the whole story (no type name is prepended)."""


def describe(error: BaseException) -> str:
    """The one line for `error`: its message, with the cause a user can act on first."""
    full = _disk_full(error)
    if full is not None:  # also when a library wrapped it (Orbax's save thread, TFDS)
        error = full
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" writing {error.filename}" if error.filename else ""
        if error.strerror and error.strerror != os.strerror(error.errno):
            # A message of ours around the OS error (checkpoint.CheckpointSaveError: which
            # step failed, which one is intact): all of it, on one line.
            return f"disk full{where}: " + "; ".join(
                line.strip() for line in error.strerror.splitlines() if line.strip()
            )
        return f"disk full{where}: free some space (nothing half-written was kept)"
    if isinstance(error, (CommandError, ValueError, TypeError, OSError, KeyError)):
        message = str(error) if not isinstance(error, KeyError) else repr(error.args[0])
        if isinstance(error, OSError) and error.strerror and error.filename:
            message = f"{error.filename}: {error.strerror}"
        if _composed(error):  # OSError(errno, "what we were doing (the OS's reason)")
            message = error.strerror
        elif not isinstance(error, (CommandError, ValueError)):
            message = f"{type(error).__name__}: {message}"
        return _first_line(message) or type(error).__name__
    return _first_line(f"{type(error).__name__}: {error}") or type(error).__name__


def _composed(error: BaseException) -> bool:
    """An OSError raised with a whole sentence of ours as its strerror (no file name): that
    sentence is the message, without "[Errno N]" and the type's name."""
    return (
        isinstance(error, OSError)
        and error.errno is not None
        and not error.filename
        and bool(error.strerror)
        and error.strerror != os.strerror(error.errno)
    )


def _disk_full(error: BaseException) -> OSError | None:
    """The ENOSPC / EDQUOT OSError in `error`'s chain of causes, if there is one."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return error
        error = error.__cause__ or error.__context__
    return None


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
        except BrokenPipeError:
            # The reader went away (`attention-jax ... | head`): nothing left to say to it.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # so the exit's flush does not fail again
            sys.exit(141)  # 128 + SIGPIPE, as a shell reports a process SIGPIPE ended
        except KeyboardInterrupt:
            if show:
                traceback.print_exc()
            print(f"{prog}: interrupted", file=sys.stderr, flush=True)
            sys.exit(130)
        except Exception as e:
            if show:
                traceback.print_exc()
            message = describe(e)
            expected = isinstance(e, (CommandError, ValueError, OSError)) or _disk_full(e)
            if not show and not expected:
                message += f" (--verbosity=1 or {TRACEBACK_ENV}=1 shows the traceback)"
            print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
            sys.exit(1)

    return wrapped


def run(main: Callable[[list[str]], object], prog: str, **kwargs) -> None:
    """``absl.app.run(main)`` with :func:`guarded` error reporting (and Ctrl-C never lost:
    :func:`redeliver_swallowed_interrupts`)."""
    redeliver_swallowed_interrupts()
    app.run(guarded(main, prog), **kwargs)


def redeliver_swallowed_interrupts() -> None:
    """Ctrl-C while Python runs a callback whose exceptions it cannot raise (a gc callback,
    e.g. JAX's ``_xla_gc_callback``; a ``__del__``) would print "Exception ignored in ...",
    a traceback, and be lost: the command would go on. This hook delivers it again to the
    main thread (as if Ctrl-C were pressed once more), where :func:`guarded` reports it in
    one line. Other unraisable exceptions are reported as Python does."""
    default = sys.unraisablehook
    if getattr(default, "redelivers_interrupts", False):
        return  # installed already: a second hook would deliver each interrupt twice

    def later():
        time.sleep(0.01)  # once the hook has returned: raised in it, it is unraisable again
        _thread.interrupt_main()

    def hook(unraisable):
        if issubclass(unraisable.exc_type, KeyboardInterrupt):
            _thread.start_new_thread(later, ())  # returns at once, waits for nothing
        else:
            default(unraisable)

    hook.redelivers_interrupts = True
    sys.unraisablehook = hook


def run_reader(
    main: Callable[[list[str]], object], prog: str, argv: list[str], module: str
) -> None:
    """:func:`run` for the tools that only read a workdir (translate, evaluate): Ctrl-C is
    honoured even where a caller installed no handler, `module`'s flags are listed by
    ``--help``, and an interrupted run leaves without interpreter teardown, where work cut
    short in background threads (Orbax's restore) would print tracebacks."""
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # an ignored one stays ignored
        signal.signal(signal.SIGINT, signal.default_int_handler)
    for flag in flags.FLAGS.get_flags_for_module(module):  # --help lists the main module's
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)  # flags: make them its own
    try:
        run(main, prog, argv=argv)
    except SystemExit as e:
        if e.code != 130:
            raise
        for stream in (sys.stdout, sys.stderr):  # files were cleaned up on the way out
            try:
                stream.flush()
            except OSError:
                pass
        os._exit(130)


class Program:
    """A read-only command's name, as its messages start (``translate: ...``), and its
    :func:`run_reader` entry point. The name is the module's default (``Program("translate")``)
    until `run` takes it from ``argv[0]``: ``translate.py`` for experiments/translate.py,
    ``attention-jax translate`` for the installed command."""

    def __init__(self, name: str):
        self.name = name

    def log(self, message: str) -> None:
        """`message` on stderr after the command's name (e.g. a skipped damaged checkpoint)."""
        print(f"{self.name}: {message}", file=sys.stderr, flush=True)

    def run(
        self, main: Callable[[list[str]], object], module: str, argv: list[str] | None = None
    ) -> None:
        """Names the command from ``argv[0]`` (default ``sys.argv``), then :func:`run_reader`."""
        argv = list(sys.argv if argv is None else argv)
        self.name = os.path.basename(argv[0]) if argv[0].endswith(".py") else argv[0]
        run_reader(main, self.name, argv, module)


def silence_stdout() -> None:
    """After a broken pipe (the reader of stdout went away): point stdout at /dev/null, or
    Python would report the broken pipe again when it flushes stdout at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
