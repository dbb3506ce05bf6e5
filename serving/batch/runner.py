"""BatchRunner: the Ray actor that runs one batch service's job for the control plane.

The control plane starts one named actor per batch service and talks to it with three calls::

    runner = BatchRunner.options(name=f"enginehouse-batch-{service_id}", namespace="enginehouse").remote()
    ray.get(runner.start.remote(spec.as_dict()))   # returns at once; bad spec/paths raise here (ValueError)
    ray.get(runner.progress.remote())              # {"state", "total", "succeeded", "failed", "progress", ...}
    ray.get(runner.stop.remote())                  # asks the job to stop after its current batch

The job runs in a thread of the actor (:func:`serving.batch.job.run_job`, the manifest's only writer), so
``progress`` and ``stop`` answer while it runs. The control plane keeps the handle (not detached): a runner lives
as long as the control plane that started it. The actor asks for no CPU itself: the inference actors it starts
through Ray Data carry the job's resources. Killing the actor kills the job with it (Ray Data's actors belong
to it); starting a job again over the same ``dest_path`` resumes from the manifest.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import ray

from serving.batch.job import BatchSpec, Summary, check_paths, run_job

#: what ``progress()["state"]`` can be
STATES = ("idle", "running", "finished", "failed", "stopped")


def _now_ms() -> int:
    return int(time.time() * 1000)


@ray.remote(num_cpus=0)
class BatchRunner:
    """One batch job at a time, run in a background thread; see the module docstring for the protocol."""

    def __init__(self) -> None:
        # Ray Data (pandas, pyarrow) is imported here, on the actor's main thread: imported first by the job's
        # thread, the import competed for the GIL with the actor's task loop and took minutes
        import ray.data  # noqa: F401

        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._spec: BatchSpec | None = None
        self._status: dict[str, Any] = self._blank("idle")

    @staticmethod
    def _blank(state: str) -> dict[str, Any]:
        return {
            "state": state,
            "total": 0,
            "succeeded": 0,
            "failed": 0,
            "progress": 0,
            "error": None,
            "started_at": None,
            "finished_at": None,
            "manifest": None,
        }

    def start(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Start the job of ``spec`` (a :class:`BatchSpec` as a dict) in the background and return ``progress()``.

        A spec or path that cannot work raises here, at once (BatchSpecError/PathError, both ValueError). While a
        job runs, another ``start`` changes nothing and returns its progress; after one ended, ``start`` runs the
        job again, which resumes from its manifest (a finished job then only re-counts).
        """
        parsed = BatchSpec.from_dict(spec)
        check_paths(parsed)
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return dict(self._status)
            self._spec = parsed
            self._stop = threading.Event()
            self._status = self._blank("running")
            self._status["started_at"] = _now_ms()
            self._thread = threading.Thread(
                target=self._run, args=(parsed, self._stop), name=f"batch-{parsed.service_id}", daemon=True
            )
            self._thread.start()
            return dict(self._status)

    def _update(self, summary: Summary) -> None:
        with self._lock:
            self._status.update(
                total=summary.total,
                succeeded=summary.succeeded,
                failed=summary.failed,
                progress=summary.progress,
                manifest=summary.manifest,
            )

    def _run(self, spec: BatchSpec, stop: threading.Event) -> None:
        try:
            summary = run_job(spec, on_progress=self._update, stop=stop)
        except Exception as exc:
            with self._lock:
                self._status.update(state="failed", error=str(exc) or type(exc).__name__, finished_at=_now_ms())
            return
        self._update(summary)
        with self._lock:
            self._status.update(state="stopped" if summary.stopped else "finished", finished_at=_now_ms())

    def progress(self) -> dict[str, Any]:
        """``state`` (idle, running, finished, failed, stopped), ``total``, ``succeeded``, ``failed``,
        ``progress`` (0-100), ``error`` (the reason of a failed job, else None), ``started_at`` and
        ``finished_at`` (epoch ms, None until then) and ``manifest`` (its path, once known)."""
        with self._lock:
            return dict(self._status)

    def stop(self) -> dict[str, Any]:
        """Ask the running job to stop after the batch in hand (the state becomes ``stopped`` shortly); returns
        ``progress()``. Stopping a job that is not running does nothing. The job sees the request between two
        batches: one waiting for the cluster to fit its first actor only stops when killed (``ray.kill``)."""
        self._stop.set()
        return self.progress()
