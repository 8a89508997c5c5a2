"""Run the ``baton`` command in-process, as a user would type it, and capture what it says."""

from __future__ import annotations

import contextlib
import io
import sys

from orchestrator.cli import main


def baton(*args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``baton *args``."""
    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["baton", *args]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()
