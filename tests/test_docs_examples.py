"""Every flow the README and docs/ show, as a newcomer copies it: a whole flow passes
``baton validate``; a part of one (a test, a request, ``defaults``...) fits the flow
schema where it goes. So a renamed field or a stale example fails here, not for a user.

The whole flows of docs/recipes.md and docs/comparison.md are tests/test_recipes.py's,
which runs the files they show; comparison.md also shows other tools' files."""

from __future__ import annotations

import copy
import json
import re
import shutil
import textwrap
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import pytest

from orchestrator.loader import decode_yaml
from tests.cli import baton

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md"] + [
    page for page in sorted((ROOT / "docs").glob("*.md")) if page.name != "comparison.md"
]
FENCE = re.compile(
    r"^(?P<indent> *)```yaml\n(?P<text>.*?)^(?P=indent)```$", re.MULTILINE | re.DOTALL
)
SCHEMA = json.loads((ROOT / "docs" / "flow.schema.json").read_text())
TEST_FIELDS = set(SCHEMA["$defs"]["Test"]["properties"])
FLOW_FIELDS = set(SCHEMA["$defs"]["Flow"]["properties"])


def _blocks() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        text = page.read_text()
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            found.append((f"{page.relative_to(ROOT)}:{line}", textwrap.dedent(match["text"])))
    return found


def _fits(definition: str, document: Any) -> list[str]:
    """Schema errors of ``document`` as a ``definition`` (Flow, Test) whose own required
    fields may be left out: a part of a flow, not a whole one."""
    schema = copy.deepcopy(SCHEMA)
    schema["$defs"][definition].pop("required", None)
    schema["$ref"] = f"#/$defs/{definition}"
    errors = jsonschema.Draft202012Validator(schema).iter_errors(document)
    return [f"{list(error.absolute_path)}: {error.message}" for error in errors]


def _is_test(value: Any) -> bool:
    return isinstance(value, dict) and bool({"request", "expect", "capture"} & set(value))


BLOCKS = _blocks()
FLOWS = [
    (where, text)
    for where, text in BLOCKS
    if not where.startswith("docs/recipes.md")
    and isinstance(found := decode_yaml(text.encode(), where), dict)
    and {"name", "tests"} <= set(found)
]


def test_the_pages_show_flows_and_parts_of_flows() -> None:
    # the extraction itself must keep finding what it checks
    assert len(FLOWS) >= 4 and len(BLOCKS) >= 25


@pytest.mark.parametrize(("where", "text"), FLOWS, ids=[where for where, _ in FLOWS])
def test_every_flow_shown_passes_validate(
    where: str, text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHOP_URL", "http://127.0.0.1:8765")
    monkeypatch.setenv("SHOP_PASSWORD", "s3cret")
    named = re.match(r"# (\S+\.ya?ml)\n", text)  # "# flows/cart.yaml": where it lives
    path = tmp_path / (named[1] if named else "flow.yaml")
    if "\nuse:" in text:  # its setup is the complete example the page points to
        shutil.copytree(ROOT / "examples" / "shared-setup", tmp_path, dirs_exist_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    code, out, err = baton("validate", str(path))
    assert code == 0, f"{where}: {err}"
    assert out.startswith(f"{path}: ok")


@pytest.mark.parametrize(("where", "text"), BLOCKS, ids=[where for where, _ in BLOCKS])
def test_every_part_of_a_flow_shown_fits_the_schema(where: str, text: str) -> None:
    # read as the loader reads a flow: dates as text, no key twice
    document = msgspec.to_builtins(decode_yaml(text.encode(), where))
    if not isinstance(document, dict):
        return
    if set(document) <= FLOW_FIELDS:
        errors = _fits("Flow", document)
    elif set(document) <= TEST_FIELDS:
        errors = _fits("Test", document)
    elif all(_is_test(value) for value in document.values()):
        errors = [error for value in document.values() for error in _fits("Test", value)]
    else:
        return  # not a flow's: a CI job, a Kubernetes object, an environment file...
    assert not errors, f"{where}: {errors}"
