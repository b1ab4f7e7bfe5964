"""octo-proxy: a service-mesh sidecar data plane for OCTO RPC traffic."""

# The only place the version is written: pyproject.toml reads it from here
# (`[tool.setuptools.dynamic]`), and the wheel's metadata from pyproject.
__version__ = "0.1.0"
