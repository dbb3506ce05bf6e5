"""Custom engine with real child processes: start, forward, stream, stop, and no orphans."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from runtimes.custom import CustomAdapter
from runtimes.errors import InvalidInputError, ModelLoadError
from runtimes.registry import load_model

ROOT = Path(__file__).resolve().parents[2]
ECHO = ROOT / "models" / "echo-http" / "1.0.0"


def _alive(pid: int) -> bool:
    """True while pid runs; a zombie counts as gone (its parent may not reap it promptly)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _model(tmp_path: Path, config: dict, script: str | None = None) -> Path:
    d = tmp_path / "m" / "1"
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"engine": "Custom", **config}))
    if script is not None:
        (d / "server.py").write_text(textwrap.dedent(script))
    return d


async def test_echo_forward_stream_health_unload() -> None:
    adapter = await load_model(ECHO, name="echo")
    assert isinstance(adapter, CustomAdapter)
    assert adapter.proc is not None
    pid = adapter.proc.pid
    try:
        assert await adapter.health()
        assert adapter.signature is not None and adapter.signature.inputs == ()

        status, headers, body = await adapter.forward(
            "GET", "/a/b", {"X-Trace": "t1", "Connection": "close", "Host": "evil"}, b"", query="q=1&r=x"
        )
        assert status == 200
        assert "transfer-encoding" not in headers and "connection" not in headers
        echo = json.loads(body)
        assert echo["method"] == "GET" and echo["path"] == "/a/b" and echo["query"] == "q=1&r=x"
        assert echo["headers"]["x-trace"] == "t1"
        assert echo["model_dir"] == str(ECHO.resolve())

        blob = bytes(range(256)) * 3  # not valid UTF-8, not JSON
        status, _, body = await adapter.forward(
            "POST", "sub/path", {"content-type": "application/x-bin"}, blob, query="k=v"
        )
        echo = json.loads(body)
        assert status == 200 and echo["method"] == "POST" and echo["path"] == "/sub/path"
        assert base64.b64decode(echo["body_base64"]) == blob and echo["body_text"] is None
        assert echo["headers"]["content-type"] == "application/x-bin"

        status, headers, chunks, length = await adapter.forward_stream("GET", "/stream", {}, b"")
        assert status == 200 and headers["content-type"] == "text/plain" and length is None
        parts = [c async for c in chunks]
        assert b"".join(parts) == b"".join(f"line {i}\n".encode() for i in range(5))

        with pytest.raises(InvalidInputError, match="raw HTTP"):
            await adapter.predict({})
    finally:
        await adapter.unload()
    assert not await adapter.health()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not _group_alive(pid)


async def test_server_exiting_at_once_reports_its_log(tmp_path: Path) -> None:
    d = _model(
        tmp_path,
        {"start_command": ["python", "server.py"]},
        """
        import sys
        for i in range(30):
            print(f"boot line {i}")
        sys.exit("fatal: weights missing")
    """,
    )
    with pytest.raises(ModelLoadError) as err:
        await load_model(d)
    msg = str(err.value)
    assert "exited with code 1" in msg and "fatal: weights missing" in msg
    assert "boot line 29" in msg and "boot line 5\n" not in msg  # only the tail


async def test_never_healthy_times_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENGINEHOUSE_CUSTOM_START_TIMEOUT", "1.5")
    d = _model(
        tmp_path,
        {"start_command": ["python", "server.py"]},
        """
        import time
        print("warming up forever", flush=True)
        time.sleep(600)
    """,
    )
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match="not healthy") as err:
        await load_model(d)
    assert time.monotonic() - start < 10
    assert "warming up forever" in str(err.value)


async def test_shell_metacharacters_are_literal(tmp_path: Path) -> None:
    marker = Path(f"/tmp/enginehouse-custom-{uuid.uuid4().hex}")
    label = f"; touch {marker}"
    d = tmp_path / "echo"
    shutil.copytree(ECHO, d)
    (d / "config.json").write_text(
        json.dumps(
            {
                "engine": "Custom",
                "start_command": ["python", "server.py", "--port", "{port}", "--label", label],
            }
        )
    )
    adapter = await load_model(d)
    try:
        _, _, body = await adapter.forward("GET", "/x", {}, b"")
        assert json.loads(body)["label"] == label
        assert not marker.exists()
    finally:
        await adapter.unload()


