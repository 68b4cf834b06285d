import pytest
import torch
import torch.nn.functional as F
import torchrec.fx
from torch import nn
from torchrec.models.dlrm import DLRM
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recsys_llm.modules.field_semantics import FieldRepresentationEnhancement
from tests.modules.llactr_helpers import FEATURES, make_ebc, make_kjt


class TestFieldRepresentationEnhancement:
    @pytest.mark.parametrize("field_reduction, fields_divisor", [("sum", 1), ("mean", 2)])
    def test_matches_explicit_kl_and_skips_fields_without_vectors(self, field_reduction, fields_divisor) -> None:
        torch.manual_seed(0)
        ebc, kjt = make_ebc(dim=6), make_kjt(batch_size=5)
        kt = ebc(kjt)
        vectors = torch.randn(2, 12)
        fre = FieldRepresentationEnhancement(vectors, ["genre", "user_id"], 6, 0.3, field_reduction)
        loss = fre.loss(kt)
        total = torch.zeros(())
        for row, name in enumerate(["genre", "user_id"]):
            target = torch.softmax(fre.projection(vectors[row]), dim=-1)  # (D,)
            for b in range(5):
                log_q = torch.log_softmax(kt[name][b], dim=-1)
                total = total + F.kl_div(log_q, target, reduction="sum")
        # KL summed over the 2 fields (public code) or averaged, mean over the batch of 5
        torch.testing.assert_close(loss, 0.3 * total / (5 * fields_divisor))
        loss.backward()
        assert fre.projection.weight.grad is not None and ebc.embedding_bags["t_genre"].weight.grad is not None
        skipped = ebc.embedding_bags["t_item_id"].weight.grad  # item_id has no vector: no gradient from FRE
        assert skipped is None or not skipped.any()

    def test_hand_written_backward_matches_autograd(self) -> None:
        from recsys_llm.modules.field_semantics import projected_field_kl

        torch.manual_seed(0)
        fields = torch.randn(5, 3, 4, dtype=torch.double, requires_grad=True)
        vectors = torch.randn(3, 6, dtype=torch.double)
        projection = nn.Linear(6, 4).double()

        assert torch.autograd.gradcheck(
            lambda x, w, c: projected_field_kl(x, vectors, w, c), (fields, projection.weight, projection.bias)
        )
        log_p = F.log_softmax(projection(vectors), dim=-1)
        reference = (log_p.exp() * (log_p - F.log_softmax(fields, dim=-1))).sum(-1).mean()
        parameters = (fields, projection.weight, projection.bias)
        expected = torch.autograd.grad(reference, parameters)
        loss = projected_field_kl(fields, vectors, projection.weight, projection.bias)
        got = torch.autograd.grad(loss, parameters)
        torch.testing.assert_close(loss, reference)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b)

    @pytest.mark.parametrize("case", ["moderate", "overflowing exp", "one row underflowing", "empty batch"])
    def test_matches_log_softmax_reference_at_any_magnitude(self, case: str) -> None:
        """Fields whose exp overflows or vanishes in float32 give the float64 reference's loss and gradients."""
        from recsys_llm.modules.field_semantics import projected_field_kl

        torch.manual_seed(0)
        fields = torch.randn(0 if case == "empty batch" else 6, 3, 8)
        if case == "overflowing exp":
            fields = fields * 60  # exp(x) is inf in float32 beyond 88.7
        elif case == "one row underflowing":
            fields[2, 1] -= 150  # exp(x) of that row is 0 in float32
        vectors, projection = torch.randn(3, 5), nn.Linear(5, 8)
        fields.requires_grad_()
        loss = projected_field_kl(fields, vectors, projection.weight, projection.bias)
        got = torch.autograd.grad(loss, (fields, projection.weight)) if fields.numel() else ()

        exact = fields.detach().double().requires_grad_()
        weight = projection.weight.detach().double().requires_grad_()
        log_p = F.log_softmax(vectors.double() @ weight.t() + projection.bias.detach().double(), dim=-1)
        reference = (log_p.exp() * (log_p - F.log_softmax(exact, dim=-1))).sum(-1).mean()
        if case == "empty batch":  # no sample to pull: 0, not the NaN of a mean over no sample
            assert loss.item() == 0
            return
        expected = torch.autograd.grad(reference, (exact, weight))
        assert torch.isfinite(loss)
        torch.testing.assert_close(loss.double(), reference, rtol=1e-5, atol=1e-5)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-6)

    def test_positions_count_only_their_keys(self) -> None:
        from recsys_llm.modules.field_semantics import projected_field_kl

        torch.manual_seed(0)
        fields = torch.randn(5, 4, 3, dtype=torch.double, requires_grad=True)
        vectors = torch.randn(2, 6, dtype=torch.double)
        projection = nn.Linear(6, 3).double()
        positions = torch.tensor([3, 1])  # vector 0 belongs to key 3, vector 1 to key 1
        weight, bias = projection.weight, projection.bias
        assert torch.autograd.gradcheck(
            lambda x, w, c: projected_field_kl(x, vectors, w, c, positions), (fields, weight, bias)
        )
        torch.testing.assert_close(
            projected_field_kl(fields, vectors, weight, bias, positions),
            projected_field_kl(fields[:, [3, 1]], vectors, weight, bias),
        )
        (grad,) = torch.autograd.grad(projected_field_kl(fields, vectors, weight, bias, positions), fields)
        assert not grad[:, [0, 2]].any()  # keys without a vector get no gradient

    def test_fx_traceable(self) -> None:
        torch.manual_seed(0)

        class EmbedThenFRE(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.ebc = make_ebc()
                self.fre = FieldRepresentationEnhancement(torch.randn(3, 10), FEATURES, 8, 0.1)

            def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
                return self.fre.loss(self.ebc(kjt))

        model = EmbedThenFRE()
        traced = torchrec.fx.symbolic_trace(model)
        kjt = make_kjt()
        torch.testing.assert_close(traced(kjt), model(kjt))

    def test_on_unmodified_torchrec_dlrm(self) -> None:
        torch.manual_seed(0)
        dlrm = DLRM(make_ebc(dim=8), dense_in_features=4, dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[8, 1])
        fre = FieldRepresentationEnhancement(torch.randn(3, 10), FEATURES, 8, 0.2)
        optimizer = torch.optim.Adam(list(dlrm.parameters()) + list(fre.parameters()), lr=0.05)
        dense, kjt, labels = torch.randn(4, 4), make_kjt(), torch.tensor([0.0, 1.0, 1.0, 0.0])
        losses = []
        for _ in range(5):
            kt = dlrm.sparse_arch.embedding_bag_collection(kjt)
            regularizer = fre.loss(kt)
            loss = F.binary_cross_entropy_with_logits(dlrm(dense, kjt).squeeze(-1), labels) + regularizer
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(regularizer.item())
        assert losses[-1] < losses[0]

    def test_rejects_bad_shapes(self) -> None:
        with pytest.raises(ValueError, match="len\\(feature_names\\)=2"):
            FieldRepresentationEnhancement(torch.randn(3, 4), ["a", "b"], 8)
        with pytest.raises(ValueError, match="field_reduction: expected one of \\('sum', 'mean'\\), got 'max'"):
            FieldRepresentationEnhancement(torch.randn(2, 4), ["a", "b"], 8, field_reduction="max")

    def test_rejects_no_fields_and_repeated_names(self) -> None:
        """No field would give a NaN loss (0 / 0 fields); a repeated name would compare one key twice, with
        two vectors scattered into one slot (which one wins is unspecified)."""
        with pytest.raises(ValueError, match="len\\(feature_names\\)=0 > 0"):
            FieldRepresentationEnhancement(torch.randn(0, 4), [], 8)
        with pytest.raises(ValueError, match="FRE feature_names must be distinct, got \\['a', 'a'\\]"):
            FieldRepresentationEnhancement(torch.randn(2, 4), ["a", "a"], 8)

    def test_keeps_its_own_copy_of_the_field_vectors(self) -> None:
        """The caller's tensor changed in place afterwards (e.g. a buffer reused for the next vector file) does not
        move the term's targets."""
        torch.manual_seed(0)
        vectors = torch.randn(2, 6)
        fre = FieldRepresentationEnhancement(vectors, ["a", "b"], 4)
        kt = KeyedTensor.from_tensor_list(["a", "b"], [torch.randn(3, 4), torch.randn(3, 4)])
        before = fre.loss(kt)
        vectors.mul_(-3.0)
        torch.testing.assert_close(fre.loss(kt), before, rtol=0, atol=0)


def test_field_vectors_must_be_finite() -> None:
    vectors = torch.randn(2, 5)
    vectors[0, 1] = float("inf")
    with pytest.raises(ValueError, match=r"FRE: the vector of field 'user_id' holds inf \(1 of 2"):
        FieldRepresentationEnhancement(vectors, ["user_id", "item_id"], 4)


def test_dims_that_do_not_fit_are_named() -> None:
    from torchrec.sparse.jagged_tensor import KeyedTensor

    from recsys_llm.modules.field_interaction import FieldInteractionEnhancement

    kt = KeyedTensor(keys=["a", "b"], length_per_key=[4, 8], values=torch.randn(3, 12))
    with pytest.raises(ValueError, match=r"must share one embedding dim .*\{'a': 4, 'b': 8\}"):
        FieldInteractionEnhancement(torch.randn(2, 5), ["a", "b"]).logit(kt)
    fre = FieldRepresentationEnhancement(torch.randn(1, 5), ["a"], embedding_dim=8)
    with pytest.raises(ValueError, match="fields have embedding dim 4, its projection gives 8"):
        fre.loss(kt)
    # a field missing from pooled embeddings of several dims is named as with one dim
    with pytest.raises(KeyError, match=r"the pooled embeddings have no keys \['c'\]; their keys are \['a', 'b'\]"):
        FieldInteractionEnhancement(torch.randn(2, 5), ["a", "c"]).logit(kt)


def test_a_weight_that_is_not_a_finite_number_at_least_0_is_refused() -> None:
    from recsys_llm.modules.field_interaction import FieldInteractionEnhancement

    # built directly (not through LLaCTRConfig): NaN gave NaN losses / logits, a negative FRE weight maximised the KL
    for bad in (float("nan"), -0.1):
        with pytest.raises(ValueError, match="FRE weight \\(lambda_fre\\) must be a finite number >= 0"):
            FieldRepresentationEnhancement(torch.randn(3, 10), FEATURES, 8, bad)
        with pytest.raises(ValueError, match="FIE weight \\(lambda_fie\\) must be a finite number >= 0"):
            FieldInteractionEnhancement(torch.randn(3, 10), FEATURES, bad)


def test_the_ids_instead_of_the_pooled_embeddings_are_named() -> None:
    from recsys_llm.modules.field_interaction import FieldInteractionEnhancement

    # fre.loss(kjt) for fre.loss(ebc(kjt)): a KeyedJaggedTensor has keys and length_per_key too
    fre = FieldRepresentationEnhancement(torch.randn(3, 10), FEATURES, 8)
    fie = FieldInteractionEnhancement(torch.randn(3, 10), FEATURES)
    for call in (fre.loss, fie.logit):
        with pytest.raises(TypeError, match=r"expected the pooled embeddings .* got the KeyedJaggedTensor of ids; "
                                            "pass it through the EmbeddingBagCollection first"):
            call(make_kjt())


def _terms_refusing(unnamed: torch.Tensor, refusal: str):
    """FRE and FIE over FEATURES, each checked to refuse ``unnamed`` (pooled embeddings without their keys) with a
    TypeError matching ``refusal``; returned for the calls that follow."""
    from recsys_llm.modules.field_interaction import FieldInteractionEnhancement

    fre = FieldRepresentationEnhancement(torch.randn(3, 10), FEATURES, 8)
    fie = FieldInteractionEnhancement(torch.randn(3, 10), FEATURES)
    for call in (fre.loss, fie.logit):
        with pytest.raises(TypeError, match=refusal):
            call(unnamed)
    return fre, fie


def test_the_unnamed_fields_of_dlrms_sparse_arch_are_named() -> None:
    """torchrec DLRM's sparse_arch(kjt) is a (B, F, D) tensor: it failed with "'Tensor' object has no attribute
    'length_per_key'"."""
    dlrm = DLRM(make_ebc(), 2, [8, 8], [8, 1])
    fre, fie = _terms_refusing(dlrm.sparse_arch(make_kjt()),
                               r"got a tensor of shape \(4, 3, 8\) without them .* wrap the DLRM in "
                               r"models\.dlrm\.DLRMBackbone, whose CTROutput\.embeddings come from the "
                               r"model's own lookup")
    from recsys_llm.models.dlrm import DLRMBackbone

    output = DLRMBackbone(dlrm, num_dense_features=2)(torch.rand(4, 2), make_kjt())
    assert fre.loss(output.embeddings).dim() == 0 and fie.logit(output.embeddings).shape == (4,)


def test_the_unnamed_columns_of_a_regrouped_keyed_tensor_are_named() -> None:
    """KeyedTensor.regroup gives (B, sum of dims) tensors: the error named torchrec DLRM's sparse_arch, not the
    KeyedTensor that names the columns."""
    pooled = make_ebc()(make_kjt())
    regrouped = KeyedTensor.regroup([pooled], [["genre", "user_id", "item_id"]])[0]  # (4, 24)
    fre, fie = _terms_refusing(regrouped, r"got a tensor of shape \(4, 24\) without them \(KeyedTensor\.regroup .* "
                                          r"KeyedTensor\(keys=\[\.\.\.\], length_per_key=\[\.\.\.\], "
                                          r"values=tensor\)")
    named = KeyedTensor(keys=["genre", "user_id", "item_id"], length_per_key=[8, 8, 8], values=regrouped)
    torch.testing.assert_close(fie.logit(named), fie.logit(pooled))
    torch.testing.assert_close(fre.loss(named), fre.loss(pooled))


@pytest.mark.parametrize("field_reduction", ["sum", "mean"])
def test_fre_on_an_empty_batch_is_zero_with_zero_gradients(field_reduction) -> None:
    """A rank's empty batch (a sum-reduced loss over the global batch) gave 0 / 0: a NaN loss, and NaN
    in the projection's gradient, which DDP's all-reduce would spread into every rank's weights."""
    from torchrec.sparse.jagged_tensor import KeyedTensor

    fre = FieldRepresentationEnhancement(torch.randn(2, 8), ["a", "b"], 4, 0.1, field_reduction)
    values = torch.randn(0, 12, requires_grad=True)
    loss = fre.loss(KeyedTensor(keys=["a", "c", "b"], length_per_key=[4, 4, 4], values=values))
    assert loss.item() == 0
    loss.backward()
    assert values.grad.shape == (0, 12)
    for param in fre.parameters():  # connected, so DDP sees every parameter get its (zero) gradient
        assert param.grad is not None and not param.grad.any()


@pytest.mark.parametrize("requires_grad", [True, False])
def test_fie_on_an_empty_batch(requires_grad) -> None:
    from torchrec.sparse.jagged_tensor import KeyedTensor

    from recsys_llm.modules.field_interaction import FieldInteractionEnhancement

    values = torch.randn(0, 12, requires_grad=requires_grad)
    out = FieldInteractionEnhancement(torch.randn(3, 5), ["a", "b", "c"]).logit(
        KeyedTensor(keys=["a", "b", "c"], length_per_key=[4, 4, 4], values=values))
    assert out.shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_fields_of_another_dtype_than_the_projection(dtype) -> None:
    """Gradients come back in each input's own dtype (fields vs the float32 projection)."""
    from torchrec.sparse.jagged_tensor import KeyedTensor

    fre = FieldRepresentationEnhancement(torch.randn(2, 8), ["a", "b"], 4, 0.1)
    values = torch.randn(3, 8, dtype=dtype, requires_grad=True)
    loss = fre.loss(KeyedTensor(keys=["a", "b"], length_per_key=[4, 4], values=values))
    reference = fre.loss(KeyedTensor(keys=["a", "b"], length_per_key=[4, 4], values=values.detach().float()))
    torch.testing.assert_close(loss.float(), reference, rtol=2e-2, atol=1e-3)
    loss.backward()
    assert values.grad.dtype == dtype and fre.projection.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 0.05), (torch.float16, 0.01)])
