"""One batch job: list the inputs, skip those the manifest already has, run the rest through a Ray Data actor
pool, and append each result to the manifest as it streams back. See :mod:`serving.batch` for the formats.

:func:`run_job` is the driver: it runs in the calling process (a Ray driver, or the thread of a
:class:`serving.batch.runner.BatchRunner` actor) and is the manifest's only writer.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, cast

import ray

from runtimes.base import ModelConfig, Signature, read_model_config
from runtimes.errors import EnginehouseError
from serving.batch.inputs import CSV_SUFFIX, CsvRule, csv_inputs, parse_rule, signature_from_dict, suffix_of
from serving.batch.manifest import SUCCESSFUL, Manifest, failure_line, manifest_path, success_line
from serving.batch.worker import InferWorker, clean, csv_source, expand_csv, format_ranges

log = logging.getLogger("enginehouse.batch")

MAPPING_TYPES = ("file", "csv")
_SERVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_VERSION_DIR = re.compile(r"^v?\d+(\.\d+)*([.-].*)?$")


class BatchSpecError(ValueError):
    """A job spec that cannot run as given; ``field`` names the culprit (``src_path``, ``mapping_rule``...)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message if message.startswith(field) else f"{field}: {message}")
        self.field = field

    def __reduce__(self) -> tuple[Any, ...]:
        # rebuilt from (field, message) when it crosses Ray (the default would call __init__(message) alone)
        return (type(self), (self.field, str(self)))


class PathError(BatchSpecError):
    """``src_path`` or ``dest_path`` is unusable (missing, not a folder, unreadable, or dest inside src)."""


class BatchJobError(RuntimeError):
    """The job as a whole failed: the model does not load, or Ray Data stopped with an error."""