def test_child_dies_with_sigkilled_parent(tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(
        textwrap.dedent(f"""
        import asyncio, sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from runtimes.registry import load_model

        async def main():
            adapter = await load_model({str(ECHO)!r})
            print(adapter.proc.pid, flush=True)
            await asyncio.sleep(600)

        asyncio.run(main())
    """)
    )
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        line = parent.stdout.readline() if parent.stdout else ""
        child = int(line)
        assert _alive(child)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 5
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child), "custom server outlived its SIGKILLed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


async def test_missing_executable_is_a_load_error(tmp_path: Path) -> None:
    d = _model(tmp_path, {"start_command": ["enginehouse-no-such-binary", "{port}"]})
    with pytest.raises(ModelLoadError, match="cannot start"):
        await load_model(d)


@pytest.mark.skipif(
    any(
        shutil.which(x) and subprocess.run([x, "info"], capture_output=True, timeout=30, check=False).returncode == 0
        for x in ("docker", "podman")
    ),
    reason="a container engine answers here",
)
async def test_image_without_container_engine(tmp_path: Path) -> None:
    d = _model(tmp_path, {"image": "example/echo:1"})
    with pytest.raises(ModelLoadError, match="no container engine"):
        await load_model(d)


FAKE_DOCKER = '''#!{python}
"""The docker CLI at the outermost boundary: records its arguments, runs the container's command locally."""
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_DOCKER_LOG"], "a") as log:
    log.write(json.dumps(args) + "\\n")
if args[0] != "run":
    sys.exit(0)  # info, rm
i, env, mounts, entry = 1, {{}}, {{}}, None
while args[i].startswith("-"):
    a = args[i]
    if a == "--rm":
        i += 1
    elif a in ("--name", "-p"):
        i += 2
    elif a == "-v":
        src, dst, _ = args[i + 1].split(":")
        mounts[dst] = src
        i += 2
    elif a == "-e":
        k, v = args[i + 1].split("=", 1)
        env[k] = v
        i += 2
    elif a == "--entrypoint":
        entry = args[i + 1]
        i += 2
    else:
        i += 1  # --cpus=..., --memory=..., --gpus=...
argv = ([entry] if entry else []) + args[i + 1:]
argv = [sys.executable if a == "python" else a.replace("/model", mounts["/model"]) for a in argv]
os.execve(argv[0], argv, {{**os.environ, **env}})
'''


async def test_container_gets_the_specification_limits_and_is_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from runtimes.base import Placement

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    docker = bin_dir / "docker"
    docker.write_text(FAKE_DOCKER.format(python=sys.executable))
    docker.chmod(0o755)
    log = tmp_path / "docker.log"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_DOCKER_LOG", str(log))
    d = _model(
        tmp_path,
        {"image": "python:3.11-slim", "container_command": ["python", "/model/server.py", "--port", "{port}"]},
    )
    shutil.copy(ECHO / "server.py", d / "server.py")
    adapter = await load_model(d, placement=Placement(cpu_threads=1, cpus=0.5, memory_mb=256))
    try:
        status, _, body = await adapter.forward("POST", "/x", {}, b"hi")  # type: ignore[attr-defined]
        echo = json.loads(body)
        assert status == 200 and echo["model_dir"] == "/model" and echo["body_text"] == "hi"
    finally:
        await adapter.unload()
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    run = next(c for c in calls if c[0] == "run")
    assert "--cpus=0.5" in run and "--memory=256m" in run
    assert run[run.index("-p") + 1].startswith("127.0.0.1:")  # published on loopback only
    assert f"{d.resolve()}:/model:ro" in run
    name = run[run.index("--name") + 1]
    assert ["rm", "-f", name] in calls  # removed by name on unload, even if the client was killed
