import pytest
import torch
import torch.nn.functional as F
import torchrec.fx
from torch import nn
from torchrec.models.dlrm import DLRM
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recsys_llm.modules.field_interaction import FieldInteractionEnhancement
from tests.modules.llactr_helpers import FEATURES, make_ebc, make_kjt



def _pooled_in_two_orders_and_a_term() -> "tuple[KeyedTensor, KeyedTensor, FieldInteractionEnhancement]":
    """Pooled fields a..d of 6 rows, the same in the reverse key order, and an FIE term over d, a, c (seeded)."""
    torch.manual_seed(0)
    kt = make_ebc(features=["a", "b", "c", "d"])(make_kjt(batch_size=6, features=["a", "b", "c", "d"]))
    reordered = KeyedTensor.from_tensor_list(["d", "c", "b", "a"], [kt[k] for k in ["d", "c", "b", "a"]])
    return kt, reordered, FieldInteractionEnhancement(torch.randn(3, 7), ["d", "a", "c"], weight=0.3)

class TestFieldInteractionEnhancement:
    def test_matches_explicit_pair_sum(self) -> None:
        torch.manual_seed(0)
        kt = make_ebc(dim=5)(make_kjt(batch_size=3))
        vectors = torch.randn(3, 7)
        fie = FieldInteractionEnhancement(vectors, ["item_id", "genre", "user_id"], weight=0.4)
        names = ["item_id", "genre", "user_id"]
        pairs = [(0, 1), (0, 2), (1, 2)]
        similarity = torch.stack([F.cosine_similarity(vectors[i], vectors[j], dim=0) for i, j in pairs])
        weights = fie.pair_weight.weight @ similarity + fie.pair_weight.bias  # (P,)
        expected = torch.stack([
            sum(weights[p] * torch.dot(kt[names[i]][b], kt[names[j]][b]) for p, (i, j) in enumerate(pairs))
            for b in range(3)
        ])
        torch.testing.assert_close(fie.logit(kt), 0.4 * expected, rtol=1e-5, atol=1e-6)

    def test_training_gradients_match_autograd_with_keys_left_out_and_reordered(self) -> None:
        torch.manual_seed(0)
        keys = ["a", "b", "c", "d"]
        fields = torch.randn(6, 4, 3, dtype=torch.double, requires_grad=True)
        kt = KeyedTensor(keys=keys, length_per_key=[3] * 4, values=fields.view(6, 12))
        names = ["d", "a", "c"]  # b has no vector
        fie = FieldInteractionEnhancement(torch.randn(3, 7), names, weight=0.3).double()
        position = {key: i for i, key in enumerate(keys)}
        pair_weights = fie.pair_weight(fie.pair_similarity)  # (P,) autograd reference
        expected = sum(
            pair_weights[p] * (fields[:, position[names[i]]] * fields[:, position[names[j]]]).sum(-1)
            for p, (i, j) in enumerate(zip(fie.pair_rows.tolist(), fie.pair_cols.tolist()))
        ) * 0.3
        parameters = (fields, fie.pair_weight.weight, fie.pair_weight.bias)
        upstream = torch.randn(6, dtype=torch.double)
        got = fie.logit(kt)
        torch.testing.assert_close(got, expected)
        for a, b in zip(torch.autograd.grad((got * upstream).sum(), parameters),
                        torch.autograd.grad((expected * upstream).sum(), parameters)):
            torch.testing.assert_close(a, b)

    def test_unfrozen_without_gradients_gives_the_training_logits(self) -> None:
        """Validation during training: not frozen, no grad (the inference kernel, chosen at run time)."""
        torch.manual_seed(0)
        kt = make_ebc(features=["a", "b", "c", "d"])(make_kjt(batch_size=6, features=["a", "b", "c", "d"]))
        fie = FieldInteractionEnhancement(torch.randn(3, 7), ["d", "a", "c"], weight=0.3)
        training = fie.logit(kt)
        assert training.grad_fn is not None
        with torch.no_grad():
            evaluation = fie.logit(kt)
        assert evaluation.grad_fn is None
        torch.testing.assert_close(evaluation, training.detach())

    def test_semantic_pair_sum_gradcheck(self) -> None:
        from recsys_llm.modules.field_interaction import semantic_pair_sum

        torch.manual_seed(0)
        fields = torch.randn(4, 3, 2, dtype=torch.double, requires_grad=True)
        weight = torch.randn(3, 3, dtype=torch.double, requires_grad=True)
        bias = torch.randn(3, dtype=torch.double, requires_grad=True)
        similarity = torch.randn(3, dtype=torch.double)
        flat_pairs = torch.tensor([5, 1, 2])  # pairs (1, 2), (0, 1), (0, 2) of 3 keys, in any order
        assert torch.autograd.gradcheck(
            lambda x, w, c: semantic_pair_sum(x, similarity, w, c, flat_pairs, 0.7), (fields, weight, bias)
        )

    def test_freeze_keeps_weights_constant(self) -> None:
        torch.manual_seed(0)
        kt = make_ebc()(make_kjt())
        fie = FieldInteractionEnhancement(torch.randn(3, 7), FEATURES, weight=0.1)
        before = fie.logit(kt).detach()
        fie.freeze()
        optimizer = torch.optim.Adam(fie.parameters(), lr=0.1)
        for _ in range(2):  # no gradient reaches the Linear: the optimizer leaves the weights as they are
            fie.logit(kt).sum().backward(retain_graph=True)
            optimizer.step()
        assert fie.pair_weight.weight.grad is None and fie.pair_weight.bias.grad is None
        torch.testing.assert_close(fie.logit(kt), before)
        assert fie.frozen and "frozen_pair_weights" in fie.state_dict()
        with torch.no_grad():  # a change of the Linear (momentum or weight decay on zero gradients) is no change
            fie.pair_weight.weight.add_(1.0)
        torch.testing.assert_close(fie.logit(kt), before)
        fie.unfreeze()
        assert not torch.allclose(fie.logit(kt), before)

    def test_frozen_before_loading_takes_the_loaded_weights(self) -> None:
        """freeze() then load_state_dict of a run that never froze (its frozen copy is zeros)."""
        torch.manual_seed(0)
        kt = make_ebc()(make_kjt())
        trained = FieldInteractionEnhancement(torch.randn(3, 7), FEATURES, weight=0.1)
        expected = trained.logit(kt).detach()
        assert not trained.state_dict()["frozen_pair_weights"].any()
        served = FieldInteractionEnhancement(torch.randn(3, 7), FEATURES, weight=0.1)  # its own similarities until loaded
        served.freeze()
        served.set_serving_key_order(kt.keys())
        served.load_state_dict(trained.state_dict())
        assert served.frozen
        torch.testing.assert_close(served.logit(kt), expected)
        torch.testing.assert_close(served.serving_pair_matrix, served.weighted_pair_matrix(kt.keys()))
        # a frozen run's checkpoint gives back its frozen weights
        trained.freeze()
        again = FieldInteractionEnhancement(torch.randn(3, 7), FEATURES, weight=0.1)
        again.load_state_dict(trained.state_dict())
        again.freeze()
        torch.testing.assert_close(again.frozen_pair_weights, trained.frozen_pair_weights)

    def test_a_frozen_runs_weights_survive_loading_into_a_frozen_term(self) -> None:
        """A run that froze keeps serving its frozen weights when loaded into a frozen term (load_state_dict and its
        post hook), even after its Linear moved (momentum or weight decay on zero gradients): not Linear(S) again."""
        torch.manual_seed(0)
        kt = make_ebc()(make_kjt())
        vectors = torch.randn(3, 7)
        trained = FieldInteractionEnhancement(vectors, FEATURES, weight=0.1)
        trained.freeze()
        with torch.no_grad():
            trained.pair_weight.weight.add_(1.0)  # moved after freezing
        frozen = trained.frozen_pair_weights.clone()
        expected = 0.1 * sum(frozen[p] * (kt[FEATURES[i]] * kt[FEATURES[j]]).sum(-1)
                             for p, (i, j) in enumerate([(0, 1), (0, 2), (1, 2)]))
        served = FieldInteractionEnhancement(vectors, FEATURES, weight=0.1)
        served.freeze()
        served.load_state_dict(trained.state_dict())
        torch.testing.assert_close(served.frozen_pair_weights, frozen)
        torch.testing.assert_close(served.logit(kt), expected)

    def test_field_vectors_must_be_finite(self) -> None:
        vectors = torch.randn(3, 7)
        vectors[2, 4] = float("nan")
        with pytest.raises(ValueError, match=r"FIE: the vector of field 'genre' holds nan \(1 of 3"):
            FieldInteractionEnhancement(vectors, FEATURES, 0.1)

    def test_freeze_keeps_logits_with_fields_left_out_and_reordered(self) -> None:
        torch.manual_seed(0)
        kt = make_ebc(features=["a", "b", "c", "d"])(make_kjt(batch_size=6, features=["a", "b", "c", "d"]))
        fie = FieldInteractionEnhancement(torch.randn(3, 7), ["d", "a", "c"], weight=0.3)  # b left out
        training = fie.logit(kt)
        fie.freeze()
        torch.testing.assert_close(fie.logit(kt), training)

    def test_serving_key_order_precomputes_the_matrix(self) -> None:
        torch.manual_seed(0)
        kt = make_ebc(features=["a", "b", "c", "d"])(make_kjt(batch_size=6, features=["a", "b", "c", "d"]))
        fie = FieldInteractionEnhancement(torch.randn(3, 7), ["d", "a", "c"], weight=0.3)  # b left out
        training = fie.logit(kt).detach()
        with pytest.raises(RuntimeError, match="freeze"):
            fie.set_serving_key_order(kt.keys())
        fie.freeze()
        fie.set_serving_key_order(kt.keys())
        assert fie.serving_pair_matrix.shape == (4, 4) and "serving_pair_matrix" not in fie.state_dict()
        with torch.no_grad():
            torch.testing.assert_close(fie.logit(kt), training)
        reordered = make_ebc(features=["d", "c", "b", "a"])(make_kjt(batch_size=6, features=["d", "c", "b", "a"]))
        fie.unfreeze()
        expected = fie.logit(reordered).detach()
        fie.freeze()
        fie.set_serving_key_order(kt.keys())  # another key order than served: the general path
        torch.testing.assert_close(fie.logit(reordered), expected)
        with pytest.raises(KeyError, match=r"FIE fields \['d'\] are not among"):
            fie.weighted_pair_matrix(["a", "b", "c"])

    def test_pair_weights_train_when_the_embeddings_take_no_gradient(self) -> None:
        """Frozen (or detached) embeddings: the pair-weight Linear still gets autograd's gradient."""
        torch.manual_seed(0)
        keys = ["a", "b", "c"]
        fields = torch.randn(5, 3, 4, dtype=torch.double)  # no requires_grad
        kt = KeyedTensor(keys=keys, length_per_key=[4] * 3, values=fields.view(5, 12))
        fie = FieldInteractionEnhancement(torch.randn(3, 7), keys, weight=0.3).double()
        pair_weights = fie.pair_weight(fie.pair_similarity)  # (P,) autograd reference
        expected = 0.3 * sum(
            pair_weights[p] * (fields[:, i] * fields[:, j]).sum(-1)
            for p, (i, j) in enumerate(zip(fie.pair_rows.tolist(), fie.pair_cols.tolist()))
        )
        parameters = (fie.pair_weight.weight, fie.pair_weight.bias)
        got = fie.logit(kt)
        assert got.requires_grad
        for a, b in zip(torch.autograd.grad(got.sum(), parameters), torch.autograd.grad(expected.sum(), parameters)):
            torch.testing.assert_close(a, b)

    def test_unfreezing_drops_the_serving_matrix(self) -> None:
        """After unfreeze() the logits follow the trainable Linear again, also for embeddings in the key order a
        serving matrix was set for (a stale frozen matrix would serve the old weights and train nothing)."""
        kt, reordered, fie = _pooled_in_two_orders_and_a_term()
        fie.freeze()
        fie.set_serving_key_order(kt.keys())
        fie.unfreeze()
        assert fie.serving_key_order is None and fie.serving_pair_matrix is None
        with torch.no_grad():
            fie.pair_weight.weight.mul_(-2.0)
        logits = fie.logit(kt)
        assert logits.grad_fn is not None
        torch.testing.assert_close(logits, fie.logit(reordered))

    def test_the_serving_matrix_is_made_of_the_frozen_weights(self) -> None:
        """Frozen, the Linear may still move (weight decay, momentum on zero gradients): the serving matrix (and a
        fold) take the frozen copy, as the frozen logits do."""
        kt, reordered, fie = _pooled_in_two_orders_and_a_term()
        fie.freeze()
        frozen = fie.frozen_pair_weights.clone()
        with torch.no_grad():
            fie.pair_weight.weight.mul_(0.5)  # a step after freezing
            fie.pair_weight.bias.add_(1.0)
        torch.testing.assert_close(fie.pair_weights(), frozen, rtol=0, atol=0)
        fie.set_serving_key_order(kt.keys())
        with torch.no_grad():
            torch.testing.assert_close(fie.logit(kt), fie.logit(reordered))  # serving matrix vs frozen path

    def test_freezing_again_refreshes_the_serving_matrix(self) -> None:
        """freeze() stores the current weights: a serving matrix set before follows them, so the
        logits do not depend on whether the embeddings come in the serving key order."""
        kt, reordered, fie = _pooled_in_two_orders_and_a_term()
        fie.freeze()
        fie.set_serving_key_order(kt.keys())
        torch.nn.init.normal_(fie.pair_weight.weight)
        fie.freeze()  # the new weights
        with torch.no_grad():
            torch.testing.assert_close(fie.serving_pair_matrix, fie.weighted_pair_matrix(kt.keys()))
            torch.testing.assert_close(fie.logit(kt), fie.logit(reordered))

    def test_fx_traceable(self) -> None:
        torch.manual_seed(0)

        class EmbedThenFIE(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.ebc = make_ebc()
                self.fie = FieldInteractionEnhancement(torch.randn(3, 10), FEATURES, 0.1)

            def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
                return self.fie.logit(self.ebc(kjt))

        model = EmbedThenFIE()
        traced = torchrec.fx.symbolic_trace(model)
        kjt = make_kjt()
        torch.testing.assert_close(traced(kjt), model(kjt))
        # frozen with a serving key order (its shortcut read the keys of the traced KeyedTensor: a TraceError)
        model.fie.freeze()
        model.fie.set_serving_key_order(model.ebc(kjt).keys())
        with torch.no_grad():
            for trace in (torchrec.fx.symbolic_trace, torch.fx.symbolic_trace):
                torch.testing.assert_close(trace(model)(kjt), model(kjt))

    def test_on_unmodified_torchrec_dlrm(self) -> None:
        torch.manual_seed(0)
        dlrm = DLRM(make_ebc(dim=8), dense_in_features=4, dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[8, 1])
        fie = FieldInteractionEnhancement(torch.randn(3, 10), FEATURES, 0.1)
        dense, kjt, labels = torch.randn(4, 4), make_kjt(), torch.tensor([0.0, 1.0, 1.0, 0.0])
        kt = dlrm.sparse_arch.embedding_bag_collection(kjt)
        logits = dlrm(dense, kjt).squeeze(-1) + fie.logit(kt)  # (B,)
        F.binary_cross_entropy_with_logits(logits, labels).backward()
        assert fie.pair_weight.weight.grad is not None and fie.pair_weight.weight.grad.abs().sum() > 0
        assert dlrm.sparse_arch.embedding_bag_collection.embedding_bags["t_genre"].weight.grad is not None

    def test_needs_two_fields(self) -> None:
        with pytest.raises(ValueError, match=">= 2 fields"):
            FieldInteractionEnhancement(torch.randn(1, 4), ["a"])


def test_float64_fields_and_duplicate_names() -> None:
    """FIE follows the embeddings' dtype; a field named twice would pair with itself."""
    from torchrec.sparse.jagged_tensor import KeyedTensor

    fie = FieldInteractionEnhancement(torch.randn(3, 5), ["a", "b", "c"], 0.3)
    values = torch.randn(4, 3 * 2, dtype=torch.float64, requires_grad=True)
    kt = KeyedTensor(keys=["a", "b", "c"], length_per_key=[2, 2, 2], values=values)
    out = fie.logit(kt)
    assert out.dtype == torch.float64
    out.sum().backward()  # the training kernel: gradients in each input's own dtype
    assert values.grad.dtype == torch.float64 and fie.pair_weight.weight.grad.dtype == torch.float32
    values = values.detach()
    torch.testing.assert_close(out.float(), fie.logit(KeyedTensor(["a", "b", "c"], [2, 2, 2], values.float())))
    with pytest.raises(ValueError, match="must be distinct"):
        FieldInteractionEnhancement(torch.randn(3, 5), ["a", "b", "a"])


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_the_serving_matrix_follows_the_embeddings_dtype_as_the_frozen_weights_do(dtype) -> None:
    """After set_serving_key_order, embeddings of another dtype than the term's float32 weights
    failed in the quadratic form ("expected scalar type Float"); the frozen path casts its weights."""
    torch.manual_seed(0)
    fie = FieldInteractionEnhancement(torch.randn(3, 5), ["a", "b", "c"], 0.3)
    fie.freeze()
    kt = KeyedTensor(keys=["a", "b", "c"], length_per_key=[2, 2, 2], values=torch.randn(4, 6, dtype=dtype))
    with torch.no_grad():
        frozen = fie.logit(kt)
        fie.set_serving_key_order(kt.keys())
        served = fie.logit(kt)
    assert served.dtype == dtype
    torch.testing.assert_close(served.float(), frozen.float(), rtol=2e-2, atol=2e-3)  # bf16: other rounding


def test_feature_names_given_as_one_string_and_a_dict_of_embeddings_are_refused_naming_what_is_expected() -> None:
    """A string was read as one field per character ("abc": fields a, b, c), and pooled.to_dict() failed with
    "'dict' object has no attribute 'length_per_key'"."""
    with pytest.raises(TypeError, match=r"FIE: feature_names must be a list of field names, got the string 'abc'"):
        FieldInteractionEnhancement(torch.randn(3, 8), "abc")
    names = ["a", "b", "c"]
    fie = FieldInteractionEnhancement(torch.randn(3, 8), names)
    pooled = KeyedTensor.from_tensor_list(names, [torch.randn(2, 4) for _ in names])
    with pytest.raises(TypeError, match=r"got a dict of keys \['a', 'b', 'c'\]: pass the KeyedTensor itself"):
        fie.logit(pooled.to_dict())


def _pair_inputs(device: str):
    num_keys = 4
    rows, cols = torch.triu_indices(num_keys, num_keys, offset=1)
    num_pairs = rows.numel()
    return (torch.randn(2, num_keys, 8, device=device), torch.rand(num_pairs, device=device),
            torch.randn(num_pairs, num_pairs, device=device), torch.randn(num_pairs, device=device),
            (rows * num_keys + cols).to(device))


def test_fie_pair_weights_are_computed_with_autocast_off(monkeypatch):
    """CUDA's autocast casts addmv to bf16: the pair weights leave autocast (seen here on the CPU, whose autocast
    would not cast it, by what addmv is called under)."""
    from recsys_llm.modules import field_interaction

    seen = []
    addmv = torch.addmv

    def recording_addmv(*args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu"))
        return addmv(*args, **kwargs)

    monkeypatch.setattr(torch, "addmv", recording_addmv)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = field_interaction._semantic_pair_matrix(*_pair_inputs("cpu"), 0.1)
    assert seen == [False] and out.dtype == torch.float32


def test_fie_pair_matrix_runs_on_meta():
    """A shape-only forward on meta: torch.autocast refuses the meta device, so none is entered there."""
    from recsys_llm.modules.field_interaction import _semantic_pair_matrix

    out = _semantic_pair_matrix(*_pair_inputs("meta"), 0.1)
    assert out.is_meta and out.shape == (4, 4)
