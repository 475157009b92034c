"""core/imports.py: an import path names one object, or one error says what is wrong with it."""

import math

import pytest

from grpo_lightning.core.imports import import_object


def test_dotted_and_colon_paths_name_the_object():
    assert import_object("math.isfinite") is math.isfinite
    assert import_object("os.path:join") is import_object("os.path.join")


def test_each_bad_path_gets_its_own_error():
    with pytest.raises(ImportError, match="has no attribute 'nope'"):
        import_object("grpo_lightning.core.scoring.nope")
    with pytest.raises(ImportError, match="cannot import 'no_such_package.f'"):
        import_object("no_such_package.f")
    with pytest.raises(ValueError, match="not an import path"):
        import_object("correctness")
