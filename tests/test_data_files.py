"""``--data`` files as users save them: spreadsheet exports (a byte order mark, CRLF),
quoted values with commas and line breaks, and the mistakes that must be a clear error
naming the file and line, never a row lost, merged or misread."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.errors import UsageError
from orchestrator.inputs import read_rows
from tests.cli import baton
from tests.conftest import SHOP
from tests.test_run import report


def test_a_spreadsheet_export_reads_as_written(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    path.write_bytes(
        "\ufeffzip, note ,empty\r\n"
        '01234,"a, b\r\nsecond line",\r\n'
        '00501,"x\u2028y\x0cz",\r\n'
        "\r\n".encode()
    )
    assert read_rows(path) == [
        {"zip": "01234", "note": "a, b\r\nsecond line", "empty": ""},
        {"zip": "00501", "note": "x\u2028y\x0cz", "empty": ""},
    ]


def test_a_json_file_with_a_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "rows.json"
    path.write_bytes('\ufeff[{"zip": "01234", "n": 5, "user": {"id": 7}}]'.encode())
    assert read_rows(path) == [{"zip": "01234", "n": 5, "user": {"id": 7}}]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (
            "user,role\nalice,admin\nrené,user\n".encode("latin-1"),
            "rows.csv: line 3: not UTF-8 (byte 0xe9)",
        ),
        (b"user,user\nalice,bob\n", "rows.csv: line 1: column 2 is named 'user', as column 1 is"),
        (b"user,,role\nalice,x,admin\n", "rows.csv: line 1: column 2 has no name"),
        (
            b'user,note\nalice,"two\nlines"\nbob\n',
            "rows.csv: line 4: 1 fields, and the header has 2",
        ),
        (b"user,role\nalice,admin,extra\n", "rows.csv: line 2: 3 fields, and the header has 2"),
        (b'user,note\nalice,ok\nbob,"never closed\ncarol,x\n', "rows.csv: line 3: a quoted value"),
        (b'user,note\nalice,"ok"x\n', "rows.csv: line 2: a quoted value"),
        (b"user,env\nalice,prod\n", "rows.csv: line 1: column 2 is named 'env', a reserved name"),
    ],
)
def test_a_broken_csv_file_is_named_with_its_line(
    tmp_path: Path, content: bytes, expected: str
) -> None:
    path = tmp_path / "rows.csv"
    path.write_bytes(content)
    with pytest.raises(UsageError) as caught:
        read_rows(path)
    assert expected in str(caught.value)
    code, out, err = baton("validate", str(SHOP / "batch.yaml"), "--data", str(path))
    assert code == 2
    assert expected in out + err
    assert "Traceback" not in out + err


def test_a_json_row_without_a_column_the_flow_reads(tmp_path: Path) -> None:
    """Every row is checked before a request is sent, not only the first."""
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([{"username": "u", "password": "p"}, {"username": "v"}]))
    flow = tmp_path / "flow.yaml"
    flow.write_text(
        "name: f\nbase_url: http://127.0.0.1:9\ntests:\n  login:\n"
        "    request: {method: POST, url: /auth/login, json: {p: '{{ password }}'}}\n"
    )
    code, out, err = baton("validate", str(flow), "--data", str(rows))
    assert code == 2
    assert f"data row 2 of {rows}: variable 'password' is not defined" in out + err


def test_every_row_of_a_spreadsheet_export_runs_as_its_user(
    env: dict[str, str], tmp_path: Path
) -> None:
    """With the byte order mark in the first column's name, every row would log in as the
    flow's default user with its own password, and all but one would fail."""
    rows = tmp_path / "users.csv"
    rows.write_bytes(
        "\ufeffusername,password\r\n".encode()
        + b"".join(f"user00{n},pw-user00{n}\r\n".encode() for n in range(1, 5))
    )
    code, out, err = baton(
        "run", str(SHOP / "batch.yaml"), "--data", str(rows), "--json", str(tmp_path / "r.json")
    )
    assert code == 0, out + err
    assert len(report(tmp_path / "r.json")) == 4
