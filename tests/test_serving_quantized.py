"""Serving with INT8 / INT4 tables (``export_task(..., table_dtype="int8" | "int4")``, ``recsys-llm export
--table-dtype int8 | int4``)."""

import copy
import json
import os
import re
from typing import Dict

import pytest
import torch
from safetensors.torch import load_file, save_file
from torchrec.modules.embedding_configs import DataType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_llm.data.schema import DatasetSchema, FieldSpec
from recsys_llm.models.registry import SMOKE_CONFIGS
from recsys_llm.modules.elec import build_student
from recsys_llm.serving import ServedModel, export_task
from recsys_llm.serving.quantized_tables import quantized_ebc, quantized_state
from tests.small_artifact import write_config_as_exported
from tests.test_serving import CPU, SCHEMA, _trained_pair, make_batch
from tests.test_serving_weighted import _request, _weighted_task

# served quantized logits vs served float32 logits of the small trained models here (logits up to 1.5). A row's
# values are off by at most half its quantization step, (max - min) / L / 2 with L = 255 (INT8) or 15 (INT4), plus
# float16 scale / bias rounding: INT4's step is 17x INT8's. Measured on these tests' requests (1 to 33 rows): INT8
# at most 7.5e-3, INT4 at most 0.034 (DeepFM; 0.022 the weighted model; 0.068 over 256 rows of DeepFM)
LOGIT_TOLERANCE = {"int8": 2e-2, "int4": 0.1}
QUANTIZED = ("int8", "int4")


def _unpacked(rows: torch.Tensor, table_dtype: str) -> torch.Tensor:
    """An artifact's stored rows as their values ``q`` (rows, D) float32: INT8 rows as they are, INT4 bytes
    (rows, D / 2) as two values each, value 2j in the low 4 bits of byte j, value 2j + 1 in the high 4 bits."""
    if table_dtype == "int8":
        return rows.float()
    return torch.stack((rows & 15, rows >> 4), dim=-1).flatten(1).float()  # (rows, D)


def _dequantized(state: Dict[str, torch.Tensor], prefix: str, table_dtype: str = "int8") -> Dict[str, torch.Tensor]:
    """The float32 tables an artifact's quantized rows stand for: ``q * scale + bias`` per row, keyed as the float
    EBC's."""
    tables = {}
    for key in state:
        if key.startswith(prefix) and key.endswith(".weight"):
            scale, bias = state[f"{key}_qscale"].float(), state[f"{key}_qbias"].float()  # (rows, 1) each
            tables[key[len(prefix):]] = _unpacked(state[key], table_dtype) * scale + bias  # (rows, D)
    return tables


def _student(model_name: str):
    task = _trained_pair(model_name)
    student = build_student(SCHEMA, SMOKE_CONFIGS[model_name], device=CPU)
    student.load_state_dict(task.student.state_dict())
    return student.eval()


@pytest.mark.parametrize("table_dtype", QUANTIZED)
@pytest.mark.parametrize("model_name", ["deepfm", "dcnv2"])
def test_quantized_tables_serve_the_float_model_of_their_dequantized_rows(tmp_path, model_name, table_dtype):
    """The INT8 / INT4 artifact's logits are the trained model's on ``q * scale + bias`` tables (1e-5: an INT4
    byte unpacked in another order would serve other rows), and within ``LOGIT_TOLERANCE`` of the float32
    artifact's."""
    student = _student(model_name)
    example = make_batch(4, 100)
    export_task(student, str(tmp_path / "fp32"), example.dense_features, example.sparse_features, schema=SCHEMA)
    export_task(student, str(tmp_path / table_dtype), example.dense_features, example.sparse_features, schema=SCHEMA,
                table_dtype=table_dtype)
    fp32 = ServedModel.load(str(tmp_path / "fp32"), trust_program=True)
    quantized = ServedModel.load(str(tmp_path / table_dtype), trust_program=True)
    reference = copy.deepcopy(student)
    state = load_file(str(tmp_path / table_dtype / "model.safetensors"))
    reference.model.embedding_bag_collection.load_state_dict(
        _dequantized(state, "model.embedding_bag_collection.", table_dtype))
    for size, seed in ((1, 7), (33, 8)):
        batch = make_batch(size, seed)
        with torch.no_grad():
            expected = reference.predict(batch).logits
        served = quantized.logits(batch.dense_features, batch.sparse_features)
        torch.testing.assert_close(served, expected, rtol=0, atol=1e-5)
        float32 = fp32.logits(batch.dense_features, batch.sparse_features)
        assert 0 < float((served - float32).abs().max()) <= LOGIT_TOLERANCE[table_dtype]


