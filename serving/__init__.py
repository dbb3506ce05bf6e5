"""Enginehouse control plane, data plane (Ray Serve replicas) and CLI."""
