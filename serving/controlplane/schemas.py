"""Request models of the management API: everything a client sends is checked here, unknown fields refused."""

from __future__ import annotations

import re
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# The reference's rule: three numbers of one or two digits, no leading zeros (01.2.3 is refused).
VERSION_PATTERN = r"^(0|[1-9][0-9]?)\.(0|[1-9][0-9]?)\.(0|[1-9][0-9]?)$"
NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_-]{0,63}$"
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"
ModelType = Literal["PyTorch", "TensorFlow", "ONNX", "MindSpore", "Custom"]
InferType = Literal["real-time", "batch"]
ModelStatus = Literal["publishing", "published", "failed"]
ServiceStatus = Literal[
    "deploying", "running", "concerning", "failed", "stopped", "stopping", "deleting", "waiting", "finished"
]
Order = Literal["asc", "desc"]


class Strict(BaseModel):
    """Base of every request body: unknown fields are an error, never silently dropped."""

    model_config = ConfigDict(extra="forbid")


class ModelSpecification(Strict):
    """The smallest resources the model needs (reference ModelSpecification; strings, as there)."""

    min_cpu: str | None = Field(default=None, max_length=32)
    min_gpu: str | None = Field(default=None, max_length=32)
    min_memory: str | None = Field(default=None, max_length=32)
    min_ascend: str | None = Field(default=None, max_length=32)