@pytest.mark.parametrize("table_dtype", QUANTIZED)
def test_the_stored_rows_are_the_float_rows_within_half_a_step(table_dtype):
    """Each value of an artifact's rows, unpacked (INT4: low 4 bits first) and dequantized, is within half its row's
    quantization step of the float table (float16 rounding of scale and bias aside): bytes packed or unpacked in
    another order are off by up to the row's whole range."""
    torch.manual_seed(0)
    student = build_student(SCHEMA, SMOKE_CONFIGS["deepfm"], device=CPU).eval()
    ebc = student.model.embedding_bag_collection
    state = quantized_state(quantized_ebc(ebc, table_dtype), "")
    dequantized = _dequantized(state, "", table_dtype)
    for name, bag in ebc.embedding_bags.items():
        key = f"embedding_bags.{name}.weight"
        scale = state[f"{key}_qscale"].float()  # (rows, 1)
        assert state[key].shape == (bag.weight.size(0), bag.weight.size(1) // (2 if table_dtype == "int4" else 1))
        assert bool(((dequantized[key] - bag.weight).abs() <= 0.52 * scale).all()), name


@pytest.mark.parametrize("model_name,table_dtype", [("deepfm", "int8"), ("dlrm", "int8"), ("deepfm", "int4")])
def test_a_sequence_table_before_sparse_ones_keeps_its_columns(tmp_path, model_name, table_dtype):
    """torchrec's quant EBC groups its tables by pooling (SUM tables, then MEAN ones): a sequence field's columns
    went last, and the program read another field's embedding in their place (logits off by 0.26 on the synthetic
    data, whose item_tags sits between sparse fields)."""
    schema = DatasetSchema("m", [FieldSpec("user_id", "sparse", 10), FieldSpec("genres", "sequence", 5, max_length=3),
                                 FieldSpec("item_id", "sparse", 12), FieldSpec("age", "dense")])
    torch.manual_seed(0)
    student = build_student(schema, SMOKE_CONFIGS[model_name], device=CPU).eval()
    example = make_batch(4, 100)
    export_task(student, str(tmp_path / "out"), example.dense_features, example.sparse_features, schema=schema,
                table_dtype=table_dtype)
    served = ServedModel.load(str(tmp_path / "out"), trust_program=True)
    reference = copy.deepcopy(student)
    state = load_file(str(tmp_path / "out" / "model.safetensors"))
    reference.model.embedding_bag_collection.load_state_dict(
        _dequantized(state, "model.embedding_bag_collection.", table_dtype))
    batch = make_batch(17, 5)
    with torch.no_grad():
        expected = reference.predict(batch).logits
    torch.testing.assert_close(served.logits(batch.dense_features, batch.sparse_features), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("table_dtype, row_bytes", [("int8", 8), ("int4", 8 // 2)])
def test_the_artifact_records_quantized_tables_and_holds_their_bytes(tmp_path, table_dtype, row_bytes):
    """A quantized row is D bytes (INT8) or D / 2 bytes of two packed values (INT4; torchrec's ``UInt4Tensor`` holds
    them as (rows, D)), stored as those bytes, plus the 4 bytes of the row's float16 scale and bias: a third / a
    fifth of FP32's 4 D bytes at D = 8; tables.json records the served and the trained dtype."""
    student = _student("deepfm")
    ebc = student.model.embedding_bag_collection
    ebc.embedding_bags["student_user_id"].half()  # a table trained in FP16 (model.embedding_dtype=fp16)
    ebc.embedding_bag_configs()[0].data_type = DataType.FP16
    example = make_batch(4, 100)
    trained = export_task(student, str(tmp_path / "trained"), example.dense_features, example.sparse_features)
    config = export_task(student, str(tmp_path / table_dtype), example.dense_features, example.sparse_features,
                         table_dtype=table_dtype)
    assert trained["table_dtype"] == "trained" and config["table_dtype"] == table_dtype
    with open(tmp_path / table_dtype / "tables.json") as handle:
        tables = json.load(handle)
    assert [t["data_type"] for t in tables] == [table_dtype.upper()] * 3
    assert [t["trained_data_type"] for t in tables] == ["FP16", "FP32", "FP32"]
    assert [t["embedding_dim"] for t in tables] == [8] * 3  # the values' D, not the bytes'
    state = load_file(str(tmp_path / table_dtype / "model.safetensors"))
    rows = {key: value for key, value in state.items() if ".embedding_bags." in key}
    assert {str(v.dtype) for k, v in rows.items() if k.endswith(".weight")} == {"torch.uint8"}
    assert {str(v.dtype) for k, v in rows.items() if not k.endswith(".weight")} == {"torch.float16"}
    assert rows["model.embedding_bag_collection.embedding_bags.student_item_id.weight"].shape == (12, row_bytes)
    trained_state = load_file(str(tmp_path / "trained" / "model.safetensors"))
    float_bytes = sum(v.numel() * v.element_size() for k, v in trained_state.items() if ".student_item_id." in k)
    quantized_bytes = sum(v.numel() * v.element_size() for k, v in rows.items() if ".student_item_id." in k)
    assert quantized_bytes / float_bytes == (row_bytes + 4) / (8 * 4)  # the values + float16 scale and bias, for 4 D
    assert f"--table-dtype {table_dtype}" in (tmp_path / table_dtype / "INFERENCE.md").read_text()
    served = ServedModel.load(str(tmp_path / table_dtype), trust_program=True)
    assert served.logits(example.dense_features, example.sparse_features).shape == (4,)


def test_int4_rows_stored_unpacked_are_damage_named_in_their_stored_shape(tmp_path):
    """Rows stored one value a byte (not the packed bytes export writes) are refused as damage, named in their stored
    shape (torch's own text gave UInt4Tensor's view of them: "torch.Size([12, 16])")."""
    student = _student("deepfm")
    example = make_batch(4, 100)
    export_task(student, str(tmp_path / "int4"), example.dense_features, example.sparse_features, table_dtype="int4")
    state = load_file(str(tmp_path / "int4" / "model.safetensors"))
    key = "model.embedding_bag_collection.embedding_bags.student_item_id.weight"
    state[key] = _unpacked(state[key], "int4").to(torch.uint8)  # (12, 8)
    config = json.loads((tmp_path / "int4" / "config.json").read_text())
    config.pop("sha256")
    write_config_as_exported(str(tmp_path / "int4" / "config.json"), config)
    save_file(state, str(tmp_path / "int4" / "model.safetensors"), metadata={"export_id": config["export_id"]})
    with pytest.raises(ValueError, match=r"model.safetensors: its tables do not match tables.json .*"
                                         r"student_item_id.weight is \(12, 8\), expected \(12, 4\)"):
        ServedModel.load(str(tmp_path / "int4"), trust_program=True)


@pytest.mark.parametrize("table_dtype", QUANTIZED)
def test_a_weighted_model_serves_quantized_tables_with_the_request_weights(tmp_path, table_dtype):
    task = _weighted_task()
    example = _request(4, 0)
    export_task(task, str(tmp_path / "out"), example.dense_features, example.sparse_features, table_dtype=table_dtype)
    served = ServedModel.load(str(tmp_path / "out"), trust_program=True)
    state = load_file(str(tmp_path / "out" / "model.safetensors"))
    reference = copy.deepcopy(task)
    reference.model.embedding_bag_collection.load_state_dict(
        _dequantized(state, "model.embedding_bag_collection.", table_dtype))
    request = _request(16, 1)
    with torch.no_grad():
        expected = reference.predict(request).logits
        float32 = task.predict(request).logits
    sparse = request.sparse_features
    as_float64 = type(sparse).from_lengths_sync(keys=sparse.keys(), values=sparse.values(), lengths=sparse.lengths(),
                                                weights=sparse.weights().double())
    got = served.logits(request.dense_features, as_float64)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert float((got - float32).abs().max()) <= LOGIT_TOLERANCE[table_dtype]
    unweighted = _request(2, 3, weighted=False)
    with pytest.raises(ValueError, match="no weights"):
        served.logits(unweighted.dense_features, unweighted.sparse_features)


@pytest.mark.parametrize("table_dtype", QUANTIZED)
def test_a_gain_network_serves_quantized_entity_tables(tmp_path, table_dtype):
    """Every table of the artifact is quantized, the entity vectors' too."""
    task, example, request = _gain_network()
    export_task(task, str(tmp_path / "gain"), example.dense_features, example.sparse_features,
                table_dtype=table_dtype)
    with open(tmp_path / "gain" / "semantic_tables.json") as handle:
        assert {t["data_type"] for t in json.load(handle)} == {table_dtype.upper()}
    state = load_file(str(tmp_path / "gain" / "model.safetensors"))
    reference = copy.deepcopy(task)
    for prefix, ebc in (("model.", reference.model), ("semantic_table.", reference.semantic_table)):
        ebc.embedding_bag_collection.load_state_dict(
            _dequantized(state, f"{prefix}embedding_bag_collection.", table_dtype))
    served = ServedModel.load(str(tmp_path / "gain"), trust_program=True)
    with torch.no_grad():
        expected = reference.predict(request).logits
    torch.testing.assert_close(served.logits(request.dense_features, request.sparse_features), expected,
                               rtol=0, atol=1e-5)


def test_a_bad_table_dtype_is_named_with_its_flag(tmp_path):
    from recsys_llm.cli.export import export_run

    student = build_student(SCHEMA, SMOKE_CONFIGS["deepfm"], device=CPU).eval()
    example = make_batch(4, 100)
    for bad in ("int2", "INT8", "INT4", "fp16", None):
        with pytest.raises(ValueError, match=r"table_dtype \(--table-dtype\) is .*; expected one of \['trained', "
                                             r"'int8', 'int4'\]"):
            export_task(student, str(tmp_path / "out"), example.dense_features, example.sparse_features,
                        table_dtype=bad)
    assert not os.path.exists(tmp_path / "out")
    # the CLI refuses it before it opens the run (no config, no checkpoint needed to get there)
    with pytest.raises(ValueError, match=r"--table-dtype"):
        export_run(None, str(tmp_path / "no-run"), str(tmp_path / "out"), table_dtype="int2")
    for table_dtype in QUANTIZED:
        with pytest.raises(ValueError, match=rf"--table-dtype {table_dtype} applies to a served export; --state-only"):
            export_run(None, str(tmp_path / "no-run"), str(tmp_path / "out"), state_only=True, table_dtype=table_dtype)


def _weighted_task_of_dim(dim: int):
    """``_weighted_task``'s model with tables of width ``dim`` (recsys-llm's own configs take multiples of 4 only)."""
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

    from recsys_llm.models.task import CTRTask
    from tests.test_serving_weighted import FEATURES, _Concat

    torch.manual_seed(0)
    tables = [EmbeddingBagConfig(name=f"t_{f}", embedding_dim=dim if f == FEATURES[-1] else 8, num_embeddings=10,
                                 feature_names=[f]) for f in FEATURES]
    return CTRTask(_Concat(EmbeddingBagCollection(tables=tables, is_weighted=True))).eval()


def test_a_table_dim_the_dtype_cannot_take_is_refused_before_anything_is_written(tmp_path):
    """FBGEMM's row-wise quantizer needs a row's packed values to fill whole 2-byte words (it failed with "ncols needs
    to be multiple of 2 Bytes"): INT4 takes dims that are multiples of 4, INT8 even ones. The export names the table,
    its dim and the rule, and leaves an earlier export in the directory as it was."""
    from tests.test_serving_weighted import FEATURES

    example = _request(4, 0)
    out = tmp_path / "out"
    export_task(_weighted_task_of_dim(8), str(out), example.dense_features, example.sparse_features)
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    task = _weighted_task_of_dim(6)
    with pytest.raises(ValueError, match=rf"--table-dtype int4: table\(s\) 't_{FEATURES[-1]}' \(embedding_dim 6\) "
                                         r"cannot be INT4: .*embedding_dim must be a multiple of 4; export with "
                                         r"--table-dtype int8 or trained"):
        export_task(task, str(out), example.dense_features, example.sparse_features, table_dtype="int4")
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    export_task(task, str(tmp_path / "int8"), example.dense_features, example.sparse_features, table_dtype="int8")
    with pytest.raises(ValueError, match=r"\(embedding_dim 5\) cannot be INT8: .*a multiple of 2; export with "
                                         r"--table-dtype trained"):
        export_task(_weighted_task_of_dim(5), str(out), example.dense_features, example.sparse_features,
                    table_dtype="int8")
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before


def test_int8_tables_stay_on_cpu_and_a_damaged_table_file_is_named(tmp_path):
    student = build_student(SCHEMA, SMOKE_CONFIGS["deepfm"], device=CPU).eval()
    example = make_batch(4, 100)
    out = tmp_path / "int8"
    export_task(student, str(out), example.dense_features, example.sparse_features, table_dtype="int8")
    served = ServedModel.load(str(out), trust_program=True)
    with pytest.raises(ValueError, match=r"tables are quantized \(table_dtype 'int8'\), so it serves on CPU in "
                                         r"float32"):
        served.to("meta")
    with pytest.raises(ValueError, match="serves on CPU in float32"):
        served.half()
    assert served.logits(example.dense_features, example.sparse_features).shape == (4,)
    # scales stored as float32 (not what export writes) are damage, not cast silently
    state = load_file(str(out / "model.safetensors"))
    key = "model.embedding_bag_collection.embedding_bags.student_user_id.weight_qscale"
    state[key] = state[key].float()
    config = json.loads((out / "config.json").read_text())
    config.pop("sha256")
    write_config_as_exported(str(out / "config.json"), config)
    save_file(state, str(out / "model.safetensors"), metadata={"export_id": config["export_id"]})
    with pytest.raises(ValueError, match=r"student_user_id.weight_qscale \(torch.float32\).* are not float16"):
        ServedModel.load(str(out), trust_program=True)


@pytest.mark.parametrize("table_dtype", QUANTIZED)
def test_quantizing_leaves_the_float_tables_as_they_were(table_dtype):
    student = build_student(SCHEMA, SMOKE_CONFIGS["deepfm"], device=CPU).eval()
    ebc = student.model.embedding_bag_collection
    before = {key: value.clone() for key, value in ebc.state_dict().items()}
    quantized = quantized_ebc(ebc, table_dtype)
    assert all(torch.equal(before[key], value) for key, value in ebc.state_dict().items())
    assert not [name for name, module in ebc.named_modules() if "qconfig" in vars(module)]
    assert not [name for name in vars(ebc) if "quant" in name]
    batch = make_batch(8, 1)
    assert quantized(batch.sparse_features).values().shape == ebc(batch.sparse_features).values().shape


@pytest.mark.parametrize("value,table_dtype", [(-7e4, "int8"), (2e7, "int8"), (2e7, "int4")])
def test_a_row_beyond_float16s_range_is_refused_at_export_naming_table_and_row(tmp_path, value, table_dtype):
    """A row whose minimum is below float16's -65504 (its bias) or whose range passes L x 65504 (its scale; L 255
    for INT8, 15 for INT4) has no such form: the export wrote an infinite scale or bias, whose lookups are NaN, and
    ServedModel.load then refused the artifact as "diverged or damaged". The export names the table and the row
    instead, and writes nothing; the same row above 65504 with a small minimum quantizes (a finite scale)."""
    student = build_student(SCHEMA, SMOKE_CONFIGS["deepfm"], device=CPU).eval()
    ebc = student.model.embedding_bag_collection
    with torch.no_grad():
        ebc.embedding_bags["student_user_id"].weight[3, 0] = value
    example = make_batch(4, 100)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"table 'student_user_id' has 1 row\(s\) out of float16's range \(first: "
                                         r"row 3, .*--table-dtype trained"):
        export_task(student, str(out), example.dense_features, example.sparse_features, table_dtype=table_dtype)
    assert not out.exists()
    with torch.no_grad():
        ebc.embedding_bags["student_user_id"].weight[3, 0] = 7e4
    export_task(student, str(out), example.dense_features, example.sparse_features, table_dtype=table_dtype)
    served = ServedModel.load(str(out), trust_program=True)
    assert torch.isfinite(served.logits(example.dense_features, example.sparse_features)).all()


def test_a_table_file_mixing_int8_and_float_tables_is_named(tmp_path):
    """export quantizes every table or none: a tables.json of both is damage, named as such."""
    student = build_student(SCHEMA, SMOKE_CONFIGS["deepfm"], device=CPU).eval()
    example = make_batch(4, 100)
    out = tmp_path / "int8"
    export_task(student, str(out), example.dense_features, example.sparse_features, table_dtype="int8")
    tables = json.loads((out / "tables.json").read_text())
    tables[0]["data_type"] = "FP32"
    (out / "tables.json").write_text(json.dumps(tables))
    config = json.loads((out / "config.json").read_text())
    config.pop("sha256")
    write_config_as_exported(str(out / "config.json"), config)
    with pytest.raises(ValueError, match=r"tables.json: not a list of tables .*mix quantized and float tables"):
        ServedModel.load(str(out), trust_program=True)


def test_int8_tables_refuse_an_id_out_of_range_naming_the_feature(tmp_path):
    """FBGEMM's INT8 kernel checks no bounds: ServedModel's own id check stands before it, for one row too."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    student = build_student(SCHEMA, SMOKE_CONFIGS["deepfm"], device=CPU).eval()
    example = make_batch(4, 100)
    export_task(student, str(tmp_path / "int8"), example.dense_features, example.sparse_features, table_dtype="int8")
    served = ServedModel.load(str(tmp_path / "int8"), trust_program=True)
    request = make_batch(1, 3)
    assert served.logits(request.dense_features, request.sparse_features).shape == (1,)
    sparse = request.sparse_features
    for bad in (12, -1):  # item_id has 12 rows
        values = sparse.values().clone()
        values[1] = bad  # item_id of the one row
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=sparse.keys(), values=values, lengths=sparse.lengths())
        with pytest.raises(ValueError, match=rf"feature 'item_id', row 0 of the batch: id {bad} is outside its "
                                             r"table's \[0, 12\)"):
            served.logits(request.dense_features, kjt)


def test_pooled_columns_are_put_in_table_order_whatever_the_widths():
    """A quant EBC's KeyedTensor (SUM tables first) put back in table order, tables of other widths included."""
    from torchrec.sparse.jagged_tensor import KeyedTensor

    from recsys_llm.serving.quantized_tables import pooled_in_order

    columns = {"genres": torch.arange(0, 4.0), "user_id": torch.arange(10, 12.0), "item_id": torch.arange(20, 28.0)}
    have = ["user_id", "item_id", "genres"]  # as the quant EBC groups them
    pooled = KeyedTensor(keys=have, length_per_key=[columns[k].numel() for k in have],
                         values=torch.cat([columns[k] for k in have]).repeat(3, 1))  # (3, 14)
    want = ["genres", "user_id", "item_id"]
    expected = torch.cat([columns[k] for k in want]).repeat(3, 1)  # (3, 14)
    assert torch.equal(pooled_in_order(pooled, want), expected)
    assert torch.equal(pooled_in_order(pooled, have), pooled.values())


def _gain_network():
    """A weighted gain network on entity tables, its tables filled with N(0, 1) values."""
    from recsys_llm.serving import materialize_meta
    from tests.modules.test_semantic_table import _weighted_batch, _weighted_gain_network

    task = materialize_meta(_weighted_gain_network(True, CPU), CPU).eval()
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for name, weight in task.named_parameters():
            if "embedding_bags" in name:
                weight.copy_(torch.randn(weight.shape, generator=generator))
    return task, _weighted_batch(0), _weighted_batch(1)


def _sequence_first_student():
    """A DeepFM student whose sequence (MEAN) table sits between its sparse (SUM) ones, with its example and a
    request."""
    schema = DatasetSchema("m", [FieldSpec("user_id", "sparse", 10), FieldSpec("genres", "sequence", 5, max_length=3),
                                 FieldSpec("item_id", "sparse", 12), FieldSpec("age", "dense")])
    torch.manual_seed(0)
    return build_student(schema, SMOKE_CONFIGS["deepfm"], device=CPU).eval(), make_batch(4, 100), make_batch(9, 5)


@pytest.mark.parametrize("model,table_dtype", [("sequence_first", "int4"), ("gain", "int4"), ("gain", "int8")])
def test_the_quantized_notes_recipe_without_recsys_llm_gives_what_predict_gives(tmp_path, model, table_dtype):
    """INFERENCE.md of a quantized artifact: its second code block (torch, torchrec and safetensors alone), run after
    the first as written, gives ``predict``'s probabilities. The note told the way in prose only, and left out
    ``is_weighted`` (a required argument of the quant EBC), the ``model.embedding_bag_collection.`` prefix and a gain
    network's entity tables, quantized too, which are the program's third input."""
    task, example, request = _gain_network() if model == "gain" else _sequence_first_student()
    out = str(tmp_path / "out")
    export_task(task, out, example.dense_features, example.sparse_features, table_dtype=table_dtype)
    with open(os.path.join(out, "INFERENCE.md"), encoding="utf-8") as handle:
        blocks = re.findall(r"```python\n(.*?)```", handle.read(), re.S)
    assert len(blocks) == 2 and "from recsys_llm" not in blocks[1] and "import recsys_llm" not in blocks[1]
    namespace: Dict[str, object] = {}
    exec(blocks[0], namespace)  # the ServedModel example: served, kjt, dense
    namespace.update(kjt=request.sparse_features, dense=request.dense_features)
    exec(blocks[1], namespace)
    expected = namespace["served"].predict(request.dense_features, request.sparse_features)
    torch.testing.assert_close(namespace["probabilities_without_recsys_llm"], expected, rtol=0, atol=1e-6)


def test_a_quantized_table_of_another_shape_is_named_in_its_stored_shape(tmp_path):
    """A weight file rewritten with another table shape (its digest rewritten too: the digests catch damage, not
    edits) was refused with torch's first line alone, "Error(s) in loading state_dict for EmbeddingBagCollection:",
    and its detail named an INT4 table's shapes in UInt4Tensor's (rows, D) view: a stored (11, 8) as [11, 16]."""
    from recsys_llm.file_hash import file_sha256

    student, example, _ = _sequence_first_student()
    out = tmp_path / "int4"
    export_task(student, str(out), example.dense_features, example.sparse_features, table_dtype="int4")
    path = str(out / "model.safetensors")
    state = load_file(path)
    key = "model.embedding_bag_collection.embedding_bags.student_item_id.weight"
    rows, packed = state[key].shape
    state[key] = state[key][:-1].clone()  # a row short
    config = json.loads((out / "config.json").read_text())
    save_file(state, path, metadata={"export_id": config["export_id"]})
    config["sha256"]["model.safetensors"] = file_sha256(path)
    write_config_as_exported(str(out / "config.json"), config)
    with pytest.raises(ValueError, match=rf"model.safetensors: its tables do not match tables.json \(RuntimeError: "
                                         rf"quantized tables: other shapes: embedding_bags.student_item_id.weight is "
                                         rf"\({rows - 1}, {packed}\), expected \({rows}, {packed}\) \(an INT4 table "
                                         r"stores \(rows, D / 2\) packed bytes\)"):
        ServedModel.load(str(out), trust_program=True)
    del state[key]
    save_file(state, path, metadata={"export_id": config["export_id"]})
    config["sha256"]["model.safetensors"] = file_sha256(path)
    write_config_as_exported(str(out / "config.json"), config)
    with pytest.raises(ValueError, match=r"quantized tables: missing: embedding_bags.student_item_id.weight\)"):
        ServedModel.load(str(out), trust_program=True)


def test_quantized_ebc_checks_the_dims_itself_and_suggests_only_a_dtype_every_named_table_takes():
    """``quantized_ebc`` is public: a dim INT4 cannot take is refused by it too (not only by ``export_task``), naming
    each such table; INT8 is suggested only when every one of them is even (a dim of 5 takes trained alone)."""
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

    def tables(*dims):
        return EmbeddingBagCollection(tables=[
            EmbeddingBagConfig(name=f"t{i}", embedding_dim=dim, num_embeddings=5, feature_names=[f"f{i}"])
            for i, dim in enumerate(dims)])

    with pytest.raises(ValueError, match=r"table\(s\) 't1' \(embedding_dim 6\) cannot be INT4: .*multiple of 4; "
                                         r"export with --table-dtype int8 or trained"):
        quantized_ebc(tables(8, 6), "int4")
    with pytest.raises(ValueError, match=r"table\(s\) 't1' \(embedding_dim 6\), 't2' \(embedding_dim 5\) cannot be "
                                         r"INT4: .*; export with --table-dtype trained, or train with such a dim"):
        quantized_ebc(tables(8, 6, 5), "int4")


def test_a_dim_the_dtype_cannot_take_is_refused_before_the_dense_part_is_traced(tmp_path, monkeypatch):
    """torch.export of the dense part takes minutes at scale: a table of a dim INT4 cannot take is refused before it
    runs (``quantized_ebc`` refuses it too, but only after the capture)."""
    traced = []
    export = torch.export.export
    monkeypatch.setattr(torch.export, "export", lambda *args, **kwargs: traced.append(1) or export(*args, **kwargs))
    example = _request(4, 0)
    with pytest.raises(ValueError, match=r"table\(s\) 't_tags' \(embedding_dim 6\) cannot be INT4"):
        export_task(_weighted_task_of_dim(6), str(tmp_path / "out"), example.dense_features, example.sparse_features,
                    table_dtype="int4")
    assert traced == [] and not os.path.exists(tmp_path / "out")


def test_loading_quantized_rows_names_each_kind_of_mismatch_in_the_stored_form():
    """``load_quantized_state``'s refusal names unexpected keys as it names missing ones (torch's strict load named
    neither on its first line), lists three keys of a kind then "...", and gives the INT4 packing hint to INT4
    tables only (an INT8 table stores (rows, D)); the state as written loads to the same lookups."""
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

    from recsys_llm.serving.quantized_tables import empty_quantized_ebc, load_quantized_state

    ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name=f"t{i}", embedding_dim=8, num_embeddings=5,
                                                            feature_names=[f"f{i}"]) for i in range(2)])
    quantized = quantized_ebc(ebc, "int8")
    state = quantized_state(quantized, "")
    weight = "embedding_bags.t1.weight"

    def load(tensors):
        loaded = empty_quantized_ebc(quantized.embedding_bag_configs(), weighted=False)
        load_quantized_state(loaded, tensors)
        return loaded

    with pytest.raises(RuntimeError, match=r"^quantized tables: unexpected: embedding_bags.t2.weight$"):
        load({**state, "embedding_bags.t2.weight": state[weight]})
    with pytest.raises(RuntimeError, match=rf"^quantized tables: missing: {weight}; {weight}_qbias; {weight}_qscale$"):
        load({key: value for key, value in state.items() if not key.startswith(weight)})  # one table: three keys
    with pytest.raises(RuntimeError, match=r"^quantized tables: missing: embedding_bags.t0.weight; "
                                           r"embedding_bags.t0.weight_qbias; embedding_bags.t0.weight_qscale \.\.\.$"):
        load({})
    with pytest.raises(RuntimeError, match=rf"^quantized tables: other shapes: {weight} is \(4, 8\), "
                                           r"expected \(5, 8\)$"):
        load({**state, weight: state[weight][:-1].clone()})
    kjt = KeyedJaggedTensor.from_lengths_sync(["f0", "f1"], torch.tensor([0, 4, 2, 1, 3, 4]),
                                              torch.ones(6, dtype=torch.int32))
    assert torch.equal(load(state)(kjt).values(), quantized(kjt).values())


def _train_and_export_on_the_command_line(data: str, run_dir: str, output: str) -> Dict[str, object]:
    import contextlib
    import io
    import json

    from recsys_llm.cli import main

    config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                          "synthetic_deepfm.yaml")
    overrides = [f"data.schema={data}/schema.json", "data.batch_size=128", "data.synthetic_rows=0", "train.epochs=1",
                 "train.progress=false", "train.device=cpu", f"train.run_dir={run_dir}", "model.embedding_dim=8",
                 "model.mlp_layer_sizes=[16]"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["train", "--config", config, *overrides]) == 0
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["export", "--checkpoint", run_dir, "--output", output, "--table-dtype", "int8",
                     "--mixed-precision", "bf16", *overrides]) == 0
    return json.loads(printed.getvalue())


