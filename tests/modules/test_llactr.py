import pytest
import torch
from torchrec.models.dlrm import DLRM

from recsys_llm.data.batch import Batch
from recsys_llm.data.schema import DatasetSchema, FieldSpec
from recsys_llm.modules.field_interaction import FieldInteractionEnhancement
from recsys_llm.modules.field_semantics import FieldRepresentationEnhancement
from recsys_llm.modules.llactr import LLaCTRConfig, build_llactr_terms
from recsys_llm.semantics.store import VectorProvenance, VectorProvenanceError, save_vectors
from recsys_llm.train.task import CTRTask
from tests.modules.llactr_helpers import LinearBackbone, make_ebc, make_kjt


def _schema(name: str = "toy", genre_text: str = "genre of the item") -> DatasetSchema:
    return DatasetSchema(name=name, fields=[
        FieldSpec("user_id", cardinality=20, description="user id"),
        FieldSpec("item_id", cardinality=20, description="item id"),
        FieldSpec("genre", cardinality=20, description=genre_text),
        FieldSpec("price", "dense", description="price"),
    ])


def _vectors(tmp_path, schema: DatasetSchema) -> str:
    path = str(tmp_path / "fields.safetensors")
    provenance = VectorProvenance(model_id="tiny", model_hash="h", pooling="mean", template="{name}: {description}")
    torch.manual_seed(0)
    save_vectors(path, torch.randn(4, 12), ["user_id", "genre", "item_id", "price"], provenance.for_schema(schema))
    return path


class TestBuildLLaCTRTerms:
    def test_terms_train_inside_ctr_task(self, tmp_path) -> None:
        schema = _schema()
        config = LLaCTRConfig.from_dict({"vectors_path": _vectors(tmp_path, schema), "lambda_fre": 0.2, "lambda_fie": 0.05})
        backbone = LinearBackbone(make_ebc(dim=8), num_dense_features=1)
        logit_terms, loss_terms, provenance = build_llactr_terms(config, schema, backbone)
        assert isinstance(logit_terms["fie"], FieldInteractionEnhancement)
        assert isinstance(loss_terms["fre"], FieldRepresentationEnhancement)
        assert loss_terms["fre"].feature_names == ["user_id", "genre", "item_id"]  # vector-file order
        assert provenance["fields_skipped"] == ["price"] and provenance["schema_fingerprint"] == schema.fingerprint()
        task = CTRTask(backbone, logit_terms=logit_terms, loss_terms=loss_terms)
        batch = Batch(torch.randn(4, 1), make_kjt(), torch.tensor([0.0, 1.0, 1.0, 0.0]))
        plain = CTRTask(backbone)
        loss, (_, logits, _) = task(batch)
        plain_loss, (_, plain_logits, _) = plain(batch)
        fie_logit = logit_terms["fie"](backbone(batch.dense_features, batch.sparse_features))
        torch.testing.assert_close(logits, plain_logits + fie_logit)
        assert loss > plain_loss  # FRE adds a positive KL term
        loss.backward()
        assert loss_terms["fre"].projection.weight.grad is not None
        assert logit_terms["fie"].pair_weight.weight.grad is not None

    def test_ablation_switches_and_dlrm(self, tmp_path) -> None:
        schema = _schema()
        path = _vectors(tmp_path, schema)
        dlrm = DLRM(make_ebc(dim=8), dense_in_features=1, dense_arch_layer_sizes=[8], over_arch_layer_sizes=[4, 1])
        logit_terms, loss_terms, _ = build_llactr_terms(LLaCTRConfig(path, use_fie=False), schema, dlrm)
        assert not logit_terms and set(loss_terms) == {"fre"}
        logit_terms, loss_terms, _ = build_llactr_terms(LLaCTRConfig(path, use_fre=False), schema, dlrm)
        assert set(logit_terms) == {"fie"} and not loss_terms
        kt = dlrm.sparse_arch.embedding_bag_collection(make_kjt())
        assert logit_terms["fie"].logit(kt).shape == (4,)

    def test_vectors_of_another_schema_are_rejected(self, tmp_path) -> None:
        path = _vectors(tmp_path, _schema())
        changed = _schema(genre_text="main genre")
        with pytest.raises(VectorProvenanceError, match="were made for schema 'toy'.*current schema 'toy' has fingerprint"):
            build_llactr_terms(LLaCTRConfig(path), changed, LinearBackbone(make_ebc(), 1))

    def test_config_errors(self) -> None:
        with pytest.raises(ValueError, match="unknown keys \\['lambda'\\]"):
            LLaCTRConfig.from_dict({"vectors_path": "x", "lambda": 0.1})
        with pytest.raises(ValueError, match="'vectors_path'"):
            LLaCTRConfig.from_dict({})
