"""Model-service templates: ZStack's reusable recipes for serving a framework with a custom engine.

A template says how to start a server (``startCommand`` as an argument list, or a container image with
``containerCommand``/``containerArgs``), what it asks for (``requestCpu``, ``requestMemory``) and which
parameters it takes. ``yaml`` holds the service parameters::

    parameters:
      WORKERS: {type: integer, default: 1, description: uvicorn workers}
      GREETING: {type: string, required: true}
    env:
      PYTHONUNBUFFERED: "1"

A ``Custom`` model names a template (``template``: uuid or name) and gives ``template_params``; each parameter
reaches the server as an environment variable of the same name, beside the fixed ``env``. Commands are never
run through a shell: a string given for a command is split with :func:`shlex.split` into its arguments.
"""

from __future__ import annotations

import re
import shlex
import uuid
from datetime import UTC, datetime
from typing import Any, Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serving.controlplane.errors import InvalidRequest
from serving.controlplane.schemas import ENV_NAME_PATTERN
from serving.registry import Registry
from serving.registry.schema import ModelServiceTemplate

PARAM_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
}
Architecture = Literal["x86_64", "aarch64"]
ARCHITECTURES: tuple[Architecture, ...] = ("x86_64", "aarch64")
_NAMESPACE = uuid.UUID("5b0f7a8e-2f43-4f0e-9d1c-7a4c3c0e1a55")


def _words(value: Any, field: str) -> list[str] | None:
    """A command as an argument list: a list of strings as given, a string split like a shell would (no shell)."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = shlex.split(value)
        except ValueError as exc:
            raise ValueError(f"{field} cannot be split into arguments: {exc}") from None
    if not isinstance(value, list) or not all(isinstance(w, str) for w in value):
        raise ValueError(f"{field} must be a list of strings or one string")
    return value


class TemplateParameter(BaseModel):
    """One service parameter a template takes."""

    model_config = ConfigDict(extra="forbid")

    type: str
    default: Any = None
    required: bool = False
    description: str = Field(default="", max_length=1000)

    @field_validator("type")
    @classmethod
    def _known_type(cls, value: str) -> str:
        if value not in PARAM_TYPES:
            raise ValueError(f"unknown field type {value!r}; types: {', '.join(PARAM_TYPES)}")
        return value

    @model_validator(mode="after")
    def _default_matches(self) -> Self:
        if self.default is not None and not _is_type(self.default, self.type):
            raise ValueError(f"default {self.default!r} is not of type {self.type}")
        return self


class TemplateYaml(BaseModel):
    """The parsed ``yaml`` field."""

    model_config = ConfigDict(extra="forbid")

    parameters: dict[str, TemplateParameter] = Field(default_factory=dict)
    env: dict[str, str] = Field(default_factory=dict)

    @field_validator("parameters", "env")
    @classmethod
    def _env_names(cls, value: dict[str, Any]) -> dict[str, Any]:
        bad = [k for k in value if not re.fullmatch(ENV_NAME_PATTERN, k)]
        if bad:
            raise ValueError(f"{bad[0]!r} is not an environment variable name (letters, digits, _)")
        return value


def _is_type(value: Any, kind: str) -> bool:
    if kind in ("integer", "number") and isinstance(value, bool):
        return False  # JSON true is not a number
    return isinstance(value, PARAM_TYPES[kind])


#: nesting the service parameters need is 3; the composer recurses per level, so deep input is refused first
MAX_YAML_DEPTH = 16


def _check_events(text: str) -> None:
    """Refuse, before anything is built, what would cost more than the text: aliases (a few bytes of nested
    aliases expand a billion times) and nesting deeper than MAX_YAML_DEPTH (the composer recurses)."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):  # the parser itself is a loop, not a recursion
        if isinstance(event, yaml.AliasEvent):
            raise ValueError("YAML aliases (*name) are not allowed here; write the values out")
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                raise ValueError(f"YAML nested deeper than {MAX_YAML_DEPTH} levels")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def parse_yaml(text: str) -> TemplateYaml:
    """The ``yaml`` field as parameters and env; ValueError naming the problem."""
    try:
        _check_events(text)
        data = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as exc:
        raise ValueError(f"not valid YAML: {exc}") from None
    except RecursionError:
        raise ValueError("YAML nested too deeply") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError("must be a YAML mapping with `parameters` and/or `env`")
    return TemplateYaml.model_validate(data)


