"""FRE and FIE under ``torch.compile``: the same numbers as eager, compiled once."""

import warnings

import pytest
import torch
from torch._dynamo.testing import CompileCounter
from torchrec.sparse.jagged_tensor import KeyedTensor

from recsys_llm.modules.field_interaction import FieldInteractionEnhancement
from recsys_llm.modules.field_semantics import FieldRepresentationEnhancement

NAMES = ["a", "b", "c"]


def _pooled(seed: int) -> KeyedTensor:
    values = torch.randn(6, 8 * len(NAMES), generator=torch.Generator().manual_seed(seed), requires_grad=True)
    return KeyedTensor(keys=NAMES, length_per_key=[8] * len(NAMES), values=values)


def _terms():
    torch.manual_seed(0)
    vectors = torch.randn(len(NAMES), 12)
    fie = FieldInteractionEnhancement(vectors, NAMES, weight=0.5)
    return FieldRepresentationEnhancement(vectors, NAMES, 8, weight=0.3).loss, lambda pooled: fie.logit(pooled).sum()


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    torch._dynamo.reset()


@pytest.mark.parametrize("term", [0, 1], ids=["fre", "fie"])
def test_an_eager_call_between_compiled_ones_compiles_nothing_again(term: int) -> None:
    """The key-position cache was read in the compiled region: dynamo guarded on its contents, and the first eager
    call with the same key order (an uncompiled eval model) made every compiled graph compile again."""
    function = _terms()[term]
    counter = CompileCounter()
    compiled = torch.compile(function, backend=counter)
    compiled(_pooled(0))
    function(_pooled(1))
    compiled(_pooled(2))
    assert counter.frame_count == 1


@pytest.mark.parametrize("term", [0, 1], ids=["fre", "fie"])
def test_compiled_values_and_gradients_are_eager_ones(term: int) -> None:
    function = _terms()[term]
    eager_input, compiled_input = _pooled(3), _pooled(3)
    expected = function(eager_input)
    expected.backward()
    got = torch.compile(function, backend="aot_eager")(compiled_input)
    got.backward()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(compiled_input.values().grad, eager_input.values().grad)
