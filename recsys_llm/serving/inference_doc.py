"""``INFERENCE.md``: how to call an exported artifact, with and without recsys_llm, written beside it
by :func:`~recsys_llm.serving.export.export_task` for the artifact's own features, dense width and options."""

import shlex
from typing import Any, Dict, List, Sequence

from recsys_llm.serving.artifact import ID_RULES_KEY, MIXED_PRECISION_KEY, TABLE_DTYPE_KEY, WEIGHTED_KEY
from recsys_llm.serving.quantized_tables import TRAINED
from recsys_llm.train.mixed_precision import AUTOCAST_DTYPES


INFERENCE_EXAMPLE = """# Inference with an exported model

Runs as written in a fresh Python process (a request of 2 rows with id 0, the missing value,
in every bag: put your raw ids there):

```python
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from recsys_llm.serving import ServedModel

# this artifact's directory as exported; its path now if it was copied or moved. The dense
# program is code: trust_program=True only for artifacts you made or trust
served = ServedModel.load({path!r}, trust_program=True)
features = served.feature_names  # {features}
batch_size = 2
kjt = KeyedJaggedTensor.from_lengths_sync(
    keys=features,
    # ids, feature-major: every row's ids of features[0], then of features[1], ...
    values=torch.zeros(len(features) * batch_size, dtype=torch.int64),
    # one length per (feature, row), same order: 1 for a sparse field, 0..n ids for a sequence
    lengths=torch.ones(len(features) * batch_size, dtype=torch.int32),{weights}
)
dense = torch.zeros(batch_size, {num_dense})  # dense features in schema order, finite
probabilities = served.predict(dense, kjt)  # (batch_size,)
print(probabilities)
```

A whole Parquet split of the data's schema, with AUC / LogLoss and each row's score:
`recsys-llm score --artifact {shell_path} --data <prepared data> --split test --trust-program --output scores.parquet`.

A request is checked before the model runs: the KeyedJaggedTensor must hold each feature
once (any order; features the model does not have are ignored, as an EBC ignores them), integer ids and one length per (feature, row) summing to the number of ids;
the dense features must be `(batch_size, {num_dense})` and finite (NaN / inf is a ValueError
naming the row). Dense features of another real dtype (float64, integers) are converted to
float32.

{id_rules} Raw values of data prepared by `recsys-llm prepare tabular` (strings, a
field's own numbers) get their ids from the artifact itself, `ids, lengths = served.raw_value_ids(field, values)`
(its `ids/` holds the training data's vocabularies and the way each field's values became ids; the same as
`recsys_llm.data.tabular.raw_values.raw_value_ids(DatasetSchema.load(<prepared data>), field, values)`), and a whole
request from raw values by field name, `dense, kjt = served.raw_request({{"city": ["Paris", None], ...}})` (every
feature and dense field, one value per row; a field's values as `raw_value_ids` takes them); raw rows of
`recsys-llm prepare criteo` data get theirs from `recsys_llm.data.hashing.hash_strings` and their
dense features as `log(1 + max(x, 0))` (the recipe: docs/usage.md, "prepare criteo turns a line
into the model's inputs"). The EBC lookup runs
eagerly; everything after it is `dense_program.pt2` (`torch.export.load`), inputs
`(dense (B, {num_dense}), pooled (B, {pooled}))`.

What the serving process needs: torch, torchrec and its FBGEMM build (`fbgemm-gpu-cpu` on a CPU host,
`fbgemm-gpu` on a GPU one, both `pip install --no-deps`: torchrec's own requirement pulls the CUDA build;
the versions in `config.json`, `versions`), torchrec's pure-Python dependencies (tensordict,
pyre-extensions, numpy, tqdm), safetensors, and recsys_llm for `ServedModel` (its request checks and id rules),
which imports pyarrow and pyyaml but no LLM package (transformers, peft) and no torchx:
`pip install --no-deps` it next to those. Without recsys_llm, torch and torchrec alone load the
artifact (the code is below): an `EmbeddingBagCollection` built from `tables.json` with the
`model.embedding_bag_collection.*` weights of `model.safetensors` (`safetensors.torch.load_file`), then
`torch.sigmoid(torch.export.load("dense_program.pt2").module()(dense, ebc(kjt).values()))` under
`torch.no_grad()` (the program gives logits; their sigmoid is what `predict` returns; the KJT's keys
in `feature_names` order); the dense program alone needs torch only; the id rules above
and the request checks are then the caller's job (an id outside its table fails deep in FBGEMM
on CPU, and may read another row on GPU). Besides the tables, `model.safetensors` holds the dense
weights the program was captured with, less the training-only parts serving never reads (loss
terms such as LLaCTR's FRE with its LLM field vectors; a logit term folded into the backbone's pair
weights, `config.json`: `folded_logit_terms`); the whole trained state is `recsys-llm export --state-only`'s.
"""


