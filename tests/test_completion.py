"""Shell completion through click (``_BATON_COMPLETE``), with ``main()`` as the entry point
the installed ``baton`` script runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BATON = str(Path(sys.executable).parent / "baton")


def complete(words: str, cword: int, cwd: Path, shell: str = "bash") -> list[str]:
    env = {
        **os.environ,
        "_BATON_COMPLETE": f"{shell}_complete",
        "COMP_WORDS": words,
        "COMP_CWORD": str(cword),
    }
    done = subprocess.run(
        [BATON], env=env, cwd=cwd, capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    return done.stdout.splitlines()


def test_a_command_completes_from_its_first_letters(tmp_path: Path) -> None:
    assert complete("baton ru", 1, tmp_path) == ["plain,run", "plain,runs"]
    assert complete("baton pl", 1, tmp_path) == ["plain,plan"]


def test_options_and_their_choices_complete(tmp_path: Path) -> None:
    assert "plain,--ctrf" in complete("baton run flows/ --c", 3, tmp_path)
    assert complete("baton init --ci g", 3, tmp_path) == ["plain,github", "plain,gitlab"]


def test_a_flow_path_completes_files_and_init_a_directory(tmp_path: Path) -> None:
    # "file": the shell lists the files itself (bash: compopt -o default)
    assert complete("baton run examples/sh", 2, tmp_path) == ["file,examples/sh"]
    assert complete("baton validate fl", 2, tmp_path) == ["file,fl"]
    assert complete("baton init pro", 2, tmp_path) == ["dir,pro"]


def test_env_completes_the_environments_of_env(tmp_path: Path) -> None:
    (tmp_path / "env").mkdir()
    for name in ("local.yaml", "staging.yml", "stage-2.yaml", "notes.txt"):
        (tmp_path / "env" / name).write_text("base_url: http://x\n")
    assert complete("baton run flows/ --env st", 4, tmp_path) == [
        "plain,stage-2",
        "plain,staging",
    ]
    assert complete("baton validate flows/ --env ", 4, tmp_path) == [
        "plain,local",
        "plain,stage-2",
        "plain,staging",
    ]


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_the_completion_script_for_each_shell(shell: str, tmp_path: Path) -> None:
    env = {**os.environ, "_BATON_COMPLETE": f"{shell}_source"}
    done = subprocess.run([BATON], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "_BATON_COMPLETE" in done.stdout and "baton" in done.stdout


def test_bash_runs_the_completion_function(tmp_path: Path) -> None:
    """The script as bash sources it fills COMPREPLY with the commands."""
    script = (
        'eval "$(_BATON_COMPLETE=bash_source baton)"; '
        "COMP_WORDS=(baton ru); COMP_CWORD=1; _baton_completion baton; "
        'printf "%s\\n" "${COMPREPLY[@]}"'
    )
    env = {**os.environ, "PATH": f"{Path(BATON).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(
        ["bash", "-c", script], env=env, capture_output=True, text=True, timeout=30
    )
    assert done.stdout.split() == ["run", "runs"], done.stderr
