"""The orchestrator's error tree. Each error maps to one exit code of the ``baton`` CLI."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a user's input: where it is, what is wrong, how to fix it."""

    file: str
    where: str
    message: str
    hint: str = ""

    def __str__(self) -> str:
        place = f"{self.file}: {self.where}: " if self.where else f"{self.file}: "
        return place + self.message + (f" ({self.hint})" if self.hint else "")


class BatonError(Exception):
    exit_code = 1


class UsageError(BatonError):
    """The user's input is wrong: a flow file, an option, a data file. Exit code 2."""

    exit_code = 2

    def __init__(self, problems: list[Problem] | str) -> None:
        self.problems = problems if isinstance(problems, list) else []
        text = problems if isinstance(problems, str) else "\n".join(map(str, problems))
        super().__init__(text)


class InfrastructureError(BatonError):
    """Something outside the user's flow failed: the database, the API server. Exit code 3."""

    exit_code = 3
