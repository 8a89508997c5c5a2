"""The click group and ``main``: errors are mapped to exit codes once, here; commands raise
and let them through.
"""

from __future__ import annotations

import signal
import sys

import click

from events.errors import (
    ArchiveError,
    EventsError,
    SecretError,
    SessionError,
    SettingsError,
    StoreError,
    StoreUnavailable,
)
from orchestrator.cli.signals import Interrupted, _handled_signals, stdout_closed
from orchestrator.errors import BatonError


def main() -> None:
    with _handled_signals():
        try:
            cli.main(standalone_mode=False, prog_name="baton")
        except click.exceptions.Abort as exc:
            # click turns a KeyboardInterrupt into Abort
            _interrupted(exc.__cause__)
        except click.ClickException as exc:
            exc.show()
            sys.exit(2)
        except (BatonError, EventsError) as exc:
            code, message = _failure(exc)
            for line in message.splitlines():
                click.echo(f"error: {line}", err=True)
            sys.exit(code)
        except KeyboardInterrupt as exc:
            _interrupted(exc)
        except BrokenPipeError:
            # what is left to print (a listing, the summary) has no reader
            stdout_closed()
            _interrupted(Interrupted(signal.SIGPIPE))


def _failure(exc: BatonError | EventsError) -> tuple[int, str]:
    """The exit code and message of an error that ends a command: 2 for what the user gave
    (flows, options, a BATON_* variable, the secret key), 3 for what failed outside the
    flows (the event store, the cache, a server); a BatonError says which it is."""
    if isinstance(exc, BatonError):
        return exc.exit_code, str(exc)
    if isinstance(exc, SettingsError | SecretError | SessionError | ArchiveError):
        return 2, str(exc)
    if isinstance(exc, StoreUnavailable):
        return 3, f"event store unavailable: {exc}"
    if isinstance(exc, StoreError):
        return 3, f"event store failed: {exc}"
    return 3, str(exc)


def _interrupted(cause: BaseException | None) -> None:
    if isinstance(cause, Interrupted):
        why = ": standard output was closed" if cause.signal == signal.SIGPIPE else ""
        click.echo(f"interrupted by {cause.signal.name}{why}", err=True)
        sys.exit(cause.exit_code)
    click.echo("interrupted", err=True)
    sys.exit(128 + signal.SIGINT)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="baton")
def cli() -> None:
    """Run chains of dependent HTTP API tests, recording every step as events."""
