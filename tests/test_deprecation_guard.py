"""The guard of tests/deprecation_guard.py: deprecations at trialign call sites raise, third-party internals warn."""

from __future__ import annotations

import warnings

import pytest

from deprecation_guard import PACKAGE, OwnDeprecation


def module_function(package: str, source: str, name: str, filename: str, **namespace):
    """`name` from `source` compiled as if it lived in module `package` (its frames report that package/file)."""
    scope = {"__name__": package, **namespace}
    exec(compile(source, filename, "exec"), scope)
    return scope[name]


LIBRARY = "import warnings\ndef old_api():\n    warnings.warn('old_api is deprecated', FutureWarning, stacklevel=2)\n"


def test_a_deprecated_call_from_trialign_raises():
    old_api = module_function("transformers.fake", LIBRARY, "old_api", "/site-packages/transformers/fake.py")
    ours = module_function("trialign.fake", "def ours():\n    old_api()\n", "ours", str(PACKAGE / "fake.py"),
                           old_api=old_api)
    with pytest.raises(OwnDeprecation, match=r"trialign call site .*fake.py:2: old_api is deprecated"):
        ours()


def test_a_deprecated_call_inside_another_library_stays_a_warning():
    old_api = module_function("transformers.fake", LIBRARY, "old_api", "/site-packages/transformers/fake.py")
    middle = module_function("peft.fake", "def middle():\n    old_api()\n", "middle", "/site-packages/peft/fake.py",
                             old_api=old_api)
    ours = module_function("trialign.fake", "def ours():\n    middle()\n", "ours", str(PACKAGE / "fake.py"),
                           middle=middle)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours()
    assert [str(w.message) for w in caught] == ["old_api is deprecated"]


def test_a_deprecation_logged_by_transformers_for_a_trialign_call_raises():
    from transformers.modeling_outputs import CausalLMOutputWithPast
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger("transformers.utils.generic").warning_once.cache_clear()  # it logs once per process
    ours = module_function("trialign.fake", "def ours(out):\n    return out.past_key_values\n", "ours",
                           str(PACKAGE / "fake.py"))
    with pytest.raises(OwnDeprecation, match="deprecation logged at a trialign call site .*`past_key_values`"):
        ours(CausalLMOutputWithPast(logits=None))