class TemplateCreate(BaseModel):
    """``POST /v1/{project_id}/model-services``: the ZStack inventory fields a user may set."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9 ._-]{0,127}$")
    description: str = Field(default="", max_length=2000)
    readme: str = Field(default="", max_length=65536)
    yaml: str = Field(default="", max_length=65536)
    requestCpu: float = Field(default=1.0, gt=0, le=1024)
    requestMemory: int = Field(default=0, ge=0, le=16 * 1024 * 1024, description="MB")
    framework: str = Field(default="", max_length=64)
    type: str = Field(default="", max_length=64)
    source: str = Field(default="user", max_length=64)
    installPath: str = Field(default="", max_length=4096)
    pythonVersion: str = Field(default="", pattern=r"^(\d+(\.\d+){0,2})?$")
    condaVersion: str = Field(default="", pattern=r"^(\d+(\.\d+){0,2})?$")
    version: str = Field(default="1.0.0", max_length=32)
    startCommand: list[str] | None = Field(default=None, max_length=64)
    containerCommand: list[str] | None = Field(default=None, max_length=64)
    containerArgs: list[str] | None = Field(default=None, max_length=256)
    port: int | None = Field(default=None, ge=1024, le=65535)
    healthPath: str = Field(default="/health", pattern=r"^/[^\s]*$", max_length=256)
    supportDistributed: bool = False
    cpuArchitectures: list[Architecture] = Field(default_factory=lambda: list(ARCHITECTURES))
    gpuComputeCapability: str = Field(default="", pattern=r"^(\d+\.\d+)?$")
    modelServiceImages: list[str] = Field(default_factory=list, max_length=16)

    @field_validator("startCommand", "containerCommand", "containerArgs", mode="before")
    @classmethod
    def _argument_list(cls, value: Any, info: Any) -> list[str] | None:
        return _words(value, info.field_name)

    @field_validator("startCommand")
    @classmethod
    def _not_empty(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (not value or not all(w.strip() for w in value)):
            raise ValueError("startCommand is empty or has an empty argument")
        return value

    @field_validator("yaml")
    @classmethod
    def _yaml(cls, value: str) -> str:
        parse_yaml(value)
        return value

    @field_validator("modelServiceImages")
    @classmethod
    def _images(cls, value: list[str]) -> list[str]:
        bad = [v for v in value if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._/:@-]{0,254}", v)]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a container image reference")
        return value

    @model_validator(mode="after")
    def _runnable(self) -> Self:
        if not self.startCommand and not self.modelServiceImages:
            raise ValueError("a template needs startCommand (an argument list) or modelServiceImages")
        return self


def template_uuid(name: str) -> str:
    """System templates get a uuid from their name, so every installation agrees on it."""
    return uuid.uuid5(_NAMESPACE, name).hex


SYSTEM_TEMPLATES: list[dict[str, Any]] = [
    {
        "name": "python-http-server",
        "description": "A plain Python HTTP server: the model folder holds server.py, listening on the given port.",
        "readme": (
            "Put `server.py` in the model folder. It must listen on 127.0.0.1 at the port given as `--port` (also "
            "in ENGINEHOUSE_PORT), find its files through ENGINEHOUSE_MODEL_DIR, and answer `GET /health` with "
            "2xx once ready. Every request to /v1/infers/{service_id}/... reaches it with its sub-path, method, "
            "headers and body."
        ),
        "framework": "Python",
        "type": "HTTP",
        "pythonVersion": "3.11",
        "startCommand": ["python", "server.py", "--port", "{port}"],
        "yaml": "env:\n  PYTHONUNBUFFERED: '1'\n",
        "requestCpu": 1,
        "requestMemory": 512,
    },
    {
        "name": "fastapi-app",
        "description": "A FastAPI (ASGI) application served by uvicorn: the model folder holds app.py with `app`.",
        "readme": (
            "Put `app.py` defining `app = FastAPI()` in the model folder, with a `GET /health` route. The app "
            "runs under uvicorn with WORKERS processes, on 127.0.0.1 at the given port; ENGINEHOUSE_MODEL_DIR "
            "names the model folder."
        ),
        "framework": "FastAPI",
        "type": "HTTP",
        "pythonVersion": "3.11",
        "startCommand": [
            "python",
            "-m",
            "uvicorn",
            "app:app",
            "--host",
            "127.0.0.1",
            "--port",
            "{port}",
            "--no-access-log",
        ],
        "yaml": (
            "parameters:\n"
            "  WEB_CONCURRENCY: {type: integer, default: 1, description: uvicorn worker processes}\n"
            "env:\n  PYTHONUNBUFFERED: '1'\n"
        ),
        "requestCpu": 1,
        "requestMemory": 1024,
    },
    {
        "name": "container-http-server",
        "description": "A Python HTTP server in a container: server.py from the model folder, mounted at /model.",
        "readme": (
            "Runs the image with docker or podman (whichever answers), the model folder mounted read-only at "
            "/model, the port published on 127.0.0.1 and the specification's CPU and memory as limits."
        ),
        "framework": "Python",
        "type": "HTTP",
        "pythonVersion": "3.11",
        "modelServiceImages": ["python:3.11-slim"],
        "containerCommand": ["python", "/model/server.py", "--port", "{port}"],
        "requestCpu": 1,
        "requestMemory": 512,
    },
]


def seed_system(registry: Registry) -> None:
    """Store (or refresh) the templates that ship with Enginehouse."""
    for raw in SYSTEM_TEMPLATES:
        body = TemplateCreate.model_validate({**raw, "source": "system"})
        registry.put_template(
            template_uuid(body.name), body.name, body.model_dump(exclude={"name"}), project_id=None, system=True
        )


def create(registry: Registry, project: str, body: TemplateCreate) -> str:
    """Store a user template of the project; its uuid."""
    uuid_ = uuid.uuid4().hex
    registry.put_template(uuid_, body.name, body.model_dump(exclude={"name"}), project_id=project)
    return uuid_


def _zstack_date(ms: int) -> str:
    """ZStack's timestamp form, e.g. ``Nov 25, 2026 9:26:00 AM`` (UTC)."""
    t = datetime.fromtimestamp(ms / 1000, UTC)
    return f"{t:%b} {t.day}, {t.year} {t.hour % 12 or 12}:{t:%M:%S} {t:%p}"


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def inventory(row: ModelServiceTemplate, users: dict[str, str] | None = None) -> dict[str, Any]:
    """One template in ZStack's inventory shape; commands as strings, as ZStack types them."""
    spec = row.spec
    joined = {k: shlex.join(spec[k]) if spec.get(k) else None for k in ("startCommand", "containerCommand")}
    return {
        "uuid": row.uuid,
        "name": row.name,
        "description": spec.get("description", ""),
        "readme": spec.get("readme", ""),
        "yaml": spec.get("yaml", ""),
        "requestCpu": _number(spec.get("requestCpu", 1)),
        "requestMemory": spec.get("requestMemory", 0),
        "modelCenterUuid": None,
        "type": spec.get("type", ""),
        "framework": spec.get("framework", ""),
        "source": spec.get("source", ""),
        "size": 0,
        "system": row.system,
        "hasNewVersion": False,
        "gpuComputeCapability": spec.get("gpuComputeCapability") or None,
        "installPath": spec.get("installPath", ""),
        "pythonVersion": spec.get("pythonVersion", ""),
        "condaVersion": spec.get("condaVersion", ""),
        "version": spec.get("version", ""),
        "startCommand": joined["startCommand"],
        "containerCommand": joined["containerCommand"],
        "containerArgs": shlex.join(spec["containerArgs"]) if spec.get("containerArgs") else None,
        "supportDistributed": spec.get("supportDistributed", False),
        "cpuArchitectures": spec.get("cpuArchitectures", []),
        "vendorToSpecUuidsMap": {},
        "modelServiceRefs": [{"modelUuid": k, "model": v} for k, v in (users or {}).items()],
        "modelServiceImages": spec.get("modelServiceImages", []),
        "port": spec.get("port"),
        "healthPath": spec.get("healthPath", "/health"),
        "createDate": _zstack_date(row.create_date),
        "lastOpDate": _zstack_date(row.last_op_date),
    }


