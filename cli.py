"""Command-line plumbing shared by sft.py, evalmath.py and data.py.

`run_main(main)` runs a command's `main(argv)` and turns a user's mistake into one line on stderr
(`error: <file or flag>: <what was expected>; <the fix>`) and exit status 2, instead of a traceback.
Tracebacks stay available: pass `--debug` anywhere on the command line, or set MATHSFT_DEBUG=1.
Ctrl-C that a command did not handle itself ends with one line and exit status 130.
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable

DEBUG_FLAG = "--debug"
DEBUG_ENV = "MATHSFT_DEBUG"


class UserError(Exception):
    """Bad input from the user (a flag, a file, a folder): the message names it, what was expected and the fix."""


# Exceptions that mean "the input is wrong", not "the program is wrong". Their messages are shown as is.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                                                PermissionError, json.JSONDecodeError, UnicodeDecodeError)


def debug_enabled(argv: list[str]) -> bool:
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0", "false")


def run_main(main: Callable[[list[str]], None], argv: list[str] | None = None,
             user_errors: tuple[type[BaseException], ...] = ()) -> None:
    """Call `main(argv)` without `--debug`; a user error prints one line (`error: ...`) and exits 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_enabled(argv)
    argv = [a for a in argv if a != DEBUG_FLAG]
    try:
        main(argv)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(130)
    except USER_ERRORS + tuple(user_errors) as e:
        if debug:
            raise
        msg = str(e) or type(e).__name__
        print(msg if msg.startswith("error:") else f"error: {msg}", file=sys.stderr)
        sys.exit(2)