@pytest.mark.multiprocess
def test_export_on_the_command_line_passes_its_table_dtype_and_precision_on(tmp_path):
    from recsys_llm.data.synthetic import generate_synthetic
    from tests.multiprocess import run_multiprocess

    generate_synthetic(str(tmp_path / "data"), 1_000, seed=0)
    (written,) = run_multiprocess(_train_and_export_on_the_command_line, world_size=1, data=str(tmp_path / "data"),
                                  run_dir=str(tmp_path / "run"), output=str(tmp_path / "served"))
    assert (written["table_dtype"], written["mixed_precision"]) == ("int8", "bf16")
    served = ServedModel.load(str(tmp_path / "served"), trust_program=True)
    assert served.mixed_precision == "bf16"


@pytest.mark.parametrize("model", ["sequence_first", "gain"])
def test_the_float_tables_recipe_without_recsys_llm_gives_what_predict_gives(tmp_path, model):
    """INFERENCE.md of an artifact with float tables: its second code block (torch, torchrec and safetensors alone)
    runs as written in a namespace of its own and its ``predict_without_recsys_llm`` gives ``predict``'s
    probabilities, for a student whose MEAN table sits between SUM ones and for a weighted gain network with entity
    tables. The way was told in prose only."""
    task, example, request = _gain_network() if model == "gain" else _sequence_first_student()
    out = str(tmp_path / "out")
    export_task(task, out, example.dense_features, example.sparse_features)
    with open(os.path.join(out, "INFERENCE.md"), encoding="utf-8") as handle:
        blocks = re.findall(r"```python\n(.*?)```", handle.read(), re.S)
    assert len(blocks) == 2 and "from recsys_llm" not in blocks[1] and "import recsys_llm" not in blocks[1]
    namespace: Dict[str, object] = {}
    exec(blocks[1], namespace)
    predict_without_recsys_llm = namespace["predict_without_recsys_llm"]
    served = ServedModel.load(out, trust_program=True)
    expected = served.predict(request.dense_features, request.sparse_features)
    assert torch.equal(predict_without_recsys_llm(request.dense_features, request.sparse_features), expected)
