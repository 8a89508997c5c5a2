"""``baton init``: a first flow, an environment file and a CI file, ready to validate.

The flow logs in and uses the token (the demo shop's API: ``python examples/shop/server.py``
answers it as written); the CI file runs it and keeps JUnit and CTRF reports.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from orchestrator.errors import UsageError

CiKind = Literal["github", "gitlab", "none"]
DEFAULT_BASE_URL = "http://127.0.0.1:8765"

FLOW = """\
# A first flow: log in, then use the token. Check it without sending a request:
#   baton validate flows/
# run it against the environment in env/local.yaml:
#   baton run flows/ --env local
name: {name}
base_url: "{{{{ base_url }}}}"
variables:
  base_url: {base_url}  # each env/NAME.yaml sets its own
  username: alice
  # a secret: export API_PASSWORD=... or pass --secrets FILE; never written in clear
  password: "{{{{ secrets.API_PASSWORD | default('secret-alice') }}}}"
tests:
  login:
    request:
      method: POST
      url: /auth/login
      json: {{username: "{{{{ username }}}}", password: "{{{{ password }}}}"}}
    expect:
      status: 200
      json: {{"$.access_token": {{type: string}}}}
    capture:
      auth.token: {{json: "$.access_token"}}  # auth.* captures are secrets
  me:
    # reads auth.token: runs after login, skipped if login fails
    request:
      url: /me
      headers: {{Authorization: "Bearer {{{{ auth.token }}}}"}}
    expect:
      status: 200
      json: {{"$.username": "{{{{ username }}}}"}}
"""

ENVIRONMENT = """\
# The "local" environment: baton run flows/ --env local
# Variables here override the flow's own; --data rows and --var override these.
base_url: {base_url}
"""

GITHUB = """\
# Baton's API tests on every push: JUnit and CTRF reports kept as an artifact, Baton's
# history (.baton/: the embedded PostgreSQL) kept in the cache so flaky tests show up.
name: api tests
on: [push, pull_request]
jobs:
  baton:
    runs-on: ubuntu-latest
    env:
      # what pip installs Baton from: a version, a path, a git URL
      BATON_REQUIREMENT: baton
    steps:
      - uses: actions/checkout@v4
      - uses: actions/setup-python@v5
        with: {{python-version: "3.12"}}
      - uses: actions/cache@v4
        with:
          path: .baton
          key: baton-${{{{ runner.os }}}}-${{{{ github.run_id }}}}
          restore-keys: baton-${{{{ runner.os }}}}-
      - run: pip install "$BATON_REQUIREMENT"
      - run: baton run {flows} --env local --junit reports/junit.xml --ctrf reports/ctrf.json
      - uses: actions/upload-artifact@v4
        if: always()
        with: {{name: baton-reports, path: reports/}}
"""

GITLAB = """\
# Baton's API tests on every push: the JUnit report in the merge request, CTRF kept,
# Baton's history (.baton/: the embedded PostgreSQL) kept in the cache.
api-tests:
  image: python:3.12
  variables:
    BATON_REQUIREMENT: baton  # what pip installs Baton from
  cache:
    key: baton
    paths: [.baton/]
  script:
    - pip install "$BATON_REQUIREMENT"
    - baton run {flows} --env local --junit reports/junit.xml --ctrf reports/ctrf.json
  artifacts:
    when: always
    paths: [reports/]
    reports:
      junit: reports/junit.xml
"""

CI_FILES: dict[CiKind, tuple[str, str]] = {
    "github": (".github/workflows/baton.yml", GITHUB),
    "gitlab": (".gitlab-ci.yml", GITLAB),
}


@dataclass(frozen=True)
class Scaffold:
    directory: Path
    name: str = "api"
    base_url: str = DEFAULT_BASE_URL
    ci: CiKind = "github"

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-") or "api"

    def files(self) -> dict[Path, str]:
        """Each file to write and its text."""
        # JSON strings are YAML scalars: a URL or name with ': ' or '#' stays one value
        name, base_url = json.dumps(self.name), json.dumps(self.base_url)
        files = {
            Path("flows") / f"{self.slug}.yaml": FLOW.format(name=name, base_url=base_url),
            Path("env") / "local.yaml": ENVIRONMENT.format(base_url=base_url),
        }
        if self.ci != "none":
            path, template = CI_FILES[self.ci]
            files[Path(path)] = template.format(flows="flows/")
        return {self.directory / path: text for path, text in files.items()}

    def write(self, *, force: bool = False) -> list[Path]:
        """Write every file; refuses, before writing any, if one exists (unless ``force``)."""
        files = self.files()
        if not force:
            for path in files:
                if path.exists():
                    raise UsageError(f"{path}: already exists; pass --force to overwrite it")
        for path, text in files.items():
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text, encoding="utf-8")
            except OSError as exc:
                raise UsageError(f"{path}: cannot write it ({exc.strerror})") from None
        return list(files)
