"""Build the Cython core.

Release builds: -O2 with warnings visible.  OCTOPROXY_DEBUG=1: -O0 -g, Cython
line tracing, bounds/wraparound checks on, and annotated HTML next to each .pyx.
"""

import os
import sys
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("OCTOPROXY_DEBUG", "") not in ("", "0")
WERROR = os.environ.get("OCTOPROXY_WERROR", "") not in ("", "0")
CORE = Path("src/octoproxy/_core")

if DEBUG:
    cflags = ["-O0", "-g3", "-Wall", "-UNDEBUG"]
    macros = [("CYTHON_TRACE", "1"), ("CYTHON_TRACE_NOGIL", "1"), ("OCTOPROXY_DEBUG", "1")]
    directives = {
        "language_level": "3",
        "boundscheck": True,
        "wraparound": True,
        "initializedcheck": True,
        "linetrace": True,
        "profile": True,
        "embedsignature": True,
    }
else:
    cflags = ["-O2", "-Wall", "-Wno-unused-function", "-Wno-unreachable-code"]
    macros = [("OCTOPROXY_DEBUG", "0")]
    directives = {
        "language_level": "3",
        "boundscheck": False,
        "wraparound": False,
        "initializedcheck": False,
        "cdivision": True,
        "embedsignature": True,
    }
if WERROR:
    cflags.append("-Werror")

extensions = [
    Extension(
        f"octoproxy._core.{pyx.stem}",
        [str(pyx)],
        extra_compile_args=cflags,
        define_macros=macros,
        include_dirs=[str(CORE)],
        # service authentication: OpenSSL's HMAC (docs/auth.md)
        libraries=["crypto"] if pyx.stem == "auth" else [],
    )
    for pyx in sorted(CORE.glob("*.pyx"))
    # OCTOPROXY_ONLY=frame,route builds just those modules (development only)
    if not os.environ.get("OCTOPROXY_ONLY")
    or pyx.stem in os.environ["OCTOPROXY_ONLY"].split(",")
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives=directives,
        annotate=DEBUG or os.environ.get("OCTOPROXY_ANNOTATE", "") not in ("", "0"),
        nthreads=0 if sys.platform == "win32" else 2,
        force=DEBUG,
    ),
    zip_safe=False,
)
