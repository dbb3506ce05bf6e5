"""Batch inference: run a model over every input under ``src_path`` and write the results to ``dest_path``.

The job (:func:`run_job`) lists the inputs, reads the manifest of an earlier run and skips what it lists, then
runs the rest with Ray Data: ``map_batches`` over an actor pool of ``instance_count`` actors (``num_cpus``,
``num_gpus``, ``resources`` each), every actor holding the same engine adapter a real-time replica uses
(``runtimes.registry.load_model``). Inputs are stacked to the model's ``max_batch_size`` (its ``config.json``, or
the spec's override): inputs whose tensors share per-row shapes and datatypes go to the engine as one call, and
the rows are split back per input (an input of ``max_batch_size`` rows or more is one call by itself; if the
stacked call fails, each input of the group is retried alone, so only a bad one fails). :class:`BatchRunner`
(:mod:`serving.batch.runner`) runs a job inside a Ray actor for the control plane; ``enginehouse batch``
(:mod:`serving.batch.cli`) runs one from the command line.

Inputs, ``mapping_type: "file"`` (every file under ``src_path``, recursively; names starting with ``.`` are
left out; the source id is the path relative to ``src_path``, with ``/``):

- ``.npy``: one tensor for a one-input model. With one dimension fewer than the input's shape it is ONE row
  (a leading batch dimension of 1 is added: an ``[-1, 4]`` input takes a ``(4,)`` file); with as many
  dimensions it is a batch of ``shape[0]`` rows in one input (one result file with that many rows). The
  datatype must be the input's (no silent casts, as in real time).
- ``.npz``: named tensors, one per model input, each by the same rule.
- ``.json``: an Open Inference Protocol v2 request (``{"inputs": [...]}``, shapes include the batch dimension)
  or ``{"instances": [...]}``, decoded exactly as the data plane does; the result has the matching form.
- ``.txt``: for a model whose one input is BYTES: the whole file is one element (``shape (1,)``, or
  ``(1, 1, ...)`` for the input's rank).
- ``.png`` ``.jpg`` ``.jpeg`` ``.bmp``: for a model whose one input is UINT8 and image-shaped,
  ``[-1, H, W, C]`` or ``[-1, C, H, W]`` (C 1, 3 or 4: L, RGB or RGBA) or ``[-1, H, W]`` (grayscale): decoded
  with Pillow into one row. Nothing is resized: an image of another fixed H x W is a FAILED input.
- anything else is a FAILED input (unsupported file type), so the manifest still lists every file.

Inputs, ``mapping_type: "csv"``: every record of every ``*.csv`` file under ``src_path`` is one input (other
files are ignored). The source id is ``"<relative path>#<row>"``, row = the 1-based number of the record after
the header (row 1 is the first record when ``header`` is false; blank records keep their number but are not
inputs). ``mapping_rule``::

    {"inputs": {"<input name>": ["colA", "colB", 3, ...], ...},   # required unless the model has one input
     "header": true,                                              # default true: the first record names columns
     "delimiter": ","}                                            # default ","

A column is a header name (needs ``header: true``) or a 0-based index; a single column may be given without
the list. The rule must name every model input and nothing else. Each input's cells are cast to its datatype
from the signature (FP*: a decimal number; INT*/UINT*: an integer; BOOL: true/false/1/0/yes/no; BYTES: the
cell's bytes as is) and shaped as one row, ``(1, *shape[1:])`` (one ``-1`` is filled in). Without
``inputs`` a one-input model gets every column of the record, in order. A record with a missing column or a
cell that does not cast is a FAILED input; a record Python's csv module cannot frame (e.g. a field over its
size limit) is a FAILED input and reading goes on at the next line; an unreadable file is one FAILED input
whose source id is the file's path. Bytes that are not UTF-8 fail numeric casts and survive in BYTES cells.
The driver reads every CSV file once before the run to count its records (the total that progress needs).

Outputs: one result file per successful input, holding the OIP v2 response JSON
(``serving.dataplane.codec.encode_response``; ``{"predictions": ...}`` for an ``instances`` request):

- file mapping: ``dest_path/<relative path>.json`` (``a/b.npy`` -> ``a/b.npy.json``, so ``b.npy`` and
  ``b.json`` never clash);
- csv mapping: ``dest_path/<relative path>/<row>.json`` (``data.csv`` row 7 -> ``data.csv/7.json``).

and the manifest ``dest_path/infer-result-{service_id}.manifest``, one JSON line per input (``inference-loc`` is
the result file's absolute path, symlinks in ``dest_path`` resolved)::

    {"source": "a/b.npy", "result": "SUCCESSFUL", "inference-loc": "/abs/dest/a/b.npy.json"}
    {"source": "data.csv#7", "result": "FAILED", "error_message": "input 'x' is FP32: value 'abc' is not one"}

Resume, exactly once: the driver is the manifest's only writer; it appends each batch's lines as the results
stream back, then flushes and fsyncs. A result file is written (to a temporary name, renamed into place) before
its line, so a crash in between only re-runs that input. A new run cuts a trailing partial line off the
manifest and skips every source already in it (FAILED ones included). Result files are not fsynced: after a
power loss (not a process crash) a listed result file may be missing.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from serving.batch.job import (
        BatchJobError,
        BatchSpec,
        BatchSpecError,
        PathError,
        Summary,
        check_paths,
        run_job,
    )
    from serving.batch.manifest import manifest_path

__all__ = [
    "BatchJobError",
    "BatchSpec",
    "BatchSpecError",
    "PathError",
    "Summary",
    "check_paths",
    "manifest_path",
    "run_job",
]


def __getattr__(name: str) -> Any:
    # lazy: ``serving.cli`` imports serving.batch.cli at start-up, and the job's modules import Ray
    if name == "manifest_path":
        return importlib.import_module("serving.batch.manifest").manifest_path
    if name in __all__:
        return getattr(importlib.import_module("serving.batch.job"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
