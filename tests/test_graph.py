"""``baton graph``: every legal test name gives a graph that mermaid and Graphviz read back
as exactly the plan, one node per test and one edge per dependency."""

from __future__ import annotations

import html
import itertools
import json
import re
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.cli import baton
from tests.test_dashboard import Page, chromium, page  # noqa: F401  (the browser fixtures)

# Names that break a format when written as ids or unquoted: mermaid keywords, brackets,
# quotes, entity-like text, backslashes, arrows, and two names that differ only in
# punctuation (a naive id maps both to get_cart).
NAMES = [
    "login",
    "end",
    "graph",
    "subgraph",
    "get-cart",
    "get_cart",
    "get cart",
    "a[b]",
    "(round)",
    "{curly}",
    'say "hi"',
    "back\\slash\\",
    "x --> y",
    "#amp;",
    "<b>bold</b>",
    "semi;colon",
    "pipe|bar",
    "ünïcode ✓",
]


def _flow(tmp_path: Path) -> Path:
    """login captures a token and the row's user; every other test reads the token, and
    each depends_on the one before it."""
    tests: dict[str, object] = {
        "login": {
            "request": {"method": "POST", "url": "/login", "json": {"user": "{{ user }}"}},
            "capture": {"auth.token": {"json": "$.token"}, "session": {"json": "$.session"}},
        }
    }
    previous = "login"
    for name in NAMES[1:]:
        tests[name] = {
            "request": {
                "url": "/items/{{ session }}",
                "headers": {"Authorization": "Bearer {{ auth.token }}"},
            },
            "depends_on": [previous] if previous != "login" else [],
        }
        previous = name
    path = tmp_path / "names.yaml"
    # JSON is YAML: every name is written as a quoted key, exactly
    path.write_text(json.dumps({"name": 'odd "names"', "base_url": "http://x", "tests": tests}))
    return path


def _expected_edges() -> set[tuple[str, str, str]]:
    edges = {("login", name, "token") for name in NAMES[1:]}
    edges |= {(a, b, "order") for a, b in itertools.pairwise(NAMES[1:])}
    return edges


def _data_file(tmp_path: Path) -> Path:
    rows = tmp_path / "rows.csv"
    rows.write_text("user\nalice\nbob\n")
    return rows


def _graph(path: Path, rows: Path, fmt: str) -> str:
    code, out, err = baton("graph", str(path), "--data", str(rows), "--format", fmt)
    assert code == 0, err
    return out


def test_mermaid_has_a_unique_safe_id_and_a_quoted_label_per_test(tmp_path: Path) -> None:
    out = _graph(_flow(tmp_path), _data_file(tmp_path), "mermaid")
    lines = out.splitlines()
    assert lines[0] == "graph TD"
    labels: dict[str, str] = {}
    edges: set[tuple[str, str, str]] = set()
    for line in lines[1:]:
        node = re.fullmatch(r'    (n\d+)\["((?:[^"#&<>]|&(?:amp|lt|gt|quot|num);)*)"\]', line)
        edge = re.fullmatch(r"    (n\d+) -->\|(token|data|order)\| (n\d+)", line)
        assert node or edge, f"not a plain node or edge line: {line!r}"
        if node:
            assert node.group(1) not in labels
            # in the label no `"`, markup or `#...;` (mermaid's own entity syntax)
            labels[node.group(1)] = html.unescape(node[2])
        elif edge:
            edges.add((edge.group(1), edge.group(3), edge.group(2)))
    assert sorted(labels.values()) == sorted(NAMES)
    named = {(labels[a], labels[b], kind) for a, b, kind in edges}
    assert named == _expected_edges()


def test_dot_reads_back_with_graphviz(tmp_path: Path) -> None:
    """Graphviz itself (Debian's graphviz, which .ci/run installs) parses the output."""
    out = _graph(_flow(tmp_path), _data_file(tmp_path), "dot")
    parsed = subprocess.run(
        ["dot", "-Tjson"], input=out, capture_output=True, text=True, check=False, timeout=60
    )
    assert parsed.returncode == 0, parsed.stderr
    graph = json.loads(parsed.stdout)
    assert graph["name"] == 'odd "names"'
    labels = [node["label"] for node in graph["objects"]]
    # Graphviz reads a label's \\ as one backslash when it draws it
    assert sorted(label.replace("\\\\", "\\") for label in labels) == sorted(NAMES)
    edges = {(labels[e["tail"]], labels[e["head"]], e["label"]) for e in graph.get("edges", [])}
    assert {(a.replace("\\\\", "\\"), b.replace("\\\\", "\\"), k) for a, b, k in edges} == (
        _expected_edges()
    )


def test_graph_of_a_data_driven_flow_needs_no_dummy_variables(tmp_path: Path) -> None:
    path = _flow(tmp_path)
    code, _, err = baton("graph", str(path))
    assert code == 2
    assert "variable 'user' is not defined" in err
    out = _graph(path, _data_file(tmp_path), "text")
    assert f'odd "names" ({path}): {len(NAMES)} tests' in out
    assert "  2. end  <- login (token)" in out


@pytest.fixture(scope="module")
def mermaid_js(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """mermaid itself, from the npm registry (its dist/mermaid.min.js, for a browser)."""
    folder = tmp_path_factory.mktemp("mermaid")
    packed = subprocess.run(
        ["npm", "pack", "mermaid@11", "--silent", "--pack-destination", str(folder)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    tarballs = list(folder.glob("mermaid-*.tgz"))
    if packed.returncode != 0 or not tarballs:
        pytest.fail(f"npm pack mermaid failed: {packed.stderr.strip()[-500:]}")
    with tarfile.open(tarballs[0]) as tar:
        script = tar.extractfile("package/dist/mermaid.min.js")
        assert script is not None
        (folder / "mermaid.min.js").write_bytes(script.read())
    (folder / "index.html").write_text('<!DOCTYPE html><script src="mermaid.min.js"></script>')
    return folder / "index.html"


_RENDER = """(async (text) => {
  mermaid.initialize({startOnLoad: false, securityLevel: "strict"});
  try {
    await mermaid.parse(text);
  } catch (error) {
    return {error: String(error && error.message || error)};
  }
  const {svg} = await mermaid.render("plan", text);
  const doc = new DOMParser().parseFromString(svg, "image/svg+xml");
  const texts = (selector) => [...doc.querySelectorAll(selector)].map((e) => e.textContent);
  return {nodes: texts("g.node .nodeLabel"), edges: texts("g.edgeLabel")};
})"""


async def test_mermaid_parses_and_draws_every_name_as_written(
    page: Page,  # noqa: F811  (the fixture imported above)
    mermaid_js: Path,
    tmp_path: Path,
) -> None:
    """mermaid's own parser and renderer (in headless Chromium): the graph parses, and the
    drawing shows one node per test with exactly its name."""
    out = _graph(_flow(tmp_path), _data_file(tmp_path), "mermaid")
    await page.open(mermaid_js.as_uri())
    await page.until("typeof mermaid !== 'undefined'")
    drawn = await page.js(f"{_RENDER}({json.dumps(out)})")
    assert "error" not in drawn, drawn
    assert sorted(drawn["nodes"]) == sorted(NAMES)
    assert sorted(drawn["edges"]) == sorted(kind for _, _, kind in _expected_edges())
    # the old output, as a check that this test can fail: ids were the names
    old = "graph TD\n    end[end]\n    get_cart[get-cart]\n    get_cart[get_cart]"
    broken = await page.js(f"{_RENDER}({json.dumps(old)})")
    assert "error" in broken
