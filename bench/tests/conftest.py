"""The bench tests' fixtures: the tiny model of the project's tests (``tests/conftest.py``), built the same way."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("project_fixtures", Path(__file__).resolve().parents[2] / "tests" / "conftest.py")
_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fixtures)

tiny_model_dir = _fixtures.tiny_model_dir
# The project's tests import helpers with ``from conftest import ...``; when both test folders are collected
# that name may resolve to this file, so it offers the same names.
globals().update({k: v for k, v in vars(_fixtures).items() if not k.startswith("_")})
