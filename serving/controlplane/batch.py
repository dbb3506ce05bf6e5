"""Batch services (``infer_type: batch``): the checks at create time, the job's life in the reconciler, the view.

A batch service has one config entry (its model and resources) and ``src_path``, ``dest_path``,
``mapping_type``, ``mapping_rule``. The reconciler runs it as one :class:`serving.batch.runner.BatchRunner`
actor named ``enginehouse-batch-{service_id}``, owned by the control plane's process: if that process dies,
the runner (and the Ray Data actors it started) die with it, and the next control plane starts a new runner,
which resumes from the manifest in ``dest_path`` (no input processed twice, none skipped).

Status: ``deploying`` until the runner has started, ``running`` with ``progress`` and the counts while it
works, ``finished`` when every input is in the manifest, ``failed`` only when the job itself cannot run (the
model does not load, the folder went away), ``stopping``/``stopped`` on a user's stop (the job is killed
between batches; starting it again resumes).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from serving.controlplane import cluster
from serving.controlplane.errors import InvalidRequest, PathNotAllowed
from serving.registry.db import now_ms
from serving.registry.schema import Model, Service

log = logging.getLogger(__name__)

NAMESPACE = "enginehouse"
#: how long one progress call may take before the tick moves on (the runner answers from memory)
PROGRESS_TIMEOUT_S = 5.0


def runner_name(service_id: str) -> str:
    return f"enginehouse-batch-{service_id}"


def check_request(
    service_id_hint: str,
    src_path: str | None,
    dest_path: str | None,
    mapping_type: str | None,
    mapping_rule: dict[str, Any] | None,
    config: list[dict[str, Any]],
    model: Model,
    roots: list[Path],
) -> dict[str, Any]:
    """The ``batch`` part of a new batch service, or a 4xx naming the field; nothing runs before this passes."""
    from serving.batch import BatchSpec, BatchSpecError, PathError, check_paths

    if len(config) != 1:
        raise InvalidRequest(f"config: a batch service runs one model, {len(config)} entries given")
    if not src_path:
        raise InvalidRequest("src_path: required for infer_type batch (the folder of inputs)")
    if not dest_path:
        raise InvalidRequest("dest_path: required for infer_type batch (the folder for results and the manifest)")
    mapping = mapping_type or "file"
    if mapping_rule is not None and mapping != "csv":
        raise InvalidRequest("mapping_rule: only read with mapping_type csv")
    from serving.controlplane.manager import resolve_source

    src = resolve_source(src_path, roots, "src_path")
    dest = resolve_source(dest_path, roots, "dest_path", must_exist=False)
    if model.engine_config is None or model.engine_config["config"].get("engine") == "Custom":
        raise InvalidRequest(
            f"config[0].model_id: model {model.model_name} {model.model_version} runs on the Custom engine; "
            "a batch service needs a model with a tensor signature"
        )
    try:
        spec = BatchSpec(
            service_id=service_id_hint,
            model_dir=model.engine_config["model_dir"],
            src_path=str(src),
            dest_path=str(dest),
            mapping_type=mapping,
            mapping_rule=mapping_rule,
        )
        check_paths(spec)
    except PathError as exc:
        raise PathNotAllowed(str(exc)) from None
    except BatchSpecError as exc:
        raise InvalidRequest(str(exc)) from None
    if mapping == "csv" and model.signature:
        from runtimes.base import Signature, TensorSpec
        from serving.batch.inputs import parse_rule

        sig = Signature(
            tuple(TensorSpec(t["name"], t["datatype"], tuple(t["shape"])) for t in model.signature["inputs"]),
            tuple(TensorSpec(t["name"], t["datatype"], tuple(t["shape"])) for t in model.signature["outputs"]),
        )
        try:
            parse_rule(mapping_rule, sig)
        except ValueError as exc:
            raise InvalidRequest(f"mapping_rule: {exc}") from None
    return {
        "src_path": str(src),
        "dest_path": str(dest),
        "mapping_type": mapping,
        "mapping_rule": mapping_rule,
        "total": 0,
        "succeeded": 0,
        "failed": 0,
    }


def _spec(row: Service, model: Model, nodes: list[cluster.NodeInfo]) -> dict[str, Any]:
    from serving.controlplane.reconciler import resources_of

    entry = row.config[0]
    batch = row.batch or {}
    res = resources_of(entry, nodes)
    assert model.engine_config is not None
    return {
        "service_id": row.service_id,
        "model_dir": model.engine_config["model_dir"],
        "model_config": model.engine_config["config"],
        "model_name": model.model_name,
        "model_version": model.model_version,
        "src_path": batch["src_path"],
        "dest_path": batch["dest_path"],
        "mapping_type": batch.get("mapping_type", "file"),
        "mapping_rule": batch.get("mapping_rule"),
        "instance_count": int(entry.get("instance_count", 1)),
        "num_cpus": float(res["cpu"]),
        "num_gpus": float(res["gpu"]),
        "resources": {k: float(v) for k, v in (res.get("npu") or {}).items()},
        "max_batch_size": int(entry.get("max_batch_size", 32)),
    }


class BatchDriver:
    """The reconciler's hands on batch services: one call per service per tick."""

    def __init__(self, set_status: Any, registry: Any) -> None:
        self._set = set_status  # Reconciler._set(row, status, reason, **fields)
        self.registry = registry
        # The runners' handles: a runner lives as long as its handle here (Ray kills an actor nobody holds), so
        # a control plane that goes away takes its jobs with it, and the next one resumes them.
        self._runners: dict[str, Any] = {}

    def _runner(self, service_id: str) -> Any:
        return self._runners.get(service_id)

    def _kill(self, service_id: str) -> None:
        import ray

        runner = self._runners.pop(service_id, None)
        if runner is not None:
            ray.kill(runner, no_restart=True)

    def step(self, row: Service, models: dict[str, Model], nodes: list[cluster.NodeInfo]) -> None:
        """Move one batch service toward its desired state."""
        if row.status == "deleting":
            self._kill(row.service_id)
            self.registry.delete_service(row.project_id, row.service_id)
            log.info("batch service %s deleted", row.service_id)
            return
        if row.desired_status == "stopped":
            if row.status != "stopped":
                self._record(row, self._runner(row.service_id))  # keep the counts it reached
                self._kill(row.service_id)
                self._set(row, "stopped", "stopped; starting it again resumes from the manifest")
            return
        if row.status in ("finished", "failed"):
            return
        model = models[row.config[0]["model_id"]]
        if model.model_status == "failed":
            self._set(
                row, "failed", f"model {model.model_name} {model.model_version} failed validation",
                error_msg=model.error_msg,
            )  # fmt: skip
            return
        if model.model_status == "publishing":
            self._set(row, "deploying", "waiting for model validation", progress=0)
            return
        runner = self._runner(row.service_id)
        if runner is None:
            self._start(row, model, nodes)
            return
        state = self._record(row, runner)
        if state is None:
            return
        if state["state"] == "finished":
            self._kill(row.service_id)
            self._set(
                row, "finished", f"{state['total']} inputs: {state['succeeded']} succeeded, {state['failed']} failed",
                progress=100,
            )  # fmt: skip
        elif state["state"] == "failed":
            self._kill(row.service_id)
            self._set(row, "failed", "the batch job cannot run", error_msg=state.get("error"))
        elif state["state"] == "stopped":  # not asked by us: a new runner resumes next tick
            self._kill(row.service_id)
        else:
            self._set(row, "running", "batch job running", progress=int(state.get("progress") or 0))

    def _start(self, row: Service, model: Model, nodes: list[cluster.NodeInfo]) -> None:
        import ray

        from serving.batch.runner import BatchRunner

        spec = _spec(row, model, nodes)
        runner = BatchRunner.options(  # type: ignore[attr-defined]
            name=runner_name(row.service_id), namespace=NAMESPACE, get_if_exists=True
        ).remote()
        self._runners[row.service_id] = runner
        try:
            ray.get(runner.start.remote(spec), timeout=60)
        except ray.exceptions.RayTaskError as exc:
            self._kill(row.service_id)
            reason = str(exc.cause) if getattr(exc, "cause", None) else str(exc)
            self._set(row, "failed", "the batch job cannot run", error_msg=reason.strip()[-2000:])
            return
        started = dict(row.batch or {})
        started.setdefault("start_time", now_ms())
        started.pop("finished_time", None)
        self.registry.update_service(row.project_id, row.service_id, batch=started, update_time=row.update_time)
        row.batch = started
        self._set(row, "running", "batch job started (inputs already in the manifest are skipped)", progress=0)

    def _record(self, row: Service, runner: Any) -> dict[str, Any] | None:
        """Read the runner's progress into the service's batch counts; None when it does not answer."""
        import ray

        if runner is None:
            return None
        try:
            state: dict[str, Any] = ray.get(runner.progress.remote(), timeout=PROGRESS_TIMEOUT_S)
        except ray.exceptions.RayActorError:  # gone (its node died): a new runner resumes next tick
            self._runners.pop(row.service_id, None)
            return None
        except (ray.exceptions.RayError, TimeoutError):
            return None
        batch = dict(row.batch or {})
        now = {k: int(state.get(k) or 0) for k in ("total", "succeeded", "failed")}
        if state["state"] in ("finished", "failed", "stopped") and state.get("finished_at"):
            now["finished_time"] = int(state["finished_at"])
        if any(batch.get(k) != v for k, v in now.items()):
            batch.update(now)
            self.registry.update_service(row.project_id, row.service_id, batch=batch, update_time=row.update_time)
            row.batch = batch
        return state


def view(row: Service, out: dict[str, Any]) -> None:
    """Add a batch service's fields to its detail: paths and times on the config entry, progress and counts."""
    batch = row.batch or {}
    for entry in out["config"]:
        entry.update(
            src_path=batch.get("src_path"),
            dest_path=batch.get("dest_path"),
            req_uri="/",
            mapping_type=batch.get("mapping_type", "file"),
        )
        if batch.get("mapping_type") == "csv":
            entry["mapping_rule"] = batch.get("mapping_rule")
        for key in ("start_time", "finished_time"):
            if batch.get(key) is not None:
                entry[key] = batch[key]
    total, succeeded, failed = (int(batch.get(k) or 0) for k in ("total", "succeeded", "failed"))
    done = succeeded + failed
    out.update(
        total=total,
        succeeded=succeeded,
        failed=failed,
        progress=100 if row.status == "finished" else (done * 100 // total if total else row.progress),
        invocation_times=done,
        failed_times=failed,
    )
    if row.status == "finished" and batch.get("dest_path"):
        out["manifest"] = str(Path(batch["dest_path"]) / f"infer-result-{row.service_id}.manifest")
