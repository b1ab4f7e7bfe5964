"""The bundled xDS control plane (development, tests, single host)."""

from octoproxy.controlplane.server import AdsServer, ControlPlane, main, run_control_plane
from octoproxy.controlplane.store import FileError, Store

__all__ = ["AdsServer", "ControlPlane", "FileError", "Store", "main", "run_control_plane"]
