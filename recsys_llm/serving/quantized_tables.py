"""Quantized serving tables, the ``torchrec.inference`` way: INT8 or INT4 rows with a per-row scale and bias.

``export_task(..., table_dtype="int8" | "int4")`` (``recsys-llm export --table-dtype int8 | int4``) quantizes every
table of the artifact with ``torchrec.inference.modules.quantize_embeddings`` (``torch.qint8`` / ``torch.quint4x2``,
FBGEMM's ``FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf``): each float32 / float16 row ``w`` (D,) becomes
``q = round((w - bias) / scale)`` in ``[0, L]`` with ``L = 2**bits - 1`` (255 for INT8, 15 for INT4), ``scale =
(max(w) - min(w)) / L`` and ``bias = min(w)`` kept as float16, so a looked-up row is ``q * scale + bias`` (error
at most ``scale / 2`` per value, plus the float16 rounding of scale and bias). INT8 rows are D bytes; INT4 rows
D / 2 bytes, two values a byte, value ``2j`` in the low 4 bits of byte ``j`` and value ``2j + 1`` in its high 4 bits.
The artifact holds the state dict torchrec's quantized ``EmbeddingBagCollection`` writes with split scale / bias
(torchrec inference's default, ``FUSED_PARAM_QUANT_STATE_DICT_SPLIT_SCALE_BIAS``)::

    <prefix>embedding_bags.<table>.weight          (rows, D) uint8; INT4: (rows, D / 2) uint8, packed
    <prefix>embedding_bags.<table>.weight_qscale   (rows, 1) float16
    <prefix>embedding_bags.<table>.weight_qbias    (rows, 1) float16

plain tensors that safetensors stores and reads without running code (the quant EBC holds an INT4 table's
weight as torchrec's ``UInt4Tensor``, a (rows, D) view of those packed bytes that safetensors cannot write: its
bytes are stored, and wrapped in a ``UInt4Tensor`` again on load, the table's ``data_type`` INT4 in
``tables.json`` saying so). ``ServedModel`` loads them into a
``torchrec.quant.embedding_modules.EmbeddingBagCollection``, whose lookup is FBGEMM's
``IntNBitTableBatchedEmbeddingBagsCodegen`` (one kernel for all tables of a pooling, CPU or GPU).

Example::

    quantized = quantized_ebc(ebc, "int4")  # a torchrec quant EBC; ebc is left as it was
    pooled = quantized(kjt).values()  # (B, sum of dims) float32, as ebc(kjt).values() within the scales
"""

import copy
import functools
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torchrec.inference.modules import quantize_embeddings
from torchrec.modules.embedding_configs import DATA_TYPE_NUM_BITS, DataType, EmbeddingBagConfig, dtype_to_data_type
from torchrec.modules.embedding_modules import EmbeddingBagCollection, get_embedding_names_by_table
from torchrec.quant.embedding_modules import MODULE_ATTR_QUANT_STATE_DICT_SPLIT_SCALE_BIAS
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedTensor
from torchrec.tensor_types import UInt4Tensor

# ``export --table-dtype`` values: "trained" keeps the tables' training dtype (FP32 / FP16); the others quantize
TRAINED = "trained"
# torchrec's quantization dtype of each value
QUANTIZED_DTYPES: Dict[str, torch.dtype] = {"int8": torch.qint8, "int4": torch.quint4x2}
TABLE_DTYPES = (TRAINED, *QUANTIZED_DTYPES)
QUANTIZED_DATA_TYPES = (DataType.INT8, DataType.INT4)  # tables.json data_types ServedModel serves with a quant EBC


def check_table_dtype(table_dtype: str) -> Optional[torch.dtype]:
    """The quantization dtype of a ``table_dtype`` value (``--table-dtype``), None for ``"trained"``.

    Raises:
        ValueError: another value, naming the flag and the values it takes.
    """
    if table_dtype == TRAINED:
        return None
    if isinstance(table_dtype, str) and table_dtype in QUANTIZED_DTYPES:
        return QUANTIZED_DTYPES[table_dtype]
    raise ValueError(f"export: table_dtype (--table-dtype) is {table_dtype!r}; expected one of {list(TABLE_DTYPES)} "
                     f"({TRAINED!r}: the tables as trained, FP32 or FP16; 'int8' / 'int4': rows quantized to 8 / 4 "
                     "bits with a per-row scale and bias, served by torchrec's quantized EmbeddingBagCollection)")


