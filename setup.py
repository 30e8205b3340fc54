"""The request path compiled with mypyc when AUTHPROXY_MYPYC=1 (what `make install` and the
Docker image build); without it, the same modules install as plain Python.

Compiling type-checks the package with mypy first, so the runtime dependencies must be importable:
build without isolation (`pip install --no-build-isolation`, or `python setup.py build_ext
--inplace` in a checkout), after installing them and mypy from constraints.txt.
"""

import os
import runpy

from setuptools import setup

ext_modules = []
if os.environ.get("AUTHPROXY_MYPYC") == "1":
    from mypyc.build import mypycify

    modules = runpy.run_path("proxy/compiled.py")["MODULES"]
    # The shared runtime goes inside the package (proxy/_native__mypyc...), where an editable
    # install's finder looks, instead of a top-level module named by a hash.
    ext_modules = mypycify(
        [f"proxy/{module}.py" for module in modules], opt_level="3", group_name="proxy._native"
    )

setup(ext_modules=ext_modules)
