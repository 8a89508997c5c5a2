"""Baton's runner: flows, plans, HTTP runs, reporters and the ``baton`` CLI."""

import sys

# httpx's __init__ imports its command-line client (httpx._main, and with it rich and
# pygments) whenever click and rich are installed: ~70 ms of every `baton` start, for a
# function Baton never calls. A None entry makes that import fail, which httpx expects
# (it then defines a stand-in `httpx.main`); set before any module here imports httpx.
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
