"""`enginehouse up --address` joins a real Ray cluster made by `ray start --head` instead of starting its own."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from models.mlp_weights import mlp_reference
from tests.conftest import free_port

# the bounded waits below add up to more than pytest's default 300 s on a loaded 2-core machine
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
RAY = Path(sys.executable).with_name("ray")
# where the HAProxy manager on the head (which inherits this environment) keeps its files per node id
HAPROXY_BASE = os.environ.get("RAY_SERVE_HAPROXY_SERVER_STATE_BASE", "/tmp/haproxy-serve")
HEAD_UP_S, SERVICE_RUNNING_S, APP_GONE_S, PROBE_S = 90, 180, 60, 60

# A second driver's view of the cluster, so what is asserted is what the head itself reports and not what
# `up` believes. Prints one JSON line after the marker.
PROBE = """
import json, sys
import ray
from ray import serve
from ray._private import state

ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
actors = [
    {"name": a["Name"], "state": a["State"], "node_id": a["Address"]["NodeID"], "pid": a["Pid"]}
    for a in state.actors().values()
    if a["Name"].startswith("SERVE_REPLICA::")
]
nodes = [
    {"node_id": n["NodeID"], "alive": n["Alive"], "raylet_socket": n["RayletSocketName"]}
    for n in ray.nodes()
]
apps = {name: str(app.status.value) for name, app in serve.status().applications.items()}
print("PROBE " + json.dumps({"apps": apps, "replicas": actors, "nodes": nodes}), flush=True)
"""


def session_processes(sid: int) -> dict[int, str]:
    """``{pid: command name}`` of every process in session ``sid`` (Ray's workers leave their process group
    for one of their own, but never the session, so the session is what holds all of a Ray node)."""
    out = subprocess.run(["ps", "-eo", "pid=,sid=,comm="], capture_output=True, text=True, check=True).stdout
    procs = {}
    for line in out.splitlines():
        pid, s, comm = line.split(None, 2)
        if int(s) == sid:
            procs[int(pid)] = comm.strip()
    return procs


def kill_session(proc: subprocess.Popen[Any], timeout_s: float = 30) -> None:
    """SIGKILL every process of the session ``proc`` leads. SIGTERM would make `ray start --block` drain the
    node for up to 30 s, and hang there once its raylet is gone."""
    deadline = time.monotonic() + timeout_s
    while (procs := session_processes(proc.pid)) and time.monotonic() < deadline:
        for pid in procs:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            with suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1)
        time.sleep(0.2)


def tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def probe(address: str, env: dict[str, str]) -> dict[str, Any]:
    r = subprocess.run([sys.executable, "-c", PROBE, address], env=env, capture_output=True, text=True, timeout=PROBE_S)
    lines = [line for line in r.stdout.splitlines() if line.startswith("PROBE ")]
    assert r.returncode == 0 and lines, f"probe failed ({r.returncode}): {r.stdout[-2000:]}{r.stderr[-3000:]}"
    return json.loads(lines[-1].removeprefix("PROBE "))


@contextmanager
def ray_head(workdir: Path, token_file: Path) -> Iterator[tuple[subprocess.Popen[Any], str, dict[str, str]]]:
    """A real head made by `ray start --head --block`, every port on 127.0.0.1 and free; yields the process,
    its address and the environment a client needs to join it (token auth on, this test's token)."""
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}
    # RAY_AUTH_TOKEN would win over RAY_AUTH_TOKEN_PATH; RAY_ADDRESS would point a client elsewhere
    base = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_ADDRESS")}
    client_env = {**base, **auth, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    head_env = {
        **client_env,
        # the data-plane flags must be set on every node of a user's cluster: the controller, the proxies
        # and HAProxy run there and read them, not the `up` driver
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        # fixed defaults otherwise, and another Serve may run beside this one on the machine
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        # a removed replica would drain 30 s for outside load balancers; nothing balances to it here
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
    }
    port = free_port()
    args = [str(RAY), "start", "--head", "--block", "--num-cpus", "2", "--port", str(port)]
    args += ["--include-dashboard=false", "--disable-usage-stats", "--temp-dir", str(workdir / "ray")]
    for flag in (
        "--node-manager-port",
        "--object-manager-port",
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port",
        "--metrics-export-port",
        "--ray-client-server-port",
    ):
        args += [flag, str(free_port())]
    log = workdir / "head.log"
    with log.open("w") as out:
        head = subprocess.Popen(args, env=head_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield head, f"127.0.0.1:{port}", client_env
    finally:
        kill_session(head)


def test_up_joins_an_existing_cluster(example_models: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(example_models / "mlp-onnx", repo / "mlp-onnx")
    # short on purpose: Ray puts unix sockets under the temp dir and a socket path has at most 107 characters
    workdir = Path(tempfile.mkdtemp(prefix="ehj"))
    token_file = workdir / "auth_token"
    token_file.write_text(secrets.token_hex(32))  # what `ray get-auth-token --generate` writes
    token_file.chmod(0o600)
    cp, dp = free_port(), free_port()
    up_log = tmp_path / "up.log"
    node_id = ""
    up: subprocess.Popen[Any] | None = None
    try:
        with ray_head(workdir, token_file) as (head, address, client_env):
            deadline = time.monotonic() + HEAD_UP_S
            while not (workdir / "ray" / "ray_current_cluster").exists():
                assert head.poll() is None, f"ray start exited {head.returncode}: {tail(workdir / 'head.log')}"
                assert time.monotonic() < deadline, f"head not up in {HEAD_UP_S} s: {tail(workdir / 'head.log')}"
                time.sleep(0.5)
            before = probe(address, client_env)
            assert len(before["nodes"]) == 1 and before["apps"] == {}, before
            node_id = before["nodes"][0]["node_id"]

            # the head really enforces its token: the same join with another token is refused
            wrong = workdir / "wrong_token"
            wrong.write_text(secrets.token_hex(32))
            refused = subprocess.run(
                [sys.executable, "-c", PROBE, address],
                # a refused driver retries the GCS for 20 s by default as if it were still starting
                env={**client_env, "RAY_AUTH_TOKEN_PATH": str(wrong), "RAY_NUM_REDIS_GET_RETRIES": "2"},
                capture_output=True,
                text=True,
                timeout=PROBE_S,
            )
            assert refused.returncode != 0 and "PROBE " not in refused.stdout, refused.stdout[-2000:]
            assert "InvalidAuthToken" in refused.stderr, refused.stderr[-3000:]

            env = {**client_env, "ENGINEHOUSE_HOME": str(tmp_path / "home")}
            cmd = [sys.executable, "-m", "serving.cli", "up", "--address", address, "--port", str(cp)]
            cmd += ["--data-port", str(dp), "--model-repository", str(repo)]
            with up_log.open("w") as out:
                up = subprocess.Popen(
                    cmd,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            service: dict[str, Any] = {}
            deadline = time.monotonic() + SERVICE_RUNNING_S
            with httpx.Client(timeout=10) as client:
                while time.monotonic() < deadline:
                    assert up.poll() is None, f"up exited {up.returncode}: {tail(up_log)}"
                    try:
                        r = client.get(f"http://127.0.0.1:{cp}/v1/default/services")
                        found = [s for s in r.json()["services"] if s["service_name"] == "mlp-onnx"]
                        if found and found[0]["status"] == "running":
                            service = found[0]
                            break
                    except httpx.TransportError:
                        pass
                    time.sleep(1)
                else:
                    pytest.fail(f"mlp-onnx not running within {SERVICE_RUNNING_S} s: {tail(up_log)}")

                r = client.post(service["access_address"], json={"instances": [[1, 2, 3, 4]]})
                assert r.status_code == 200, r.text
                np.testing.assert_allclose(
                    r.json()["predictions"], mlp_reference(np.array([[1, 2, 3, 4]], np.float32)), atol=1e-4
                )

                # the control plane sees the head's node and nothing else: no second Ray came up beside it
                nodes = client.get(f"http://127.0.0.1:{cp}/v2/default/pools/default/nodes").json()["items"]
                assert [n["metadata"]["name"].rsplit("-", 1)[-1] for n in nodes] == [node_id[:8]], nodes
                assert nodes[0]["status"]["privateIp"] == "127.0.0.1"
                assert nodes[0]["status"]["resources"]["cpu"] == "2000m", nodes

            # the head's own view: the service's application runs there, its replica is a process of the head
            during = probe(address, client_env)
            app = service["service_id"]
            # the service's application, and the /v2 gateway that routes OIP calls by service name
            assert during["apps"][app] == "RUNNING" and set(during["apps"]) == {app, "enginehouse-v2"}, during
            [node] = during["nodes"]
            assert node["node_id"] == node_id and node["alive"], during
            assert node["raylet_socket"].startswith(str(workdir / "ray") + os.sep), node
            replicas = [a for a in during["replicas"] if a["name"].startswith(f"SERVE_REPLICA::{app}#")]
            assert replicas and all(a["state"] == "ALIVE" and a["node_id"] == node_id for a in replicas), during
            assert all(os.getsid(a["pid"]) == head.pid for a in replicas), replicas
            head_procs = session_processes(head.pid)
            assert "haproxy" in head_procs.values(), head_procs  # the ingress is the head's HAProxy
            # an embedded Ray would be children of `up`, in its session
            up_procs = session_processes(up.pid)
            assert not {"raylet", "gcs_server"} & set(up_procs.values()), up_procs

            replica_pids = {a["pid"] for a in replicas}
            up.send_signal(signal.SIGTERM)
            try:
                assert up.wait(timeout=60) == 0, tail(up_log)
            finally:
                if up.poll() is None:
                    os.killpg(up.pid, signal.SIGKILL)
                    up.wait(timeout=10)

            # a joined cluster is not ours to stop, but what `up` deployed on it leaves with it
            deadline = time.monotonic() + APP_GONE_S
            while True:
                assert head.poll() is None, f"the head exited with `up`: {tail(workdir / 'head.log')}"
                after = probe(address, client_env)
                live = [a for a in after["replicas"] if app in a["name"] and a["state"] != "DEAD"]  # Ray keeps the dead
                if app not in after["apps"] and not live and not replica_pids & set(session_processes(head.pid)):
                    break
                assert time.monotonic() < deadline, f"{app} still on the cluster {APP_GONE_S} s after up: {after}"
                time.sleep(1)
            assert [(n["node_id"], n["alive"]) for n in after["nodes"]] == [(node_id, True)], after
            assert not session_processes(up.pid), session_processes(up.pid)
    finally:
        if up is not None and up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)
        if node_id:  # HAProxy keeps its config and sockets per node id outside Ray's temp dir
            shutil.rmtree(Path(HAPROXY_BASE) / node_id, ignore_errors=True)
    assert not session_processes(head.pid), f"processes of the head left behind: {session_processes(head.pid)}"
    leftovers = subprocess.run(["pgrep", "-f", str(workdir)], capture_output=True, text=True).stdout.split()
    assert not leftovers, f"processes left behind: {leftovers}"