ID_RULES_NOTE = """Ids go through the training reader's rules first (`config.json`, `id_rules`): ids of a
`hashed` field are folded into its table, sequences keep their first `max_length` ids, a row of
a sparse (single-id) field holds exactly one id (send a missing value as id 0, as in the
training data, not as an empty bag), and any other id outside its table is a ValueError naming
the feature and row."""

NO_ID_RULES_NOTE = """This export recorded no id rules (`config.json`: `id_rules` is null, the export
was given no schema): an id outside its table is a ValueError naming the feature and row, but
hashed ids are not folded, sequences are not cut to their `max_length` and a sparse field's
bag may be empty. Send ids as the training reader gave them (folded, at most `max_length` per
sequence, one per row of a sparse field: id 0 for a missing value), or export again with the
schema (`recsys-llm export` passes the run's)."""


WEIGHTED_INFERENCE_NOTE = """
This model's tables take per-id weights (an `EmbeddingBagCollection(..., is_weighted=True)`;
`config.json`: `weighted`): each bag pools the weighted sum of its rows, so a request's
KeyedJaggedTensor must carry `weights` (one float per id, in the order of `values`; weights of
another real dtype, such as float64, are converted to the tables' dtype: float32 unless
`tables.json` gives FP16 / BF16), and a request without them is a
ValueError. Without recsys_llm, build the EBC from `tables.json` with `is_weighted=True` as well:
an unweighted EBC ignores the weights and serves other predictions.
"""


# the example request's per-id weights, for an artifact whose tables are weighted
WEIGHTS_ARGUMENT = """
    # one weight per id, same order as values: this model's tables pool weighted sums
    weights=torch.ones(len(features) * batch_size),"""


# the same for the example without recsys_llm: weights in the tables' dtype
FLOAT_TABLES_WEIGHTS_ARGUMENT = """
    weights=torch.ones(len(features) * 2, dtype=next(ebc.parameters()).dtype),  # in the tables' dtype"""


MIXED_PRECISION_INFERENCE_NOTE = """
The dense program computes under CPU bfloat16 autocast (`recsys-llm export --mixed-precision bf16`; `config.json`:
`mixed_precision`): its weights are float32 and its matmuls and linears run in bfloat16, which CPUs with bfloat16
arithmetic (AVX-512 BF16, AMX) do 2-3x as fast (FM and FwFM, without such work, serve slower); its logits are
float32, within bfloat16's rounding of the float32 program's (a few hundredths at most on the project's ML-100K
models). It serves on CPU: a GPU would not apply the program's CPU autocast, so `ServedModel` refuses `.to("cuda")`:
for a GPU, export with `--mixed-precision fp32` and call it under `torch.autocast("cuda", dtype=torch.bfloat16)`,
which computes what this program captured.
"""


