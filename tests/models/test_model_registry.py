"""``build_backbone`` and the backbone contract every registered model keeps (shapes, fx, gradients)."""

import pytest
import torch
from torchrec.distributed.train_pipeline.tracing import Tracer
from torchrec.fx import symbolic_trace

from recsys_llm.data.schema import DatasetSchema
from recsys_llm.models.base import CTRBackbone, CTROutput
from recsys_llm.models.registry import MODEL_NAMES, SMOKE_CONFIGS, ModelConfig, build_backbone
from backbone_inputs import tiny_schema


def _build(schema, name: str, extra: int) -> CTRBackbone:
    torch.manual_seed(0)
    return build_backbone(SMOKE_CONFIGS[name], schema, num_extra_fields=extra, device=torch.device("cpu"))


def _extra(num_extra: int):
    return torch.randn(4, num_extra, 8, generator=torch.Generator().manual_seed(3)) if num_extra else None


@pytest.mark.parametrize("num_extra", [0, 2])
@pytest.mark.parametrize("name", MODEL_NAMES)
class TestBackboneContract:
    def test_output_shapes(self, schema, kjt, dense, name: str, num_extra: int) -> None:
        model = _build(schema, name, num_extra)
        out = model(dense, kjt, _extra(num_extra))
        assert isinstance(out, CTROutput)
        assert out.logits.shape == (4,)
        assert out.representation.shape == (4, model.representation_dim)
        assert out.embeddings.keys() == ["user_id", "item_id", "genres"]
        assert model.num_fields == 3 + num_extra
        assert torch.isfinite(out.logits).all()

    def test_fx_trace_matches_eager(self, schema, kjt, dense, name: str, num_extra: int) -> None:
        model = _build(schema, name, num_extra).eval()
        traced = symbolic_trace(model)
        extra = _extra(num_extra)
        eager, graph = model(dense, kjt, extra), traced(dense, kjt, extra)
        torch.testing.assert_close(graph.logits, eager.logits)
        torch.testing.assert_close(graph.representation, eager.representation)

    def test_pipeline_tracer_sees_unmodified_kjt(self, schema, name: str, num_extra: int) -> None:
        # TrainPipelineSparseDist traces with this tracer, the EBC (sharded there) as a leaf;
        # it pipelines only if the EBC reads the input KJT directly.
        model = _build(schema, name, num_extra)
        graph = Tracer(leaf_modules=["embedding_bag_collection"]).trace(model)
        calls = [n for n in graph.nodes if n.op == "call_module" and n.target == "embedding_bag_collection"]
        assert len(calls) == 1
        assert calls[0].args[0].op == "placeholder" and calls[0].args[0].target == "sparse_features"

    def test_gradients_reach_every_parameter_and_extra(self, schema, kjt, dense, name: str, num_extra: int) -> None:
        model = _build(schema, name, num_extra)
        extra = _extra(num_extra)
        if extra is not None:
            extra.requires_grad_(True)
        out = model(dense, kjt, extra)
        (out.logits.sum() + out.representation.pow(2).sum()).backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert not missing, f"no gradient for {missing}"
        for table in model.embedding_bag_collection.embedding_bags.values():
            assert table.weight.grad.abs().sum() > 0
        if extra is not None:
            assert extra.grad.abs().sum() > 0

    def test_extra_fields_must_match_declaration(self, schema, kjt, dense, name: str, num_extra: int) -> None:
        model = _build(schema, name, num_extra)
        with pytest.raises(ValueError, match="num_extra_fields"):
            model(dense, kjt, None if num_extra else torch.randn(4, 1, 8))


class TestBuildBackbone:
    def test_tables_on_meta_by_default(self, schema) -> None:
        for name in MODEL_NAMES:
            model = build_backbone(SMOKE_CONFIGS[name], schema)
            assert all(p.is_meta for p in model.embedding_bag_collection.parameters())
            dense_params = [p for n, p in model.named_parameters() if not n.startswith("embedding_bag_collection")]
            assert dense_params and not any(p.is_meta for p in dense_params)

    def test_table_prefix(self, schema) -> None:
        model = build_backbone(SMOKE_CONFIGS["dlrm"], schema, table_prefix="teacher_")
        assert [c.name for c in model.embedding_bag_collection.embedding_bag_configs()][0] == "teacher_user_id"

    def test_smoke_config_per_model(self) -> None:
        assert sorted(SMOKE_CONFIGS) == sorted(MODEL_NAMES)
        assert all(SMOKE_CONFIGS[name].name == name for name in MODEL_NAMES)


