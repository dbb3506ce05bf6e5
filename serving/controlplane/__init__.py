"""The control plane: management API over FastAPI."""
