"""Settings, from ``ENGINEHOUSE_*`` environment variables or CLI flags."""

from __future__ import annotations

import ipaddress
from pathlib import Path

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


def check_exposure(settings: Settings) -> None:
    """Refuse to bind beyond loopback with auth off: anyone on the network could use the models."""
    exposed = [h for h in (settings.host, settings.data_host) if not is_loopback(h)]
    if exposed and not settings.tokens():
        raise SystemExit(
            f"refusing to listen on {', '.join(exposed)} with no tokens: set ENGINEHOUSE_AUTH_TOKENS="
            "'project:token' (or bind to 127.0.0.1)"
        )
