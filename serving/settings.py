"""Settings, from ``ENGINEHOUSE_*`` environment variables or CLI flags."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_MODELS = Path(__file__).resolve().parent.parent / "models"


class Settings(BaseSettings):
    """Everything `enginehouse up` can be told; each field is also `ENGINEHOUSE_<NAME>`."""

    model_config = SettingsConfigDict(env_prefix="ENGINEHOUSE_", extra="ignore")

    home: Path = Field(default=Path.home() / ".enginehouse", description="State folder (SQLite registry).")
    host: str = Field(default="127.0.0.1", description="Control-plane bind address.")
    port: int = Field(default=8080, ge=1, le=65535, description="Control-plane port.")
    data_host: str = Field(default="127.0.0.1", description="Data-plane (Ray Serve ingress) bind address.")
    data_port: int = Field(default=8000, ge=1, le=65535, description="Data-plane port.")
    model_repository: Path = Field(default=REPO_MODELS, description="Example model repository to serve.")
    address: str | None = Field(default=None, description="Ray cluster address to join; None: embedded Ray.")
    num_cpus: int | None = Field(default=None, gt=0, description="CPUs given to the embedded Ray.")
    auth_tokens: str = Field(default="", description="Comma-separated `project:token` pairs; empty: no auth.")
    replica_cpus: float = Field(default=0.25, gt=0, le=64, description="CPU reserved per example replica.")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL of the registry; None: a SQLite file `registry.db` under `home`."
    )
    allowed_roots: str = Field(
        default="",
        description="Folders (os.pathsep-separated) a model's source_location may be under; empty: the model "
        "repository and `home`/models.",
    )
    reconcile_interval_s: float = Field(
        default=1.0, gt=0, le=60, description="How often the reconciler compares the registry with Ray Serve."
    )

    log_format: Literal["text", "json"] = Field(
        default="text", description="Log lines as text or JSON (control plane and, through Serve, the replicas)."
    )
    async_url: str | None = Field(
        default=None,
        description="Where async requests wait: redis://host:port/db, or a SQLAlchemy URL; None: the registry's "
        "database.",
    )
    async_retention_s: float = Field(
        default=3600, gt=0, le=30 * 86400, description="How long a finished async result stays readable."
    )

    def registry_url(self) -> str:
        """The registry's SQLAlchemy URL (``database_url``, or the SQLite file under ``home``)."""
        return self.database_url or f"sqlite:///{self.home / 'registry.db'}"

    def queue_url(self) -> str:
        """Where the async queue lives."""
        return self.async_url or self.registry_url()

    def roots(self) -> list[Path]:
        """The allowed source roots, resolved (symlinks followed) once."""
        given = [Path(p) for p in self.allowed_roots.split(os.pathsep) if p.strip()]
        return [p.expanduser().resolve() for p in given or [self.model_repository, self.home / "models"]]

    def tokens(self) -> dict[str, str]:
        """``{token: project}`` from ``auth_tokens``."""
        out: dict[str, str] = {}
        for item in filter(None, (p.strip() for p in self.auth_tokens.split(","))):
            project, _, token = item.partition(":")
            if not token:
                raise ValueError(f"ENGINEHOUSE_AUTH_TOKENS entry {item!r} is not of the form project:token")
            out[token] = project
        return out


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(settings: Settings, stored_tokens: int = 0) -> None:
    """Refuse to bind beyond loopback with auth off: anyone on the network could use the models.

    ``stored_tokens`` counts the tokens in the registry (``enginehouse token create``); any token turns auth on.
    """
    exposed = [h for h in (settings.host, settings.data_host) if not is_loopback(h)]
    if exposed and not settings.tokens() and not stored_tokens:
        raise SystemExit(
            f"refusing to listen on {', '.join(exposed)} with no tokens: set ENGINEHOUSE_AUTH_TOKENS="
            "'project:token' or run `enginehouse token create --project P` (or bind to 127.0.0.1)"
        )
