"""``enginehouse batch``: run a batch job from the command line, with a live progress bar.

``serving.cli`` registers it with ``add_parser(subparsers)``. The command starts a local Ray (or joins
``--address`` / ``RAY_ADDRESS``), runs :func:`serving.batch.run_job` and prints a summary. Exit codes: 0 when the
job ran to its end (FAILED inputs included), 1 when the job as a whole failed (e.g. the model does not load),
2 for a bad argument or path (the reason on stderr), 130 when stopped with Ctrl-C (the manifest lets the same
command resume).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from serving.batch.job import BatchSpec, Summary


class _ArgError(Exception):
    """A bad command-line argument: printed to stderr, exit code 2."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``batch`` on an ``add_subparsers()`` object; returns its parser."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "batch",
        help="run a model over every input in a folder and write one result per input (a batch job)",
        description="Run a model over every input under --input; results and a manifest go to --output. "
        "Running the same command again resumes: inputs already in the manifest are skipped.",
    )
    p.add_argument(
        "--model", required=True, metavar="MODEL_ID_OR_PATH", help="a model version folder, or a registered model id"
    )
    p.add_argument("--input", required=True, metavar="DIR", help="the folder of inputs (src_path)")
    p.add_argument("--output", required=True, metavar="DIR", help="where results and the manifest go (dest_path)")
    p.add_argument("--mapping-type", choices=("file", "csv"), default="file", help="one input per file, or per CSV row")
    p.add_argument(
        "--mapping-rule", metavar="JSON", help='CSV columns per input, e.g. \'{"inputs": {"x": ["a", "b"]}}\''
    )
    p.add_argument("--instances", type=int, default=1, metavar="N", help="inference actors (default 1)")
    p.add_argument("--num-cpus", type=float, default=1.0, metavar="X", help="CPUs per instance (default 1)")
    p.add_argument("--num-gpus", type=float, default=0.0, metavar="X", help="GPUs per instance (default 0)")
    p.add_argument("--max-batch-size", type=int, metavar="N", help="rows per engine call (default: the model's)")
    p.add_argument(
        "--service-id", default="local", help="names the manifest infer-result-<id>.manifest (default local)"
    )
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"), help="join this Ray cluster")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_batch)
    return p


def _resolve_model(value: str) -> dict[str, Any]:
    """Spec fields for ``--model``: a version folder as is, else a registered model id looked up in the registry."""
    path = Path(value).expanduser()
    if path.is_dir():
        return {"model_dir": str(path)}
    if os.sep in value or value.startswith(".") or path.exists():
        raise _ArgError(f"--model: {value} is not a model version folder")
    from serving.registry import open_registry
    from serving.settings import Settings

    settings = Settings()
    registry = open_registry(settings.database_url, settings.home)
    try:
        row = registry.models_by_id([value]).get(value)
    finally:
        registry.close()
    if row is None:
        raise _ArgError(
            f"--model: {value} is neither a folder nor a model id in the registry ({settings.registry_url()})"
        )
    engine = row.engine_config or {}
    if "model_dir" not in engine:
        raise _ArgError(f"--model: model {value} has no engine config in the registry (registered by an old version?)")
    return {
        "model_dir": engine["model_dir"],
        "model_config": engine.get("config"),
        "model_name": row.model_name,
        "model_version": row.model_version,
    }


def _spec(args: argparse.Namespace) -> BatchSpec:
    from serving.batch.job import BatchSpec

    rule = None
    if args.mapping_rule:
        try:
            rule = json.loads(args.mapping_rule)
        except ValueError as exc:
            raise _ArgError(f"--mapping-rule is not JSON: {exc}") from None
    return BatchSpec(
        service_id=args.service_id,
        src_path=args.input,
        dest_path=args.output,
        mapping_type=args.mapping_type,
        mapping_rule=rule,
        instance_count=args.instances,
        num_cpus=args.num_cpus,
        num_gpus=args.num_gpus,
        max_batch_size=args.max_batch_size,
        **_resolve_model(args.model),
    )


