"""Project tokens: hashed at rest, looked up by hash, bound to one project.

Auth is on as soon as any token exists (``ENGINEHOUSE_AUTH_TOKENS`` or ``enginehouse token create``); with
none, start-up has already refused any non-loopback bind (``serving.settings.check_exposure``).
"""

from __future__ import annotations

import hmac
import secrets

from fastapi import Request

from serving.controlplane.errors import Forbidden, Unauthorized
from serving.registry import Registry
from serving.tokens import hash_token, presented_token


def new_token() -> str:
    """A fresh random token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


class Authenticator:
    """Maps a presented token to its project; env tokens are hashed on start and never kept in clear."""

    def __init__(self, registry: Registry, env_tokens: dict[str, str]) -> None:
        self.registry = registry
        self._env = {hash_token(t): p for t, p in env_tokens.items()}

    @property
    def enabled(self) -> bool:
        """True when any token is configured."""
        return bool(self._env) or self.registry.count_tokens() > 0

    def token_map(self) -> dict[str, str]:
        """``{sha256: project}`` of every token, for the replicas (only hashes leave the control plane)."""
        return {**self.registry.token_hashes(), **self._env}

    def project_of(self, token: str) -> str | None:
        """The token's project, or None when unknown."""
        digest = hash_token(token)
        for known, project in self._env.items():
            if hmac.compare_digest(known, digest):
                return project
        return self.registry.project_for_token(token)  # looked up by its hash, never by the clear token

    def check(self, request: Request) -> None:
        """Raise 401/403 unless the request's token opens the ``project_id`` of its path."""
        if not self.enabled:
            return
        project = self.project_of(presented_token(request.headers))
        if project is None:
            raise Unauthorized("unknown token")
        wanted = request.path_params.get("project_id")
        if wanted is not None and wanted != project:
            raise Forbidden(f"this token belongs to project {project}, not {wanted}")