class ModelCreate(Strict):
    """``POST /v1/{project_id}/models``."""

    model_name: str = Field(pattern=NAME_PATTERN, description="Letters, digits, - and _, starting with a letter.")
    model_version: str = Field(pattern=VERSION_PATTERN, description="x.y.z, numbers of 1-2 digits, no leading 0.")
    model_type: ModelType
    runtime: str | None = Field(default=None, max_length=128, description="A runtime name from the catalogue.")
    source_location: str = Field(min_length=1, max_length=4096, description="Model file or folder, allowed roots.")
    description: str = Field(default="", max_length=1000)
    install_type: list[InferType] = Field(default=["real-time"], min_length=1, max_length=2)
    specification: ModelSpecification = Field(default_factory=ModelSpecification)
    image: str | None = Field(default=None, min_length=1, max_length=512)
    start_command: list[str] | None = Field(default=None, min_length=1, max_length=64)
    container_command: list[str] | None = Field(default=None, max_length=64)
    container_args: list[str] | None = Field(default=None, max_length=256)
    port: int | None = Field(default=None, ge=1024, le=65535)
    health_path: str = Field(default="/health", pattern=r"^/[^\s]*$", max_length=256)
    template: str | None = Field(
        default=None, min_length=1, max_length=128, description="A model-service template's uuid or name."
    )
    template_params: dict[str, str | int | float | bool] | None = Field(
        default=None, max_length=64, description="Values of the template's parameters (its `yaml`)."
    )

    @field_validator("start_command")
    @classmethod
    def _no_empty_words(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not all(w.strip() for w in value):
            raise ValueError("every word of start_command must be a non-empty string")
        return value

    @model_validator(mode="after")
    def _custom_fields(self) -> Self:
        custom = (
            self.image
            or self.start_command
            or self.container_command
            or self.container_args
            or self.template
            or self.template_params
        )
        if self.model_type == "Custom" and not (self.image or self.start_command or self.template):
            raise ValueError("a Custom model needs start_command (an argument list), image or template")
        if self.template_params and not self.template:
            raise ValueError("template_params are only read with template")
        if self.model_type != "Custom" and custom:
            raise ValueError(
                f"image/start_command/container_*/template are only for Custom models, not {self.model_type}"
            )
        return self


class CustomSpec(Strict):
    """Resources of one replica (reference CustomSpec): CPUs, memory in MB, a GPU share, NPUs."""

    cpu: float = Field(gt=0, le=512, description="CPU cores per replica (fractions allowed).")
    memory: int | None = Field(default=None, ge=16, le=4 * 1024 * 1024, description="Memory per replica, MB.")
    gpu_p4: float = Field(default=0, ge=0, le=64, description="GPUs per replica; below 1 shares a GPU.")
    ascend_a310: int = Field(default=0, ge=0, le=64, description="NPUs per replica.")

    @field_validator("gpu_p4")
    @classmethod
    def _whole_above_one(cls, value: float) -> float:
        if value > 1 and value != int(value):  # Ray places fractions only within one GPU
            raise ValueError("a GPU share above 1 must be a whole number of GPUs")
        return value


class ServiceConfigEntry(Strict):
    """One model version of a service with its share of the traffic and its resources."""

    model_id: str = Field(min_length=1, max_length=64)
    weight: int = Field(ge=0, le=100, description="Share of the traffic in percent; all entries sum to 100.")
    specification: str = Field(min_length=1, max_length=64, description="A flavour name or `custom`.")
    custom_spec: CustomSpec | None = None
    instance_count: int = Field(default=1, ge=1, le=128)
    envs: dict[str, str] = Field(default_factory=dict, max_length=128)
    scaling: bool = Field(default=False, description="Ray Serve autoscaling between instance_count and 4x it.")
    max_batch_size: int = Field(default=32, ge=1, le=4096)
    batch_timeout_ms: float = Field(default=0, ge=0, le=10_000)
    max_queue_size: int = Field(
        default=256, ge=1, le=100_000, description="Requests one replica holds (running + waiting); past it 503."
    )
    request_timeout_s: float = Field(
        default=30, gt=0, le=3600, description="Seconds a request may take; past it 504 and its engine slot is freed."
    )

    @field_validator("envs")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        bad = [k for k in value if not re.match(ENV_NAME_PATTERN, k)]
        if bad:
            raise ValueError(f"environment variable name(s) {bad} are not valid")
        return value

    @model_validator(mode="after")
    def _spec(self) -> Self:
        if self.specification == "custom" and self.custom_spec is None:
            raise ValueError("specification custom needs custom_spec {cpu, memory, gpu_p4, ascend_a310}")
        if self.specification != "custom" and self.custom_spec is not None:
            raise ValueError("custom_spec is only read with specification custom")
        return self


class Schedule(Strict):
    """Auto-stop: the service stops ``duration`` ``time_unit`` after it starts running."""

    type: Literal["stop"]
    time_unit: Literal["DAYS", "HOURS", "MINUTES"]
    duration: int = Field(ge=1, le=100_000)

    def seconds(self) -> int:
        """The delay in seconds."""
        return self.duration * {"DAYS": 86400, "HOURS": 3600, "MINUTES": 60}[self.time_unit]


def _check_config(config: list[ServiceConfigEntry]) -> None:
    ids = [c.model_id for c in config]
    dup = sorted({m for m in ids if ids.count(m) > 1})
    if dup:
        raise ValueError(f"model_id {dup[0]} appears twice in config")
    total = sum(c.weight for c in config)
    if total != 100:
        raise ValueError(f"the weights of config must sum to 100, they sum to {total}")


class ServiceCreate(Strict):
    """``POST /v1/{project_id}/services``."""

    service_name: str = Field(pattern=NAME_PATTERN)
    description: str = Field(default="", max_length=1000)
    infer_type: InferType = "real-time"
    config: list[ServiceConfigEntry] = Field(min_length=1, max_length=16)
    schedule: list[Schedule] | None = Field(default=None, max_length=1)
    # batch services (infer_type batch)
    src_path: str | None = Field(default=None, max_length=4096)
    dest_path: str | None = Field(default=None, max_length=4096)
    mapping_type: Literal["file", "csv"] | None = None
    mapping_rule: dict[str, object] | None = None

    @model_validator(mode="after")
    def _weights(self) -> Self:
        _check_config(self.config)
        return self


class ServiceUpdate(Strict):
    """``PUT /v1/{project_id}/services/{service_id}``: any subset of these."""

    description: str | None = Field(default=None, max_length=1000)
    status: Literal["running", "stopped"] | None = None
    config: list[ServiceConfigEntry] | None = Field(default=None, min_length=1, max_length=16)
    schedule: list[Schedule] | None = Field(default=None, max_length=1)

    @model_validator(mode="after")
    def _weights(self) -> Self:
        if self.config is not None:
            _check_config(self.config)
        return self
