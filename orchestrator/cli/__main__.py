"""``python -m orchestrator.cli``: the ``baton`` command."""

from orchestrator.cli import main

main()
