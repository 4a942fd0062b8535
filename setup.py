"""The compiled part of sdport: fast float16/bfloat16 casts (src/sdport/_casts.c).

Optional: where it cannot be built (no C compiler, no Python headers) sdport installs without it and
casts with numpy; ``sdport doctor`` says which path runs.
"""

import sys

from setuptools import Extension, setup

flags = [] if sys.platform == "win32" else ["-O3", "-std=c99"]
setup(ext_modules=[Extension("sdport._casts", ["src/sdport/_casts.c"], extra_compile_args=flags, optional=True)])
