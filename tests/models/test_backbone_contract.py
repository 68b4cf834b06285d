"""What a model of one's own needs to be a backbone (``CTRBackbone``), and what it need not."""

from typing import Optional, Tuple

import pytest
import torch
from torch import nn
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recsys_llm.data.batch import Batch
from recsys_llm.models.base import CTRBackbone, CTROutput
from recsys_llm.models.dlrm import DLRMBackbone
from recsys_llm.models.fm import FM
from recsys_llm.models.task import CTRTask
from recsys_llm.modules.dense_injection import DLRMDenseInjection, VectorFieldInjection
from recsys_llm.modules.field_semantics import FieldRepresentationEnhancement

WIDTHS = {"user_id": 8, "item_id": 4, "city": 4}


def _ebc() -> EmbeddingBagCollection:
    torch.manual_seed(0)
    return EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name=f"t_{name}", embedding_dim=dim, num_embeddings=10, feature_names=[name])
        for name, dim in WIDTHS.items()])


def _batch(batch_size: int = 6) -> Batch:
    ids = torch.arange(batch_size * len(WIDTHS)) % 10
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=list(WIDTHS), values=ids,
                                              lengths=torch.ones(batch_size * len(WIDTHS), dtype=torch.int32))
    return Batch(torch.randn(batch_size, 2), kjt, torch.ones(batch_size), {"llm_vector": torch.randn(batch_size, 5)})


