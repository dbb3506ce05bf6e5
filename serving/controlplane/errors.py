"""Errors of the management API; each carries its HTTP status and stable code (see runtimes.errors)."""

from __future__ import annotations

from runtimes.errors import EnginehouseError


class InvalidRequest(EnginehouseError):
    """The body or a query parameter is malformed, of the wrong type or out of range; the message names it."""

    status_code = 400
    error_code = "EH.0501"


class Unauthorized(EnginehouseError):
    """No token, or a token Enginehouse does not know."""

    status_code = 401
    error_code = "EH.0502"


class Forbidden(EnginehouseError):
    """The token belongs to another project."""

    status_code = 403
    error_code = "EH.0503"


class PathNotAllowed(EnginehouseError):
    """A source or data path is missing or resolves (symlinks followed) outside the allowed roots."""

    status_code = 400
    error_code = "EH.0504"


class UnknownRuntime(EnginehouseError):
    """The runtime is not in the catalogue for the model's engine."""

    status_code = 400
    error_code = "EH.0505"


class ModelNotDeployable(EnginehouseError):
    """A service names a model that failed validation or does not support the infer type."""

    status_code = 409
    error_code = "EH.0506"


class InvalidTransition(EnginehouseError):
    """The service cannot do that in its current state (e.g. update while deleting)."""

    status_code = 409
    error_code = "EH.0507"


class NoRoute(EnginehouseError):
    """No route has that path."""

    status_code = 404
    error_code = "EH.0509"


class MethodNotAllowed(EnginehouseError):
    """The path exists, not with that method."""

    status_code = 405
    error_code = "EH.0510"


class RequestTooLarge(EnginehouseError):
    """A management request body over ``ENGINEHOUSE_MAX_BODY_MB``."""

    status_code = 413
    error_code = "EH.0511"