@dataclass
class BatchSpec:
    """What a batch job runs. ``model_config`` (a ``config.json`` as a dict, e.g. a registered model's
    ``engine_config["config"]``) overrides the ``config.json`` in ``model_dir``; ``max_batch_size`` overrides
    the config's. ``model_name`` / ``model_version`` go into every OIP response (default: from the folder,
    ``<name>/<version>``)."""

    service_id: str
    model_dir: str
    src_path: str
    dest_path: str
    mapping_type: str = "file"
    mapping_rule: dict[str, Any] | None = None
    instance_count: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    max_batch_size: int | None = None
    model_config: dict[str, Any] | None = None
    model_name: str | None = None
    model_version: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.service_id, str) or not _SERVICE_ID.match(self.service_id):
            raise BatchSpecError("service_id", f"{self.service_id!r} must be 1-128 of [A-Za-z0-9._-]")
        for name in ("model_dir", "src_path", "dest_path"):
            value = getattr(self, name)
            if not isinstance(value, str | os.PathLike) or not str(value).strip():
                raise PathError(name, "is required")
            setattr(self, name, str(value))
        if self.mapping_type not in MAPPING_TYPES:
            raise BatchSpecError("mapping_type", f"{self.mapping_type!r} is not one of {', '.join(MAPPING_TYPES)}")
        if self.mapping_rule is not None and not isinstance(self.mapping_rule, dict):
            raise BatchSpecError("mapping_rule", "must be a JSON object")
        if isinstance(self.instance_count, bool) or not isinstance(self.instance_count, int) or self.instance_count < 1:
            raise BatchSpecError("instance_count", f"must be an integer >= 1, got {self.instance_count!r}")
        for name in ("num_cpus", "num_gpus"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise BatchSpecError(name, f"must be a number >= 0, got {value!r}")
            setattr(self, name, float(value))
        if not isinstance(self.resources, dict) or not all(
            isinstance(k, str) and isinstance(v, int | float) and v >= 0 for k, v in self.resources.items()
        ):
            raise BatchSpecError("resources", "must map resource names to numbers >= 0")
        if self.max_batch_size is not None and (
            isinstance(self.max_batch_size, bool)
            or not isinstance(self.max_batch_size, int)
            or not 1 <= self.max_batch_size <= 4096
        ):
            raise BatchSpecError("max_batch_size", f"must be an integer 1-4096, got {self.max_batch_size!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BatchSpec:
        """A spec from its dict form (unknown keys are refused, naming them)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise BatchSpecError(unknown[0], f"unknown field(s) {unknown}; known: {sorted(known)}")
        try:
            return cls(**data)
        except TypeError as exc:  # a required field is missing
            raise BatchSpecError("spec", str(exc)) from None

    def as_dict(self) -> dict[str, Any]:
        """The JSON-friendly dict form (what :meth:`BatchRunner.start` takes)."""
        return asdict(self)


@dataclass
class Summary:
    """Where a job stands: every input of the job (``total``), those in the manifest as SUCCESSFUL or FAILED
    (from this run and earlier ones), those this run wrote (``processed``) and those already there when it
    started (``skipped``)."""

    service_id: str
    manifest: str
    total: int = 0
    succeeded: int = 0
    failed: int = 0
    skipped: int = 0
    processed: int = 0
    elapsed_s: float = 0.0
    stopped: bool = False

    @property
    def progress(self) -> int:
        """0-100: the share of inputs with a manifest line."""
        if self.total <= 0:
            return 100
        return min(100, (self.succeeded + self.failed) * 100 // self.total)

    @property
    def inputs_per_s(self) -> float:
        """Inputs this run wrote, per second of this run."""
        return self.processed / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        """The fields plus ``progress`` and ``inputs_per_s``."""
        return {**asdict(self), "progress": self.progress, "inputs_per_s": round(self.inputs_per_s, 2)}


ProgressCallback = Callable[[Summary], None]


# -- checks ------------------------------------------------------------------------------------------------------
def check_paths(spec: BatchSpec) -> tuple[Path, Path]:
    """The resolved ``(src, dest)``; PathError (naming the field) when src is missing, not a folder or unreadable,
    or dest is src, inside src, or not a writable folder."""
    src_raw, dest_raw = Path(spec.src_path).expanduser(), Path(spec.dest_path).expanduser()
    try:
        src = src_raw.resolve(strict=True)
    except FileNotFoundError:
        raise PathError("src_path", f"{spec.src_path} does not exist") from None
    except (OSError, RuntimeError) as exc:
        raise PathError("src_path", f"{spec.src_path} cannot be resolved: {exc}") from None
    if not src.is_dir():
        raise PathError("src_path", f"{spec.src_path} is not a folder")
    if not os.access(src, os.R_OK | os.X_OK):
        raise PathError("src_path", f"{spec.src_path} is not readable")
    try:
        with os.scandir(src) as entries:
            next(entries, None)
    except OSError as exc:
        raise PathError("src_path", f"{spec.src_path} cannot be listed: {exc.strerror or exc}") from None
    try:
        dest = dest_raw.resolve()
    except (OSError, RuntimeError) as exc:
        raise PathError("dest_path", f"{spec.dest_path} cannot be resolved: {exc}") from None
    if dest == src:
        raise PathError("dest_path", f"{spec.dest_path} is the same folder as src_path {spec.src_path}")
    if dest.is_relative_to(src):
        raise PathError(
            "dest_path", f"{spec.dest_path} is inside src_path {spec.src_path} (results would be read as inputs)"
        )
    if dest.exists() and not dest.is_dir():
        raise PathError("dest_path", f"{spec.dest_path} exists and is not a folder")
    existing = dest
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PathError("dest_path", f"{spec.dest_path} is not writable ({existing})")
    return src, dest


def _model_config(spec: BatchSpec) -> ModelConfig:
    try:
        if spec.model_config is not None:
            config = ModelConfig.model_validate(spec.model_config)
        else:
            config = read_model_config(spec.model_dir)
    except EnginehouseError as exc:
        raise BatchJobError(exc.message) from exc
    except ValueError as exc:
        raise BatchJobError(f"model_config is not a valid config.json: {exc}") from exc
    if config.engine == "Custom":
        raise BatchJobError(
            f"model {spec.model_dir} runs on the Custom engine, which has no tensor signature: batch jobs need a "
            "PyTorch, TensorFlow, ONNX or MindSpore model"
        )
    return config


def _check_resources(spec: BatchSpec) -> None:
    """Refuse an instance that no node could ever hold: Ray Data would wait for it forever."""
    total = ray.cluster_resources()
    need = {"CPU": spec.num_cpus, "GPU": spec.num_gpus, **spec.resources}
    names = {"CPU": "num_cpus", "GPU": "num_gpus"}
    for key, amount in need.items():
        if amount > 0 and total.get(key, 0.0) < amount:
            raise BatchSpecError(
                names.get(key, "resources"),
                f"one instance needs {amount:g} {key}, the Ray cluster has {total.get(key, 0.0):g}",
            )


def _start_probe(spec: BatchSpec, config: ModelConfig) -> ray.ObjectRef:
    """Load the model once, in a throw-away worker on this node, for its signature (or the engine's reason it
    does not load): the control plane's model validation, started now so it overlaps the listing."""
    from serving.controlplane.probe import start

    return start(spec.model_dir, config.model_dump(exclude_none=True))


def _signature(spec: BatchSpec, probe: ray.ObjectRef) -> Signature:
    result: dict[str, Any] = ray.get(probe)
    if "error" in result:
        raise BatchJobError(str(result["error"]))
    signature = signature_from_dict(result["signature"])
    if not signature.inputs:
        raise BatchJobError(f"model {spec.model_dir} declares no inputs: a batch job cannot feed it")
    return signature


def _names(spec: BatchSpec) -> tuple[str, str | None]:
    folder = Path(spec.model_dir).resolve()
    looks_versioned = bool(_VERSION_DIR.match(folder.name)) and folder.parent.name != ""
    name = spec.model_name or (folder.parent.name if looks_versioned else folder.name)
    version = spec.model_version or (folder.name if looks_versioned else None)
    return name, version


# -- listing -----------------------------------------------------------------------------------------------------
@dataclass
class _Listing:
    files: list[str]  # relative posix paths, sorted, hidden files and folders left out
    failures: list[tuple[str, str]]  # (source, reason) known before any inference


def _list(src: Path) -> _Listing:
    files: list[str] = []
    failures: list[tuple[str, str]] = []

    def unreadable(exc: OSError) -> None:
        rel = Path(exc.filename).relative_to(src).as_posix() if exc.filename else "."
        if rel != ".":
            failures.append((clean(rel + "/"), f"cannot list folder: {exc.strerror or exc}"))

    for root, dirs, names in os.walk(src, onerror=unreadable):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        base = Path(root).relative_to(src)
        for name in sorted(names):
            if name.startswith("."):
                continue
            rel = (base / name).as_posix()
            try:
                rel.encode("utf-8")
            except UnicodeEncodeError:
                failures.append((clean(rel), "the file name is not valid UTF-8; rename it"))
                continue
            files.append(rel)
    return _Listing(files, failures)


def _csv_row_of(source: str) -> tuple[str, int]:
    """``("d.csv", 7)`` from ``"d.csv#7"``; ``("d.csv", 0)`` from the file-level ``"d.csv"``."""
    if source.lower().endswith(CSV_SUFFIX):
        return source, 0
    rel, _, row = source.rpartition("#")
    return (rel, int(row)) if row.isdigit() else (source, -1)


# -- the job -----------------------------------------------------------------------------------------------------
def _quiet_ray_data() -> None:
    """No Ray Data progress bars, execution banners or stats in this process: the caller shows its own."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False
    ctx.verbose_stats_logs = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)


def _rows_per_call(max_batch_size: int, todo: int, instances: int) -> int:
    """Inputs per actor call: a Ray Data call costs ~10 ms on top of the work, so several engine batches (at
    least 256 inputs) per call; but at least ~8 calls per actor on a small job (progress, stop latency,
    balance), and never fewer inputs than one engine batch."""
    per_actor = math.ceil(todo / (8 * instances)) if todo else max_batch_size
    return max(max_batch_size, min(max(4 * max_batch_size, 256), per_actor))


def _short(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    text = lines[-1] if lines else type(exc).__name__
    return text[:1000]


def run_job(
    spec: BatchSpec, on_progress: ProgressCallback | None = None, stop: threading.Event | None = None
) -> Summary:
    """Run (or resume) the job in this process, which must be connected to Ray; returns the final Summary.

    ``on_progress`` gets a Summary snapshot once the inputs are counted and after every batch written;
    ``stop`` set ends the run after the batch in hand (``Summary.stopped``), leaving a manifest a later run
    resumes. Raises BatchSpecError/PathError for an unusable spec, BatchJobError when the job as a whole
    fails (the model does not load, Ray Data fails); a bad input is only a FAILED line.
    """
    started = time.monotonic()
    src, dest = check_paths(spec)
    config = _model_config(spec)
    if not ray.is_initialized():
        raise BatchJobError("run_job needs a Ray connection: call ray.init() first")
    _check_resources(spec)
    probe = _start_probe(spec, config)
    # the csv mapping needs the signature to count its inputs; the file mapping only when there is work
    signature = _signature(spec, probe) if spec.mapping_type == "csv" else None
    rule: CsvRule | None = None
    if signature is not None:
        try:
            rule = parse_rule(spec.mapping_rule, signature)
        except ValueError as exc:
            raise BatchSpecError("mapping_rule", str(exc)) from None
    max_batch = spec.max_batch_size or config.max_batch_size
    model_name, model_version = _names(spec)
    try:
        dest.mkdir(parents=True, exist_ok=True)
        manifest = Manifest(manifest_path(dest, spec.service_id))
    except OSError as exc:
        raise PathError("dest_path", f"cannot write the manifest in {spec.dest_path}: {exc}") from None
    summary = Summary(spec.service_id, str(manifest.path))

    def report() -> None:
        summary.elapsed_s = time.monotonic() - started
        if on_progress is not None:
            try:
                on_progress(Summary(**asdict(summary)))
            except Exception:
                log.exception("the progress callback of batch job %s raised", spec.service_id)

    def record(lines: Iterable[dict[str, Any]]) -> None:
        written = manifest.append(lines)
        summary.processed += len(written)
        for line in written:
            if line["result"] == SUCCESSFUL:
                summary.succeeded += 1
            else:
                summary.failed += 1

    with manifest:
        listing = _list(src)
        if spec.mapping_type == "file":
            sources = listing.files + [s for s, _ in listing.failures]
            known = set(sources)
            previous = {s: r for s, r in manifest.done.items() if s in known}
            items: list[dict[str, Any]] = [{"source": s} for s in listing.files if s not in manifest.done]
            todo = len(items)
            summary.total = len(sources)
        else:
            assert rule is not None
            csv_files = [f for f in listing.files if suffix_of(f) == CSV_SUFFIX]
            done_rows: dict[str, set[int]] = {}
            for source in manifest.done:
                rel, row = _csv_row_of(source)
                done_rows.setdefault(rel, set()).add(row)
            previous = {}
            items, todo = [], 0
            for rel in csv_files:
                rows = {row for row, _, _ in csv_inputs(src / rel, rule)}
                done = rows & done_rows.get(rel, set())
                summary.total += len(rows)
                todo += len(rows) - len(done)
                previous.update({csv_source(rel, r): manifest.done[csv_source(rel, r)] for r in done})
                if len(done) < len(rows):
                    items.append({"path": rel, "skip": format_ranges(done)})
            known = {s for s, _ in listing.failures}
            previous.update({s: r for s, r in manifest.done.items() if s in known})
            summary.total += len(listing.failures)
        summary.skipped = len(previous)
        summary.succeeded = sum(1 for r in previous.values() if r == SUCCESSFUL)
        summary.failed = len(previous) - summary.succeeded
        record(failure_line(s, reason) for s, reason in listing.failures if s not in manifest.done)
        summary.processed = 0  # listing failures are counted, but they are not this run's throughput
        log.info(
            "batch job %s: %d inputs, %d already in %s, %d to run",
            spec.service_id,
            summary.total,
            summary.skipped,
            manifest.path,
            todo,
        )
        report()
        if not items or (stop is not None and stop.is_set()):
            summary.stopped = bool(items)
            report()
            return summary

        from ray.data import ActorPoolStrategy, Dataset, TaskPoolStrategy, from_items

        if signature is None:
            signature = _signature(spec, probe)

        _quiet_ray_data()
        ds: Dataset = from_items(items)
        if rule is not None:
            ds = ds.map_batches(
                cast(Any, expand_csv),  # keyword-only fn_kwargs: beyond the stub's Callable type
                batch_size=1,
                batch_format="numpy",
                fn_kwargs={"src_path": str(src), "rule": rule.as_dict(), "signature": signature.as_dict()},
                compute=TaskPoolStrategy(size=max(1, spec.instance_count)),
                # parsing is light, and a CPU here could starve the actor pool of a small node
                num_cpus=0,
            )
        ds = ds.map_batches(
            InferWorker,
            batch_size=_rows_per_call(max_batch, todo, spec.instance_count),
            batch_format="numpy",
            fn_constructor_kwargs={
                "model_dir": spec.model_dir,
                "config": config.model_dump(exclude_none=True),
                "model_name": model_name,
                "model_version": model_version,
                "src_path": str(src),
                "dest_path": str(dest),
                "mapping_type": spec.mapping_type,
                "max_batch_size": max_batch,
                "cpu_threads": max(1, round(spec.num_cpus)),
                "cpus": spec.num_cpus or None,
            },
            # instance_count actors are started; the job runs with fewer while a busy cluster cannot fit them all
            compute=ActorPoolStrategy(min_size=1, max_size=spec.instance_count, initial_size=spec.instance_count),
            num_cpus=spec.num_cpus,
            num_gpus=spec.num_gpus or None,
            resources=spec.resources or None,
        )
        batches = ds.iter_batches(batch_size=None, batch_format="numpy")
        try:
            for batch in batches:
                record(
                    success_line(str(s), str(loc)) if ok else failure_line(str(s), str(err))
                    for s, ok, loc, err in zip(batch["source"], batch["ok"], batch["loc"], batch["error"], strict=True)
                )
                report()
                if stop is not None and stop.is_set():
                    summary.stopped = True
                    break
        except Exception as exc:
            raise BatchJobError(f"batch job {spec.service_id} failed: {_short(exc)}") from exc
        finally:
            close = getattr(batches, "close", None)
            if close is not None:  # shuts the streaming executor and its actors down now
                with contextlib.suppress(Exception):
                    close()
        report()
        return summary