def custom_fields(row: ModelServiceTemplate, params: dict[str, Any]) -> dict[str, Any]:
    """The Custom engine's config (start_command or image, port, health path, env) from a template + params."""
    spec = row.spec
    declared = parse_yaml(spec.get("yaml", "")).parameters
    unknown = sorted(set(params) - set(declared))
    if unknown:
        raise InvalidRequest(
            f"template_params.{unknown[0]}: template {row.name} takes no such parameter; "
            f"it takes {', '.join(declared) or 'none'}"
        )
    env = dict(parse_yaml(spec.get("yaml", "")).env)
    for name, p in declared.items():
        value = params.get(name, p.default)
        if value is None:
            if p.required:
                raise InvalidRequest(f"template_params.{name}: required by template {row.name}")
            continue
        if not _is_type(value, p.type):
            raise InvalidRequest(f"template_params.{name}: {value!r} is not of type {p.type}")
        env[name] = str(value).lower() if isinstance(value, bool) else str(value)
    out: dict[str, Any] = {"health_path": spec.get("healthPath", "/health"), "env": env}
    if spec.get("startCommand"):
        out["start_command"] = list(spec["startCommand"])
    else:
        out["image"] = spec["modelServiceImages"][0]
        if spec.get("containerCommand"):
            out["container_command"] = list(spec["containerCommand"])
        if spec.get("containerArgs"):
            out["container_args"] = list(spec["containerArgs"])
    if spec.get("port"):
        out["port"] = spec["port"]
    return out