QUANTIZED_INFERENCE_NOTE = """
The tables are quantized (`recsys-llm export --table-dtype {table_dtype}`; `tables.json`: `data_type`
{data_type}, `trained_data_type` what they were in training): each row is D values `q` (INT8: D uint8; INT4:
D / 2 uint8 bytes of two 4-bit values, value 2j in the low 4 bits of byte j, value 2j + 1 in its high 4 bits)
with a float16 scale and bias, `row = q * scale + bias` (`model.safetensors`: `...embedding_bags.<table>.weight`,
`.weight_qscale`, `.weight_qbias`, the state dict of torchrec's quantized EmbeddingBagCollection with split
scale / bias). `ServedModel` looks them up with torchrec's `torchrec.quant.embedding_modules.EmbeddingBagCollection`
(FBGEMM's `IntNBitTableBatchedEmbeddingBagsCodegen`), on CPU. Without recsys_llm, that module takes the place of
the float EBC above (a gain network's entity tables, `semantic_tables.json`, are quantized too). It groups its
tables by pooling (SUM tables first), so its output goes to the program in the tables' order, by name. After the
example above (its `kjt` and `dense`), with torch, torchrec and safetensors alone:

```python
import json
import os

import torch
from safetensors.torch import load_file
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection
from torchrec.tensor_types import UInt4Tensor

directory = {path!r}
with open(os.path.join(directory, "config.json"), encoding="utf-8") as handle:
    config = json.load(handle)
state = load_file(os.path.join(directory, "model.safetensors"))


def quantized_tables(tables_file, prefix):
    # the quant EBC of `tables_file` with its weights (`prefix` stripped), and its pooled keys in table order
    with open(os.path.join(directory, tables_file), encoding="utf-8") as handle:
        tables = json.load(handle)
    ebc = QuantEmbeddingBagCollection(
        [EmbeddingBagConfig(name=t["name"], embedding_dim=t["embedding_dim"], num_embeddings=t["num_embeddings"],
                            feature_names=t["feature_names"], pooling=PoolingType[t["pooling"]],
                            data_type=DataType[t["data_type"]]) for t in tables],
        is_weighted=config["weighted"], device=torch.device("cpu"), quant_state_dict_split_scale_bias=True)
    int4 = {{f"embedding_bags.{{t['name']}}.weight" for t in tables if t["data_type"] == "INT4"}}
    # an INT4 weight is stored as its (rows, D / 2) bytes; the module holds it as a UInt4Tensor (rows, D)
    ebc.load_state_dict({{key[len(prefix):]: UInt4Tensor(value) if key[len(prefix):] in int4 else value
                         for key, value in state.items() if key.startswith(prefix)}})
    return ebc, [name for t in tables for name in t["feature_names"]]


ebc, keys = quantized_tables(config["tables"], "model.embedding_bag_collection.")
program = torch.export.load(os.path.join(directory, config["dense_program"])).module()
with torch.no_grad():
    pooled = ebc(kjt)  # a KeyedTensor
    inputs = (dense, torch.cat([pooled[key] for key in keys], dim=1))  # (B, {pooled})
    if config["semantic_tables"]:  # a gain network: its entity tables' vectors are the third input
        entity_ebc, entity_keys = quantized_tables(config["semantic_tables"],
                                                   "semantic_table.embedding_bag_collection.")
        vectors = entity_ebc(kjt)
        inputs += (torch.cat([vectors[key] for key in entity_keys], dim=1),)
    probabilities_without_recsys_llm = torch.sigmoid(program(*inputs))  # what served.predict gives
print(probabilities_without_recsys_llm)
```
"""


