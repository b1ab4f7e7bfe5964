"""Fixtures of the container tests (the helpers are in ctr.py)."""

from ctr import images, podman, shared_dir  # noqa: F401  (pytest fixtures)