def check_quantizable(ebc: EmbeddingBagCollection, table_dtype: str) -> None:
    """Raises where a table of ``ebc`` has no ``table_dtype`` form; nothing for ``"trained"``.

    FBGEMM's row-wise quantizer writes a row's packed values, then its float16 scale and bias, and needs the
    values to fill whole 2-byte words: ``embedding_dim * bits`` a multiple of 16 (INT8: an even dim; INT4, two
    values a byte: a multiple of 4). Checked on the configs alone (tables on the meta device too).

    Raises:
        ValueError: naming each such table, its dim, the rule and the ``--table-dtype`` values it fits.
    """
    dtype = check_table_dtype(table_dtype)
    if dtype is None:
        return
    bits = DATA_TYPE_NUM_BITS[dtype_to_data_type(dtype)]
    multiple = 16 // bits
    bad = [c for c in ebc.embedding_bag_configs() if c.embedding_dim % multiple]
    if bad:
        fits = ["int8"] if all(c.embedding_dim % 2 == 0 for c in bad) else []
        tables = ", ".join(f"{c.name!r} (embedding_dim {c.embedding_dim})" for c in bad)
        raise ValueError(
            f"export: --table-dtype {table_dtype}: table(s) {tables} cannot be {table_dtype.upper()}: FBGEMM's "
            f"row-wise quantizer packs a row's {bits}-bit values into whole 2-byte words (then its float16 scale "
            f"and bias), so embedding_dim must be a multiple of {multiple}; export with "
            f"--table-dtype {' or '.join(fits + ['trained'])}, or train with such a dim")


def quantized_ebc(ebc: EmbeddingBagCollection, table_dtype: str) -> QuantEmbeddingBagCollection:
    """``ebc``'s tables quantized by ``torchrec.inference.modules.quantize_embeddings``, on CPU.

    ``ebc`` is left as it was: its tables are read, not moved or changed, and the attributes the
    quantization sets on it (``qconfig``, the split scale / bias flag) are removed again.

    Args:
        ebc (EmbeddingBagCollection): unsharded tables, float32 or float16, on CPU.
        table_dtype (str): a quantized value of :data:`TABLE_DTYPES` (``"int8"``, ``"int4"``).

    Returns:
        QuantEmbeddingBagCollection: same tables, features and pooling; KJT -> KeyedTensor (B, sum of dims)
        float32. Its state dict holds split scale / bias (module docstring).

    Raises:
        ValueError: ``"trained"``, another value, a table whose dim the dtype cannot take (:func:`check_quantizable`)
            or a row out of float16's range.
    """
    dtype = check_table_dtype(table_dtype)
    if dtype is None:
        raise ValueError(f"quantized_ebc: table_dtype {table_dtype!r} keeps the tables as trained; nothing to quantize")
    check_quantizable(ebc, table_dtype)
    holder = nn.Module()
    holder.ebc = ebc  # quantize_embeddings swaps the EBC children of a module, not the module it is given
    setattr(ebc, MODULE_ATTR_QUANT_STATE_DICT_SPLIT_SCALE_BIAS, True)
    try:
        quantize_embeddings(holder, dtype=dtype, inplace=True, output_dtype=torch.float32)
    finally:
        delattr(ebc, MODULE_ATTR_QUANT_STATE_DICT_SPLIT_SCALE_BIAS)
        for module in ebc.modules():
            if "qconfig" in vars(module):
                delattr(module, "qconfig")
    _check_scales_finite(holder.ebc, ebc, table_dtype)
    return holder.ebc.eval()


def _check_scales_finite(quantized: QuantEmbeddingBagCollection, ebc: EmbeddingBagCollection,
                         table_dtype: str) -> None:
    """Raises where a row's float16 scale or bias came out infinite: a row whose minimum is below float16's
    -65504, or whose range is above L x 65504 (L: 255 for INT8, 15 for INT4), has no such form (its lookups would
    be NaN, and ``ServedModel.load`` would refuse the artifact as diverged or damaged).

    Raises:
        ValueError: naming the table, the first such row, its value range and ``--table-dtype trained``.
    """
    for key, value in quantized.state_dict().items():
        if not key.endswith(("_qscale", "_qbias")):
            continue
        bad = (~torch.isfinite(value.reshape(-1))).nonzero()
        if bad.numel() == 0:
            continue
        table = key.split(".")[-2]  # embedding_bags.<table>.weight_qscale
        row = int(bad[0])
        weights = ebc.embedding_bags[table].weight[row].detach().float()  # (D,)
        raise ValueError(
            f"export: --table-dtype {table_dtype}: table {table!r} has {bad.numel()} row(s) out of float16's range "
            f"(first: row {row}, values {float(weights.min()):.6g} to {float(weights.max()):.6g}), whose "
            "quantization scale or bias (float16, at most 65504) would be infinite and its lookups NaN; export "
            "it with --table-dtype trained")


def empty_quantized_ebc(configs: List[EmbeddingBagConfig], weighted: bool) -> QuantEmbeddingBagCollection:
    """A quant EBC of ``configs`` (their ``data_type`` INT8 or INT4) on CPU, its rows allocated but not filled: fill
    it with :func:`load_quantized_state`."""
    ebc = QuantEmbeddingBagCollection(copy.deepcopy(configs), is_weighted=weighted, device=torch.device("cpu"),
                                      quant_state_dict_split_scale_bias=True)
    return ebc.eval()