def test_half_precision_fields_give_the_projection_autograds_gradient(dtype, tolerance) -> None:
    """The batch sum of log softmax(e_{b,f}) is taken in the projection's float32: rounded to bf16 over
    4,096 rows, it put W's gradient 95% off (fp16: 11%) where autograd on the same inputs is 2% off."""
    from recsys_llm.modules.field_semantics import projected_field_kl

    torch.manual_seed(0)
    vectors, projection = torch.randn(10, 32), nn.Linear(32, 16)
    with torch.no_grad():  # embeddings near their targets, as FRE pulls them: a small KL
        near = F.log_softmax(projection(vectors), dim=-1) + 0.3 * torch.randn(4096, 10, 16)
    weight = projection.weight.detach().double().requires_grad_()
    log_p = F.log_softmax(vectors.double() @ weight.t() + projection.bias.detach().double(), dim=-1)
    reference = (log_p.exp() * (log_p - F.log_softmax(near.double(), dim=-1))).sum(-1).mean()
    (expected,) = torch.autograd.grad(reference, weight)

    loss = projected_field_kl(near.to(dtype), vectors, projection.weight, projection.bias)
    (got,) = torch.autograd.grad(loss, projection.weight)
    assert float((got.double() - expected).norm() / expected.norm()) < tolerance
    torch.testing.assert_close(loss.double(), reference, rtol=tolerance / 5, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backward_inside", [False, True], ids=["backward after autocast", "backward inside"])
def test_fre_and_fie_train_under_autocast(dtype, backward_inside) -> None:
    """Mixed precision: autocast ran FRE's projection in half precision beside the float32 field vectors, and
    the first backward failed ('expected m1 and m2 to have the same dtype')."""
    from recsys_llm.data.batch import Batch
    from recsys_llm.models import DeepFM, DeepFMConfig
    from recsys_llm.models.task import CTRTask
    from recsys_llm.modules.field_interaction import FieldInteractionEnhancement

    torch.manual_seed(0)
    task = CTRTask(DeepFM(make_ebc(8), 2, DeepFMConfig(mlp_layer_sizes=(8,))),
                   logit_terms={"fie": FieldInteractionEnhancement(torch.randn(3, 16), FEATURES, 0.2)},
                   loss_terms={"fre": FieldRepresentationEnhancement(torch.randn(3, 16), FEATURES, 8, 0.1)})
    batch = Batch(torch.rand(4, 2), make_kjt(4), torch.ones(4))
    expected = task.loss_terms["fre"](task.model(batch.dense_features, batch.sparse_features), batch)
    with torch.autocast("cpu", dtype=dtype):
        loss, _ = task(batch)
        fre = task.loss_terms["fre"](task.model(batch.dense_features, batch.sparse_features), batch)
        if backward_inside:
            loss.backward()
    if not backward_inside:
        loss.backward()
    assert fre.dtype == torch.float32
    torch.testing.assert_close(fre, expected)  # computed in float32: the same value as without autocast
    grads = {name: p.grad for name, p in task.named_parameters()}
    assert grads["loss_terms.fre.projection.weight"] is not None
    assert all(g is None or (g.dtype == torch.float32 and bool(torch.isfinite(g).all())) for g in grads.values())


def test_feature_names_given_as_one_string_are_refused() -> None:
    """A string was read as one field per character: "abc" made three fields a, b and c."""
    with pytest.raises(TypeError, match=r"FRE: feature_names must be a list of field names, got the string 'abc'"):
        FieldRepresentationEnhancement(torch.randn(3, 8), "abc", embedding_dim=4)