class TestModelConfig:
    def test_round_trip(self) -> None:
        config = ModelConfig.from_dict({"name": "dcnv2", "mlp_layer_sizes": [32, 16], "low_rank": 4})
        assert config.mlp_layer_sizes == (32, 16)
        assert ModelConfig.from_dict(config.to_dict()) == config

    def test_unknown_model(self) -> None:
        with pytest.raises(ValueError, match="unknown model 'wukong'"):
            ModelConfig(name="wukong")

    def test_unknown_model_names_the_route_for_a_backbone_of_ones_own(self) -> None:
        """A config cannot name a backbone of one's own (no registry takes one): the error says so and where to go."""
        with pytest.raises(ValueError, match=r"unknown model 'mymodels:WideDeep'.*a backbone of your own .* has no "
                                             r"name to register there; train it through the Python API.*"
                                             r"examples/plug_into_own_model.py"):
            ModelConfig(name="mymodels:WideDeep")

    def test_unknown_key_and_missing_name(self) -> None:
        with pytest.raises(ValueError, match=r"cfg.yaml: unknown model config keys \['layers'\]"):
            ModelConfig.from_dict({"name": "fm", "layers": 3}, source="cfg.yaml")
        with pytest.raises(ValueError, match="needs a 'name'"):
            ModelConfig.from_dict({"embedding_dim": 8})

    @pytest.mark.parametrize(
        "settings, message",
        [
            ({"embedding_init_scale": float("nan")}, r"model.embedding_init_scale must be a finite number > 0 or None"),
            ({"embedding_init_scale": float("inf")}, r"model.embedding_init_scale must be a finite number > 0 or None"),
            ({"name": "dcnv2", "dcn_structure": "serial"}, r"model.dcn_structure: expected one of \['stacked', "),
            ({"name": "dcnv2", "cross_layers": 0}, r"model.cross_layers must be an integer >= 1, got 0"),
            ({"name": "finalmlp", "finalmlp_heads": 3, "mlp_layer_sizes": [16], "mlp2_layer_sizes": [8]},
             r"model.finalmlp_heads = 3 must divide .*model.mlp_layer_sizes\[-1\] = 16, model.mlp2_layer_sizes\[-1\] = 8"),
            # read as its characters ('u', 's', 'e', 'r', ...), and as "'int' object is not iterable"
            ({"name": "finalmlp", "finalmlp_context1": "user_id"},
             r"model.finalmlp_context1: expected a list, got the string 'user_id' \(write \['user_id'\]\)"),
            ({"mlp_layer_sizes": 64}, r"model.mlp_layer_sizes: expected a list, got 64"),
            # a string is truthy: "false" built the dense fields
            ({"name": "fm", "dense_as_fields": "false"}, r"model.dense_as_fields: expected true or false, got 'false'"),
            # refused when the table is built, i.e. only after the data was read or generated
            ({"embedding_dim": 6}, r"model.embedding_dim must be a positive multiple of 4 .*got 6"),
            ({"embedding_dim": 0}, r"model.embedding_dim must be a positive multiple of 4 .*got 0"),
            ({"embedding_dim": -4}, r"model.embedding_dim must be a positive multiple of 4 .*got -4"),
        ],
    )
    def test_bad_settings_name_their_key(self, settings, message: str) -> None:
        with pytest.raises(ValueError, match=message):
            ModelConfig.from_dict({"name": "deepfm", **settings})


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_schema_without_dense_features(name: str, kjt) -> None:
    fields = [f for f in tiny_schema().fields if f.is_categorical]
    model = build_backbone(SMOKE_CONFIGS[name], DatasetSchema("sparse_only", fields), device=torch.device("cpu"))
    out = model(torch.empty(4, 0), kjt)
    assert out.logits.shape == (4,) and torch.isfinite(out.logits).all()


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_a_backbone_left_on_meta_is_refused_naming_the_device_to_build_on(schema, kjt, dense, name: str) -> None:
    """build_backbone's default device is meta (for DMP); run unsharded, torch failed with "Tensor on device cpu is
    not on the expected device meta!" somewhere in the interaction."""
    model = build_backbone(SMOKE_CONFIGS[name], schema)
    with pytest.raises(RuntimeError, match=r"tables are on the meta device .*device=torch.device\('cpu'\)"):
        model(dense, kjt)


def test_build_backbone_takes_its_options_by_keyword():
    """build_backbone(config, schema, device) put the device in num_extra_fields; the options after it are
    keyword-only, and a num_extra_fields that is no count is named."""
    import torch

    from recsys_llm.data.synthetic import SyntheticConfig, synthetic_schema
    from recsys_llm.models import CTRTask, SMOKE_CONFIGS, build_backbone

    schema = synthetic_schema(SyntheticConfig())
    for bad in (torch.device("cpu"), "cpu", True):
        with pytest.raises(ValueError, match="build_backbone: num_extra_fields must be an integer >= 0"):
            build_backbone(SMOKE_CONFIGS["fm"], schema, bad)
    with pytest.raises(TypeError, match="positional"):
        build_backbone(SMOKE_CONFIGS["fm"], schema, 0, torch.device("cpu"))
    backbone = build_backbone(SMOKE_CONFIGS["fm"], schema, 0, device=torch.device("cpu"))
    # CTRTask: CTRTask(backbone, {"fie": fie}) took the logit terms as the field injection, silently
    with pytest.raises(TypeError, match="positional"):
        CTRTask(backbone, {"fie": torch.nn.Identity()})
    with pytest.raises(TypeError, match="CTRTask: field_injection must be a module"):
        CTRTask(backbone, field_injection={"fie": torch.nn.Identity()})
    with pytest.raises(TypeError, match="CTRTask: logit_terms must be a mapping"):
        CTRTask(backbone, logit_terms=[torch.nn.Identity()])


def test_ctr_task_refuses_an_injection_key_that_is_no_string():
    """CTRTask(backbone, injection_key=["llm_vector"]) was kept and failed at the first batch's extras lookup."""
    from recsys_llm.models.task import CTRTask

    backbone = build_backbone(SMOKE_CONFIGS["fm"], tiny_schema(), 0, device=torch.device("cpu"))
    with pytest.raises(TypeError, match=r"CTRTask: injection_key must be the extras key \(a string\)"):
        CTRTask(backbone, injection_key=["llm_vector"])