def _start_ray(args: argparse.Namespace) -> bool:
    """Connect to Ray unless this process already is; True when this call started the connection."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if args.address:
        ray.init(address=args.address, log_to_driver=False, logging_level=logging.ERROR)
    else:
        # enough logical CPUs for the instances asked for, at least the machine's cores
        cpus = max(os.cpu_count() or 1, math.ceil(args.instances * args.num_cpus))
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    return True


def _run_with_bar(spec: BatchSpec, stderr_console: Any) -> tuple[Summary | None, BaseException | None, bool]:
    """Run the job in a thread, the bar in this one; Ctrl-C asks the job to stop (twice: leave at once)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from serving.batch.job import run_job

    stop = threading.Event()
    outcome: dict[str, Any] = {}
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("[green]{task.fields[ok]} ok[/] [red]{task.fields[bad]} failed[/]"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=stderr_console,
        transient=False,
    )
    task = progress.add_task(f"batch {spec.service_id}", total=None, ok=0, bad=0)

    def on_progress(s: Summary) -> None:
        progress.update(task, total=s.total, completed=s.succeeded + s.failed, ok=s.succeeded, bad=s.failed)

    def work() -> None:
        try:
            outcome["summary"] = run_job(spec, on_progress=on_progress, stop=stop)
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=work, name="batch-job", daemon=True)
    interrupted = False
    with progress:
        thread.start()
        while thread.is_alive():
            try:
                thread.join(0.2)
            except KeyboardInterrupt:
                if interrupted:
                    raise
                interrupted = True
                stop.set()
                progress.update(task, description=f"batch {spec.service_id} (stopping)")
    return outcome.get("summary"), outcome.get("error"), interrupted


def _print_summary(summary: Summary, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary.as_dict()))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"batch job {summary.service_id}" + (" (stopped)" if summary.stopped else ""), show_header=False
    )
    table.add_column("")
    table.add_column("", justify="right")
    for label, value in (
        ("total", f"{summary.total:,}"),
        ("succeeded", f"{summary.succeeded:,}"),
        ("failed", f"{summary.failed:,}"),
        ("already done before this run", f"{summary.skipped:,}"),
        ("processed by this run", f"{summary.processed:,}"),
        ("elapsed", f"{summary.elapsed_s:.1f} s"),
        ("inputs/s", f"{summary.inputs_per_s:,.1f}"),
    ):
        table.add_row(label, value)
    console = Console()
    console.print(table)
    console.print(f"manifest: {summary.manifest}", soft_wrap=True)


@contextlib.contextmanager
def _ray_noise_to(log_path: Path) -> Iterator[TextIO]:
    """Send file descriptor 2 to ``log_path`` while Ray runs, and yield a stream on the real stderr for the bar.

    Ray's C++ core worker writes to fd 2 directly (e.g. an error-level line for every actor Ray Data creates,
    about constructor arguments in the object store), which no Python logging setting reaches.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with log_path.open("wb") as log:
        os.dup2(log.fileno(), 2)
    try:
        with os.fdopen(os.dup(saved), "w", buffering=1) as terminal:
            yield terminal
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def cmd_batch(args: argparse.Namespace) -> int:
    """The handler of ``enginehouse batch``; returns the exit code."""
    from rich.console import Console

    from serving.batch.job import BatchSpecError, check_paths

    try:
        spec = _spec(args)
        check_paths(spec)
    except (_ArgError, BatchSpecError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log_path = Path(tempfile.gettempdir()) / f"enginehouse-batch-{spec.service_id}.log"
    with _ray_noise_to(log_path) as terminal:
        started = _start_ray(args)
        try:
            summary, error, interrupted = _run_with_bar(spec, Console(file=terminal))
        finally:
            if started:
                import ray

                ray.shutdown()
    if error is not None:
        print(f"(Ray's own messages are in {log_path})", file=sys.stderr)
    if isinstance(error, BatchSpecError):
        print(f"error: {error}", file=sys.stderr)
        return 2
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
        return 1
    assert summary is not None
    _print_summary(summary, args.json)
    return 130 if interrupted else 0
