"""authproxy: a reverse-proxy auth and CORS sidecar."""

from pathlib import Path as _Path

# In a source checkout, the compiled request path sits beside its sources and Python prefers it:
# an edited module would run its old compiled self. Refuse that, naming the way out.
if (_Path(__file__).resolve().parent.parent / "setup.py").is_file():
    from .compiled import stale as _stale

    if _old := _stale():
        raise ImportError(
            f"proxy/{_old[0]}.py changed after it was compiled with mypyc: "
            "run `make install` to rebuild"
        )