class Concatenating(CTRBackbone):
    """Fields of different widths, concatenated by name; an injected vector joins the dense input."""

    def __init__(self, ebc: EmbeddingBagCollection, injected_width: int = 0) -> None:
        super().__init__(ebc, 2)
        self.injected_width = injected_width
        self.head = nn.Linear(sum(self.embedding_dims.values()) + 2 + injected_width, 1)

    @property
    def representation_dim(self) -> int:
        return 1

    def check_extra_fields(self, num_fields: int, embedding_dim: int, source: str) -> None:
        if num_fields * embedding_dim != self.injected_width:
            raise ValueError(f"{source}: {num_fields * embedding_dim} values, room for {self.injected_width}")

    def interact(self, dense: torch.Tensor, pooled: KeyedTensor,
                 extra_fields: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        by_name = pooled.to_dict()
        parts = [by_name[name] for name in self.feature_names] + [dense]
        if extra_fields is not None:
            parts.append(extra_fields.flatten(1))
        logits = self.head(torch.cat(parts, dim=1)).squeeze(-1)
        return logits, logits.unsqueeze(1)


class TestOwnBackbone:
    def test_tables_of_different_widths_are_a_backbone_of_their_own(self) -> None:
        model = Concatenating(_ebc())
        assert model.embedding_dims == WIDTHS and model.feature_names == list(WIDTHS)
        with pytest.raises(ValueError, match=r"Concatenating needs one embedding dim for all its tables, got "
                                             r"\{'user_id': 8, 'item_id': 4, 'city': 4\}"):
            model.embedding_dim
        # FRE on the fields that share a width, trained through CTRTask
        fre = FieldRepresentationEnhancement(torch.randn(2, 6), ["item_id", "city"], embedding_dim=4, weight=0.1)
        loss, (_, logits, _) = CTRTask(model, loss_terms={"fre": fre})(_batch())
        assert logits.shape == (6,) and torch.isfinite(loss)

    def test_backbones_that_pair_fields_refuse_different_widths_by_name(self) -> None:
        with pytest.raises(ValueError, match=r"FM needs one embedding dim for all its tables"):
            FM(_ebc(), num_dense_features=2)

    def test_its_own_check_of_the_injected_vector_is_used(self) -> None:
        injection = VectorFieldInjection(5, 3, num_fields=2)
        task = CTRTask(Concatenating(_ebc(), injected_width=6), field_injection=injection)
        assert task.predict(_batch()).logits.shape == (6,)
        with pytest.raises(ValueError, match=r"the field injection \(VectorFieldInjection\): 4 values, room for 6"):
            CTRTask(Concatenating(_ebc(), injected_width=6), field_injection=VectorFieldInjection(5, 4))

    def test_a_model_without_the_check_is_not_asked_for_it(self) -> None:
        class DuckTyped(nn.Module):  # forward(dense, kjt, extra_fields) -> CTROutput, no base class
            def __init__(self) -> None:
                super().__init__()
                self.inner = Concatenating(_ebc(), injected_width=4)
                self.representation_dim = 1

            def forward(self, dense: torch.Tensor, kjt: KeyedJaggedTensor,
                        extra_fields: Optional[torch.Tensor] = None) -> CTROutput:
                return self.inner(dense, kjt, extra_fields)

        task = CTRTask(DuckTyped(), field_injection=VectorFieldInjection(5, 4))
        assert task.predict(_batch()).logits.shape == (6,)

    def test_integer_and_boolean_labels_train_as_torchrec_s_dlrm_train_takes_them(self) -> None:
        """DLRMTrain takes batch.labels.float(); CTRTask failed on 0/1 int64 labels ('result type Float can't be
        cast to the desired output type Long') and on bool ones (a subtraction of bool tensors)."""
        task = CTRTask(Concatenating(_ebc()))
        batch = _batch()
        expected, _ = task(batch)
        for labels in (batch.labels.long(), batch.labels.bool()):
            loss, (_, _, returned) = task(Batch(batch.dense_features, batch.sparse_features, labels, batch.extras))
            torch.testing.assert_close(loss, expected)
            assert returned is labels  # handed back as they came, as DLRMTrain does

    def test_the_dlrm_wrappers_name_what_they_wrap(self) -> None:
        with pytest.raises(TypeError, match=r"DLRMDenseInjection wraps torchrec's DLRM .* got Concatenating; a model "
                                            r"of your own becomes a backbone by subclassing .*CTRBackbone"):
            DLRMDenseInjection(Concatenating(_ebc()), in_dim=5)
        with pytest.raises(TypeError, match=r"DLRMBackbone wraps torchrec's DLRM .* got Concatenating"):
            DLRMBackbone(Concatenating(_ebc()), num_dense_features=2)


class TestMistakesAreNamed:
    def test_own_tables_left_on_meta_are_named(self) -> None:
        """An own model's EBC built on meta (as examples/plug_into_own_model.py builds it), run unsharded."""
        ebc = EmbeddingBagCollection(tables=[
            EmbeddingBagConfig(name=f"t_{name}", embedding_dim=dim, num_embeddings=10, feature_names=[name])
            for name, dim in WIDTHS.items()], device=torch.device("meta"))
        batch = _batch()
        with pytest.raises(RuntimeError, match=r"Concatenating: its tables are on the meta device .*"
                                               r"the EmbeddingBagCollection handed to CTRBackbone.__init__"):
            Concatenating(ebc)(batch.dense_features, batch.sparse_features)

    def test_fold_into_an_own_backbone_folds_nothing(self) -> None:
        """fie.fold_into returns False for a backbone without a pairwise term: its logits stay without FIE, and
        the task (backbone + FIE) is what serves (docs/usage.md, section 3)."""
        from recsys_llm.modules.field_interaction import FieldInteractionEnhancement

        backbone = Concatenating(_ebc())
        names = ["item_id", "city"]  # the fields of one width
        torch.manual_seed(1)
        task = CTRTask(backbone, logit_terms={"fie": FieldInteractionEnhancement(torch.randn(2, 16), names, 0.5)})
        fie = task.logit_terms["fie"]
        fie.freeze()
        batch = _batch()
        with torch.no_grad():
            before = backbone(batch.dense_features, batch.sparse_features).logits
            assert not fie.fold_into(backbone)
            after = backbone(batch.dense_features, batch.sparse_features).logits
            served = task.predict(batch).logits
            pooled = backbone(batch.dense_features, batch.sparse_features).embeddings.to_dict()
        torch.testing.assert_close(after, before)
        pair = (pooled["item_id"] * pooled["city"]).sum(-1)
        torch.testing.assert_close(served - after, 0.5 * fie.frozen_pair_weights[0] * pair)

    def test_an_llm_vector_of_another_width(self) -> None:
        task = CTRTask(Concatenating(_ebc(), injected_width=4), field_injection=VectorFieldInjection(384, 4))
        with pytest.raises(ValueError, match=r"VectorFieldInjection: the LLM vector is \(6, 5\), expected \(B, 384\) "
                                             r"\(in_dim: the width of the exported vectors"):
            task.predict(_batch())

    def test_extra_fields_without_an_injection(self) -> None:
        from recsys_llm.models.registry import SMOKE_CONFIGS, build_backbone
        from recsys_llm.data.schema import DatasetSchema, FieldSpec

        schema = DatasetSchema("t", [FieldSpec("user_id", "sparse", 10), FieldSpec("age", "dense")])
        backbone = build_backbone(SMOKE_CONFIGS["deepfm"], schema, num_extra_fields=1, device=torch.device("cpu"))
        with pytest.raises(ValueError, match=r"DeepFM was built for 1 extra field\(s\) \(num_extra_fields\) but the "
                                             r"task has no field_injection"):
            CTRTask(backbone)

    def test_a_torchrec_model_handed_over_unwrapped_is_named(self) -> None:
        """torchrec's DLRM takes (dense, kjt): CTRTask failed at the first batch with 'takes 3 positional arguments'."""
        from torchrec.models.dlrm import DLRM

        with pytest.raises(TypeError, match=r"CTRTask: DLRM is no CTRBackbone .* wrap a torchrec DLRM in "
                                            r"recsys_llm.models.DLRMBackbone\(dlrm, num_dense_features\)"):
            CTRTask(DLRM(EmbeddingBagCollection(tables=[EmbeddingBagConfig(
                name="t_item", embedding_dim=8, num_embeddings=10, feature_names=["item_id"])]), 2, [8], [4, 1]))

    def test_logits_of_shape_b_1_are_named_not_broadcast(self) -> None:
        """torchrec's DLRM returns (B, 1); as logits they would broadcast against (B,) labels and terms."""
        class ColumnLogits(Concatenating):
            def interact(self, dense, pooled, extra_fields):
                logits, representation = super().interact(dense, pooled, extra_fields)
                return logits.unsqueeze(1), representation

        import torchrec.fx

        backbone = ColumnLogits(_ebc())
        batch = _batch()
        with pytest.raises(ValueError, match=r"ColumnLogits.interact returned logits of shape \(6, 1\); expected "
                                             r"\(B,\), one per row"):
            CTRTask(backbone)(batch)
        traced = torchrec.fx.symbolic_trace(Concatenating(_ebc()), concrete_args={"extra_fields": None})  # a leaf
        torch.testing.assert_close(traced(batch.dense_features, batch.sparse_features).logits,
                                   Concatenating(_ebc())(batch.dense_features, batch.sparse_features).logits)

    def test_dense_features_of_another_dtype_are_named(self) -> None:
        """float64 dense features (numpy's default) failed in the first Linear with torch's bare
        'mat1 and mat2 must have the same dtype'; now a TypeError names the model and float32."""
        import torchrec.fx

        batch = _batch()
        for dtype in (torch.float64, torch.int64):
            wrong = Batch(batch.dense_features.to(dtype), batch.sparse_features, batch.labels, batch.extras)
            with pytest.raises(TypeError, match=rf"^Concatenating: dense_features have dtype {dtype}; expected "
                                                r"torch.float32 \(B, Dd\), as ParquetBatchReader gives them"):
                CTRTask(Concatenating(_ebc()))(wrong)
        traced = torchrec.fx.symbolic_trace(Concatenating(_ebc()), concrete_args={"extra_fields": None})  # a leaf
        torch.testing.assert_close(traced(batch.dense_features, batch.sparse_features).logits,
                                   Concatenating(_ebc())(batch.dense_features, batch.sparse_features).logits)

    def test_parts_of_a_batch_with_other_row_counts_are_named(self) -> None:
        """Dense features, the KJT and the injected vectors of another batch size failed in torch.cat with
        "Sizes of tensors must match except in dimension 1", naming no part; a KJT of variable stride is not
        compared (VBE)."""
        import torchrec.fx

        batch = _batch()
        with pytest.raises(ValueError, match=r"^Concatenating: the batch's parts have different row counts: "
                                             r"dense_features 5, sparse_features \(the KeyedJaggedTensor's "
                                             r"stride\) 6;"):
            Concatenating(_ebc())(batch.dense_features[:5], batch.sparse_features)
        traced = torchrec.fx.symbolic_trace(Concatenating(_ebc()), concrete_args={"extra_fields": None})  # a leaf
        with pytest.raises(ValueError, match=r"^Concatenating: the batch's parts have different row counts"):
            traced(batch.dense_features[1:], batch.sparse_features)
        with pytest.raises(ValueError, match=r"dense_features 6, sparse_features \(the KeyedJaggedTensor's stride\) "
                                             r"6, extra_fields \(the injected LLM vectors\) 3;"):
            Concatenating(_ebc(), injected_width=4)(batch.dense_features, batch.sparse_features, torch.randn(3, 1, 4))
        logits = Concatenating(_ebc(), injected_width=4)(batch.dense_features, batch.sparse_features,
                                                         torch.randn(6, 1, 4)).logits
        assert logits.shape == (6,)

    def test_a_term_in_the_wrong_dict_is_named_not_broadcast(self) -> None:
        """FRE's scalar as a logit term would shift every logit; a per-row loss would make the loss (B,)."""
        from recsys_llm.modules.field_interaction import FieldInteractionEnhancement
        from recsys_llm.modules.teacher_student import TeacherStudentConfig, TeacherStudentTask

        class PerRowLoss(nn.Module):
            def forward(self, output: CTROutput, batch: Batch) -> torch.Tensor:
                return output.logits.pow(2)  # (B,): not reduced

        fre = FieldRepresentationEnhancement(torch.randn(2, 6), ["item_id", "city"], 4)
        fie = FieldInteractionEnhancement(torch.randn(2, 6), ["item_id", "city"])
        batch = _batch()
        with pytest.raises(ValueError, match=r"^logit term 'fre' returned shape \(\); a logit term returns \(B,\), one "
                                             r"value per row, and a loss term a scalar: is it in the wrong dict\?"):
            CTRTask(Concatenating(_ebc()), logit_terms={"fre": fre}, loss_terms={"fie": fie})(batch)
        with pytest.raises(ValueError, match=r"^loss term 'sq' returned shape \(6,\)"):
            CTRTask(Concatenating(_ebc()), loss_terms={"sq": PerRowLoss()})(batch)
        student = CTRTask(Concatenating(_ebc()), loss_terms={"sq": PerRowLoss()})
        pair = TeacherStudentTask(CTRTask(Concatenating(_ebc())), student, TeacherStudentConfig(beta=0))
        with pytest.raises(ValueError, match=r"^loss term 'sq' returned shape \(6,\)"):
            pair(batch)
        loss, _ = CTRTask(Concatenating(_ebc()), logit_terms={"fie": fie}, loss_terms={"fre": fre})(batch)
        assert loss.dim() == 0

    def test_a_logit_term_of_another_length_or_no_tensor_is_named(self) -> None:
        """A (1,) term (a batch mean kept with keepdim) was added to every row silently, one of another length
        failed in torch's broadcast without the term's name, and a Python number in ``value.dim()``."""

        class BatchMean(nn.Module):
            def forward(self, output: CTROutput) -> torch.Tensor:
                return output.logits.mean(0, keepdim=True)  # (1,)

        class AllButOne(nn.Module):
            def forward(self, output: CTROutput) -> torch.Tensor:
                return output.logits[:-1]  # (B - 1,)

        class Number(nn.Module):
            def forward(self, output: CTROutput, batch: Batch) -> float:
                return 0.5

        class Bias(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.bias = nn.Parameter(torch.zeros(1))

            def forward(self, output: CTROutput) -> torch.Tensor:
                return self.bias.expand_as(output.logits)  # (B,)

        batch = _batch()
        with pytest.raises(ValueError, match=r"^logit term 'mean' returned shape \(1,\) for logits of shape \(6,\)"):
            CTRTask(Concatenating(_ebc()), logit_terms={"mean": BatchMean()})(batch)
        with pytest.raises(ValueError, match=r"^logit term 'cut' returned shape \(5,\) for logits of shape \(6,\)"):
            CTRTask(Concatenating(_ebc()), logit_terms={"cut": AllButOne()})(batch)
        with pytest.raises(TypeError, match=r"^loss term 'const' returned a float, not a tensor"):
            CTRTask(Concatenating(_ebc()), loss_terms={"const": Number()})(batch)
        _, (_, logits, _) = CTRTask(Concatenating(_ebc()), logit_terms={"bias": Bias()})(batch)
        assert logits.shape == (6,)

    def test_a_term_name_that_a_module_dict_refuses_is_named(self) -> None:
        """torch's ModuleDict refused "half" (an nn.Module method) or "my.l2" with a bare KeyError naming neither
        the task nor which dict."""
        fre = FieldRepresentationEnhancement(torch.randn(2, 6), ["item_id", "city"], 4)
        with pytest.raises(ValueError, match=r"^CTRTask: loss_terms name 'half' cannot be a module name \(an "
                                             r"attribute of nn.ModuleDict\)"):
            CTRTask(Concatenating(_ebc()), loss_terms={"half": fre})
        with pytest.raises(ValueError, match=r"^CTRTask: logit_terms name 'my.l2' cannot be a module name "
                                             r"\(it holds a '.'\)"):
            CTRTask(Concatenating(_ebc()), logit_terms={"my.l2": fre})
        with pytest.raises(TypeError, match=r"^CTRTask: loss_terms names must be strings, got 3"):
            CTRTask(Concatenating(_ebc()), loss_terms={3: fre})
        with pytest.raises(ValueError, match=r"^CTRTask: loss_terms name '' cannot be a module name \(it is empty\)"):
            CTRTask(Concatenating(_ebc()), loss_terms={"": fre})
        for name in ("training", "_modules"):  # set by nn.Module.__init__: no attributes of the class itself
            with pytest.raises(ValueError, match=rf"^CTRTask: logit_terms name '{name}' cannot be a module name \(an "
                                                 r"attribute of nn.ModuleDict\)"):
                CTRTask(Concatenating(_ebc()), logit_terms={name: fre})

    def test_a_representation_other_than_declared(self) -> None:
        from recsys_llm.modules.distillation import RepresentationDistillation

        kd = RepresentationDistillation(student_dim=64, teacher_dim=32)
        with pytest.raises(ValueError, match=r"the student's representation is \(6, 32\), but its model declares "
                                             r"representation_dim 64"):
            kd(torch.randn(6, 32), torch.randn(6, 32))

    def test_injected_fields_into_tables_of_several_widths(self) -> None:
        class DefaultCheck(Concatenating):
            check_extra_fields = CTRBackbone.check_extra_fields

        with pytest.raises(ValueError, match=r"tables differ in width .* override check_extra_fields to accept it"):
            CTRTask(DefaultCheck(_ebc(), injected_width=4), field_injection=VectorFieldInjection(5, 4))

    def test_a_feature_read_by_several_tables_is_named(self) -> None:
        """torchrec keys such a feature's pooled embeddings 'feature@table', never by the feature's own name."""
        ebc = EmbeddingBagCollection(tables=[
            EmbeddingBagConfig(name="t_user", embedding_dim=8, num_embeddings=10, feature_names=["user_id"]),
            EmbeddingBagConfig(name="t_user_wide", embedding_dim=8, num_embeddings=10, feature_names=["user_id", "city"]),
        ])
        with pytest.raises(ValueError, match=r"Concatenating: feature 'user_id' is read by several tables of its "
                                             r"EmbeddingBagCollection \(\['t_user', 't_user_wide'\]\); .*"
                                             r"'user_id@t_user', 'user_id@t_user_wide'.* one table per feature"):
            Concatenating(ebc)
        shared = EmbeddingBagCollection(tables=[  # one table read by several features is fine
            EmbeddingBagConfig(name="t_ids", embedding_dim=8, num_embeddings=10, feature_names=["user_id", "city"])])
        assert Concatenating(shared).feature_names == ["user_id", "city"]

    def test_a_weighted_ebc_of_fp16_and_fp32_tables_is_refused_naming_their_data_types(self) -> None:
        """It trained sharded (FBGEMM takes float32 weights for any table), then failed unsharded, in evaluation,
        export and serving, inside torch's embedding_bag ("HalfTensor does not equal FloatTensor")."""
        tables = [EmbeddingBagConfig(name=f"t_{name}", embedding_dim=dim, num_embeddings=10, feature_names=[name],
                                     data_type=DataType.FP16 if name == "user_id" else DataType.FP32)
                  for name, dim in WIDTHS.items()]
        with pytest.raises(ValueError, match=r"Concatenating: its EmbeddingBagCollection is weighted "
                                             r"\(is_weighted=True\), and its tables hold several data_types "
                                             r"\{'t_user_id': 'FP16', .*'FP32'.*\}; .* one data_type"):
            Concatenating(EmbeddingBagCollection(tables=tables, is_weighted=True))
        assert Concatenating(EmbeddingBagCollection(tables=tables)).feature_names == list(WIDTHS)  # unweighted: fine

    def test_weights_for_an_unweighted_ebc_are_named(self) -> None:
        """A sharded EBC would pool them, an unsharded or served one ignores them: refused, not half-used."""
        batch = _batch()
        kjt = batch.sparse_features
        weighted = KeyedJaggedTensor.from_lengths_sync(keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths(),
                                                       weights=torch.rand(kjt.values().numel()))
        with pytest.raises(ValueError, match=r"Concatenating: the sparse features carry per-id weights, but its "
                                             r"EmbeddingBagCollection is not weighted: .* is_weighted=True"):
            Concatenating(_ebc())(batch.dense_features, weighted)
        tables = [EmbeddingBagConfig(name=f"t_{name}", embedding_dim=dim, num_embeddings=10, feature_names=[name])
                  for name, dim in WIDTHS.items()]
        model = Concatenating(EmbeddingBagCollection(tables=tables, is_weighted=True))
        assert model(batch.dense_features, weighted).logits.shape == (6,)
        # and a weighted EBC given no weights: named, not torchrec's bare AssertionError
        with pytest.raises(ValueError, match=r"Concatenating: its EmbeddingBagCollection is weighted \(is_weighted=True\), "
                                             r"but the sparse features carry no per-id weights"):
            model(batch.dense_features, kjt)
