"""The fuzz run reuses the unit tests' stand-ins: the real gateway (`gw`) wired in-process to
the fake vLLM engine, on the tiny fake base model. Importing the fixtures makes them visible
here; they stay defined (and maintained) in tests/unit/conftest.py."""

from tests.unit.conftest import (  # noqa: F401  (fixtures, used by name)
    _no_loraplex_env,
    base_model_dir,
    fake_engine,
    gw,
    make_adapter,
)
