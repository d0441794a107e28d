"""The one thing pyproject.toml cannot say: clean's optional C kernels (imitate/clean/_native.c).

`optional=True`: without a C compiler the install still succeeds and clean runs its numpy code, which gives the same
output (tests/test_native.py); `python -c "import imitate.clean._native"` tells which one you have.
"""

import sys

from setuptools import Extension, setup

flags = [] if sys.platform == "win32" else ["-O3"]
setup(ext_modules=[Extension("imitate.clean._native", ["imitate/clean/_native.c"], optional=True,
                             extra_compile_args=flags)])
