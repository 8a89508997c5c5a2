"""The ``baton`` command. Exit codes: 0 all passed, 1 a test failed, 2 usage or validation
error, 3 infrastructure error, 128 + the signal's number when interrupted (130 SIGINT, 143
SIGTERM). A user's mistake is one readable line, never a traceback.

Errors are mapped to exit codes once, in ``main`` (app.py); commands raise and let them
through. The commands live in one module per concern; importing them registers them on the
group, and each imports its heavy modules inside the function so that start-up stays quick.
"""

# importing the command modules registers their commands on the group
from orchestrator.cli import (  # noqa: F401
    authoring,
    operations,
    queueing,
    reading,
    running,
    service,
)
from orchestrator.cli.app import _failure as _failure
from orchestrator.cli.app import cli, main
from orchestrator.errors import UsageError

__all__ = ["UsageError", "cli", "main"]