def quantized_state(ebc: QuantEmbeddingBagCollection, prefix: str) -> Dict[str, torch.Tensor]:
    """``ebc``'s state dict under ``prefix`` as the artifact stores it: contiguous copies (the tensors are views of
    FBGEMM's padded rows), (rows, D) uint8 weights ((rows, D / 2) packed bytes of an INT4 table's ``UInt4Tensor``),
    (rows, 1) float16 scales and biases."""
    return {f"{prefix}{key}": (value.view(torch.uint8) if isinstance(value, UInt4Tensor) else value).detach()
            .clone(memory_format=torch.contiguous_format) for key, value in ebc.state_dict().items()}


def load_quantized_state(ebc: QuantEmbeddingBagCollection, state: Dict[str, torch.Tensor]) -> None:
    """Copies ``state`` (as :func:`quantized_state` wrote it, without its prefix) into ``ebc``'s FBGEMM rows (each
    padded to its alignment): an INT4 table's (rows, D / 2) uint8 bytes become torchrec's ``UInt4Tensor`` (rows, D)
    again, the form the quant EBC holds them in.

    Keys and shapes are checked in the stored form first: ``load_state_dict`` named an INT4 table's shapes in
    ``UInt4Tensor``'s (rows, D) view (a stored (500, 8) as ``[500, 16]``), and its first line named nothing.

    Raises:
        RuntimeError: missing or unexpected keys, or a tensor of another shape than ``ebc``'s tables store (the
            key, its shape and the one expected: (rows, D) INT8 / (rows, D / 2) INT4 weights, (rows, 1) scales).
    """
    held = ebc.state_dict()
    packed = {key for key, value in held.items() if isinstance(value, UInt4Tensor)}
    expected = {key: tuple((value.view(torch.uint8) if key in packed else value).shape) for key, value in held.items()}
    wrong = [f"{key} is {tuple(value.shape)}, expected {expected[key]}"
             f"{' (an INT4 table stores (rows, D / 2) packed bytes)' if key in packed else ''}"
             for key, value in state.items() if key in expected and tuple(value.shape) != expected[key]]
    problems = {"missing": sorted(set(expected) - set(state)), "unexpected": sorted(set(state) - set(expected)),
                "other shapes": wrong}
    found = [f"{kind}: {'; '.join(items[:3])}{' ...' if len(items) > 3 else ''}" for kind, items in problems.items()
             if items]
    if found:
        raise RuntimeError(f"quantized tables: {'; '.join(found)}")
    ebc.load_state_dict({key: UInt4Tensor(value) if key in packed and value.dtype == torch.uint8 else value
                         for key, value in state.items()})


def is_quantized(ebc: Optional[nn.Module]) -> bool:
    """Whether ``ebc`` is torchrec's quantized EBC (its tables are buffers, it has no parameters)."""
    return isinstance(ebc, QuantEmbeddingBagCollection)


def pooling_weight_dtype(ebc: nn.Module) -> torch.dtype:
    """The dtype ``ebc`` takes per-id weights in: its tables' for a float EBC (``embedding_bag``),
    float32 for a quant EBC (FBGEMM's kernel)."""
    if is_quantized(ebc):
        return torch.float32
    return next(ebc.parameters()).dtype


def tables_device(ebc: nn.Module) -> torch.device:
    """The device ``ebc`` looks its tables up on."""
    tensor = next(ebc.buffers()) if is_quantized(ebc) else next(ebc.parameters())
    return tensor.device


def table_bytes(ebc: nn.Module) -> int:
    """Bytes of ``ebc``'s table weights as held for lookups (a quant EBC's rows padded by FBGEMM's alignment)."""
    if is_quantized(ebc):
        return sum(int(module.weights_host.numel()) for module in ebc._emb_modules)
    return sum(p.numel() * p.element_size() for p in ebc.parameters())


def table_order_keys(ebc: nn.Module) -> List[str]:
    """The pooled embeddings' keys of ``ebc`` in the order of its tables, as a float EBC gives them (and the
    dense program takes them)."""
    return [name for names in get_embedding_names_by_table(ebc.embedding_bag_configs()) for name in names]


def pooled_in_order(pooled: KeyedTensor, keys: Sequence[str]) -> torch.Tensor:
    """``pooled``'s values (B, sum of dims) with its keys in the order of ``keys`` (:func:`table_order_keys`).

    torchrec's quant EBC groups its tables by pooling (every SUM table, then every MEAN one): where a MEAN table
    (a sequence field) comes before a SUM table, its columns come out elsewhere than the float EBC's.
    """
    if pooled.keys() == list(keys):
        return pooled.values()
    columns = _columns(tuple(pooled.keys()), tuple(pooled.length_per_key()), tuple(keys))  # (sum of dims,)
    return pooled.values().index_select(1, columns.to(pooled.values().device))  # (B, sum of dims)


@functools.lru_cache(maxsize=32)
def _columns(have: Tuple[str, ...], lengths: Tuple[int, ...], want: Tuple[str, ...]) -> torch.Tensor:
    """Column indices that take a KeyedTensor of keys ``have`` (widths ``lengths``) to the key order ``want``."""
    starts = dict(zip(have, [sum(lengths[:i]) for i in range(len(have))]))
    widths = dict(zip(have, lengths))
    return torch.cat([torch.arange(starts[key], starts[key] + widths[key]) for key in want])
