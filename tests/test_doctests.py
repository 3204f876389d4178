"""The Examples sections of the public API's docstrings run, and print what they say."""
import doctest
import importlib

import pytest

MODULES = ["fedtreelora.core.ops", "fedtreelora.core.tree", "fedtreelora.core.aggregation",
           "fedtreelora.core.synthetic", "fedtreelora.core.files", "fedtreelora.federation.draws"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted > 0, f"{name} has no docstring examples"
    assert result.failed == 0, f"{result.failed} of {result.attempted} doctest examples of {name} failed (run pytest -s)"


def test_public_api_has_examples():
    import fedtreelora as ftl
    for obj in (ftl.aggregate, ftl.build_tree, ftl.TreeConfig, ftl.AggregationTree, ftl.native_available):
        assert "Examples\n" in (obj.__doc__ or ""), f"{obj.__qualname__} has no Examples section"