FLOAT_TABLES_INFERENCE_NOTE = """
The same predictions with torch, torchrec and safetensors alone (no recsys_llm; the id rules and request checks
above are then the caller's: send ids as the training reader gave them, and per-id weights, for a weighted model,
in the tables' dtype):

```python
import json
import os

import torch
from safetensors.torch import load_file
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

directory = {path!r}
with open(os.path.join(directory, "config.json"), encoding="utf-8") as handle:
    config = json.load(handle)
state = load_file(os.path.join(directory, "model.safetensors"))


def tables_of(tables_file, prefix):
    # the EBC of `tables_file` with its weights (`prefix` stripped), and its pooled keys in table order
    with open(os.path.join(directory, tables_file), encoding="utf-8") as handle:
        tables = json.load(handle)
    ebc = EmbeddingBagCollection(
        [EmbeddingBagConfig(name=t["name"], embedding_dim=t["embedding_dim"], num_embeddings=t["num_embeddings"],
                            feature_names=t["feature_names"], pooling=PoolingType[t["pooling"]],
                            data_type=DataType[t["data_type"]]) for t in tables],
        is_weighted=config["weighted"], device=torch.device("cpu"))
    ebc.load_state_dict({{key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}})
    return ebc.eval(), [name for t in tables for name in t["feature_names"]]


ebc, keys = tables_of(config["tables"], "model.embedding_bag_collection.")
entity_tables = None  # a gain network's frozen entity tables: their vectors are the program's third input
if config["semantic_tables"]:
    entity_tables = tables_of(config["semantic_tables"], "semantic_table.embedding_bag_collection.")
program = torch.export.load(os.path.join(directory, config["dense_program"])).module()


def predict_without_recsys_llm(dense, kjt):
    # (B,) click probabilities of dense (B, {num_dense}) float32 and a KeyedJaggedTensor of the features' ids
    with torch.no_grad():
        pooled = ebc(kjt)  # a KeyedTensor
        inputs = (dense, torch.cat([pooled[key] for key in keys], dim=1))  # (B, {pooled})
        if entity_tables is not None:
            entity_ebc, entity_keys = entity_tables
            vectors = entity_ebc(kjt)
            inputs += (torch.cat([vectors[key] for key in entity_keys], dim=1),)
        return torch.sigmoid(program(*inputs))


features = config["feature_names"]
kjt = KeyedJaggedTensor.from_lengths_sync(
    keys=features, values=torch.zeros(len(features) * 2, dtype=torch.int64),
    lengths=torch.ones(len(features) * 2, dtype=torch.int32),{weights}
)
print(predict_without_recsys_llm(torch.zeros(2, {num_dense}), kjt))  # what the first example prints
```
"""


SEMANTIC_INFERENCE_NOTE = """
This is a gain network: its LLM vectors sit in frozen entity tables {tables}
(`semantic_tables.json`; their weights are the `semantic_table.embedding_bag_collection.*`
tensors of `model.safetensors`), looked up from the same KeyedJaggedTensor; their values are the
program's third input. No LLM runs at inference.
"""


def inference_text(
    directory: str,
    config: Dict[str, Any],
    feature_names: Sequence[str],
    tables: List[Dict[str, Any]],
    semantic_tables: List[Dict[str, Any]],
) -> str:
    """INFERENCE.md of the artifact in ``directory`` (an absolute path) whose ``config.json`` is ``config``.

    Args:
        directory (str): the artifact's absolute path, written into the examples.
        config (Dict[str, Any]): its ``config.json``.
        feature_names (Sequence[str]): the KJT keys a request carries, in order.
        tables (List[Dict[str, Any]]): ``tables.json``'s entries.
        semantic_tables (List[Dict[str, Any]]): ``semantic_tables.json``'s (a gain network's entity tables), or [].
    """
    parts = [INFERENCE_EXAMPLE.format(
        path=directory, features=list(feature_names), shell_path=shlex.quote(directory),
        num_dense=config["num_dense_features"], pooled=config["pooled_dim"],
        weights=WEIGHTS_ARGUMENT if config[WEIGHTED_KEY] else "",
        id_rules=ID_RULES_NOTE if config[ID_RULES_KEY] else NO_ID_RULES_NOTE)]
    if config[WEIGHTED_KEY]:
        parts.append(WEIGHTED_INFERENCE_NOTE)
    if AUTOCAST_DTYPES[config[MIXED_PRECISION_KEY]] is not None:  # the dense program runs under autocast
        parts.append(MIXED_PRECISION_INFERENCE_NOTE)
    if config[TABLE_DTYPE_KEY] == TRAINED:
        parts.append(FLOAT_TABLES_INFERENCE_NOTE.format(
            path=directory, num_dense=config["num_dense_features"], pooled=config["pooled_dim"],
            weights=FLOAT_TABLES_WEIGHTS_ARGUMENT if config[WEIGHTED_KEY] else ""))
    else:
        parts.append(QUANTIZED_INFERENCE_NOTE.format(table_dtype=config[TABLE_DTYPE_KEY],
                                                     data_type=tables[0]["data_type"], path=directory,
                                                     pooled=config["pooled_dim"]))
    if semantic_tables:
        parts.append(SEMANTIC_INFERENCE_NOTE.format(tables=[t["name"] for t in semantic_tables]))
    return "".join(parts)
