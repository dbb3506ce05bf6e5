"""Token checks shared by the control plane and the replicas (light: no web framework, no database)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from serving.controlplane.errors import Forbidden, Unauthorized

TOKEN_HEADER = "x-auth-token"


def hash_token(token: str) -> str:
    """The SHA-256 a token is stored and compared as."""
    return hashlib.sha256(token.encode()).hexdigest()


def presented_token(headers: Mapping[str, str]) -> str:
    """The token of a request (``X-Auth-Token``, or ZStack's ``Authorization: OAuth``); 401 when none."""
    token = headers.get(TOKEN_HEADER)
    if token is None:
        auth = headers.get("authorization", "")
        scheme, _, value = auth.partition(" ")
        if scheme.lower() in ("oauth", "bearer"):  # ZStack clients; Prometheus's authorization setting
            token = value.strip()
    if not token:
        raise Unauthorized("no token: send X-Auth-Token (create one with `enginehouse token create --project P`)")
    return token


def check_token(headers: Mapping[str, str], tokens: dict[str, str], project: str) -> None:
    """The data plane's check: the token's hash must be known (401) and belong to ``project`` (403)."""
    owner = tokens.get(hash_token(presented_token(headers)))
    if owner is None:
        raise Unauthorized("unknown token")
    if owner != project:
        raise Forbidden(f"this token belongs to project {owner}, not {project}")
