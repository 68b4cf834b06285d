"""Raw values a serving process receives in other shapes than lists of strings: rows of a sequence field as NumPy
arrays (pandas' cells of a list column), columns that hold no rows in order (a dict, a set), dense values that are
no finite number, ids beyond 64 bits, and a request to an artifact without id ways. Each is served as the same rows
given as lists, or refused naming the field, the row and what was expected; none gives silently wrong ids."""

import json
import os
import re
import shutil
from typing import Dict, List

import numpy as np
import pytest
import torch
import yaml

from recsys_llm.data.schema import DatasetSchema
from recsys_llm.data.tabular import prepare_tabular
from recsys_llm.data.tabular.raw_values import raw_value_ids
from recsys_llm.data.validation import DataError
from recsys_llm.serving.served_model import ServedModel
from tests.small_artifact import export_small_deepfm, write_config_as_exported

SCHEMA = {
    "name": "shop",
    "label": "clicked",
    "fields": [
        {"name": "user", "kind": "sparse", "cardinality": 100, "description": "shopper id"},
        {"name": "city", "kind": "sparse", "cardinality": 10, "description": "city of the shopper"},
        {"name": "cats", "kind": "sequence", "cardinality": 8, "max_length": 3, "description": "product categories"},
        {"name": "price", "kind": "dense", "description": "price"},
    ],
}
CITIES = ["Paris", "Lyon", "Nice", "Lille"]
CATS = ["shoes", "bags", "hats", "coats", "socks"]
REQUEST = {"user": [3, 7], "city": ["Paris", "Lyon"], "cats": ["shoes|bags", ""], "price": [1.5, 2.5]}


def _prepared_and_exported(root, lines: List[str], schema: Dict[str, object]) -> Dict[str, str]:
    """``lines`` of CSV prepared by ``prepare tabular`` with ``schema`` under ``root``, and an artifact of a small
    DeepFM trained two steps on it: ``{"data": ..., "artifact": ...}``."""
    (root / "shop.csv").write_text("\n".join(lines) + "\n")
    with open(root / "shop.yaml", "w") as handle:
        yaml.safe_dump(schema, handle)
    data = str(root / "shop")
    prepare_tabular(str(root / "shop.csv"), str(root / "shop.yaml"), data)
    artifact = str(root / "artifact")
    export_small_deepfm(DatasetSchema.load(data), artifact, batch_size=64, steps=2)
    return {"data": data, "artifact": artifact}


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, str]:
    """A prepared tabular data set (integer-id, vocabulary, sequence and dense fields) and an artifact of a small
    DeepFM trained a few steps on it."""
    root = tmp_path_factory.mktemp("raw_edges")
    rng = np.random.default_rng(0)
    lines = ["user,city,cats,price,clicked"]
    for _ in range(200):
        cats = "|".join(CATS[j] for j in rng.choice(5, size=int(rng.integers(0, 4)), replace=False))
        lines.append(f"{int(rng.integers(0, 100))},{CITIES[int(rng.integers(0, 4))]},{cats},"
                     f"{rng.random():.3f},{int(rng.integers(0, 2))}")
    return _prepared_and_exported(root, lines, SCHEMA)


def test_rows_of_a_sequence_as_numpy_arrays_are_its_tokens(shop: Dict[str, str]) -> None:
    """pa.array of NumPy arrays of several dtypes (an empty row is float64) raised pyarrow's own
    ArrowNotImplementedError ("Unsupported numpy type float64"); a 2-d array of strings was refused as no string."""
    schema = DatasetSchema.load(shop["data"])
    as_lists = raw_value_ids(schema, "cats", [["shoes", "bags"], [], None])
    as_arrays = raw_value_ids(schema, "cats", [np.array(["shoes", "bags"]), np.array([]), None])
    assert [x.tolist() for x in as_arrays] == [x.tolist() for x in as_lists]
    assert as_lists[1].tolist() == [2, 0, 0]
    square = raw_value_ids(schema, "cats", np.array([["shoes", "bags"], ["hats", "socks"]]))
    assert [x.tolist() for x in square] == [x.tolist() for x in raw_value_ids(schema, "cats", ["shoes|bags",
                                                                                                "hats|socks"])]
    with pytest.raises(DataError, match=r"field 'cats', row 1: 'bags' is not a list, and other rows are"):
        raw_value_ids(schema, "cats", [np.array(["shoes"]), "bags"])


@pytest.mark.parametrize("values", [{"Paris": 1, "Lyon": 2}, {"Paris", "Lyon"}], ids=["dict", "set"])
def test_a_column_that_holds_no_rows_in_order_is_refused(shop: Dict[str, str], values) -> None:
    """A dict gave its keys' ids, a set its values' in the set's own order: ids that silently belonged to no row."""
    with pytest.raises(TypeError, match=rf"raw values of field 'city': expected one value per row in row order .*"
                                        rf"got a {type(values).__name__}, which holds no rows in order"):
        raw_value_ids(DatasetSchema.load(shop["data"]), "city", values)
    served = ServedModel.load(shop["artifact"], trust_program=True)
    with pytest.raises(ValueError, match=rf"raw_request: column 'price' is a {type(values).__name__}, which holds "
                                         r"no rows in order; expected a sequence of one raw value per row"):
        served.raw_request(dict(REQUEST, price={1.5, 2.5} if isinstance(values, set) else {1.5: 0, 2.5: 1}))


def test_an_id_beyond_64_bits_is_named_as_such(shop: Dict[str, str]) -> None:
    """2**64 alone was 'beyond int64 (beside a negative id, so not read as uint64)', beside no negative id."""
    schema = DatasetSchema.load(shop["data"])
    with pytest.raises(DataError, match=r"field 'user', row 1: '18446744073709551616' is beyond 64 bits \(expected "
                                        r"an int64 id, or a uint64 one where no id is negative\)"):
        raw_value_ids(schema, "user", [3, 2**64])
    with pytest.raises(DataError, match=r"row 0: '9223372036854775809' is beyond int64 \(beside a negative id"):
        raw_value_ids(schema, "user", [2**63 + 1, -1])


@pytest.mark.parametrize("price, row, shown", [
    ([1.5, float("nan")], 1, "nan"),
    (np.array([np.inf, 2.5]), 0, r"np.float64\(inf\)"),
    ([1e39, 2.5], 0, r"1e\+39"),  # beyond float32, the model's input dtype: inf
    ([2.5, 10**400], 1, "1" + "0" * 400),  # a Python int beyond float64: NumPy's OverflowError named no field
], ids=["nan", "inf array", "beyond float32", "int beyond float64"])
def test_a_dense_value_that_is_no_finite_number_is_named_by_field(shop: Dict[str, str], price, row, shown) -> None:
    """NaN and inf passed raw_request; predict then named 'dense_features row R, column C', not the field."""
    served = ServedModel.load(shop["artifact"], trust_program=True)
    with pytest.raises(ValueError, match=rf"raw_request: dense field 'price', row {row}: {shown} is not a finite "
                                         r"float32 number; expected a finite real number in every row"):
        served.raw_request(dict(REQUEST, price=price))


def test_a_request_to_an_artifact_without_id_ways_says_so_first(shop: Dict[str, str]) -> None:
    """raw_request to an artifact of data not prepared by `prepare tabular` named the columns it lacked, as if
    sending them would help; sent, raw_value_ids refused them anyway."""
    served = ServedModel.load(shop["artifact"], trust_program=True)
    served.raw_id_ways = None  # as an artifact of `prepare synthetic` / `criteo` / `movielens` data loads
    with pytest.raises(ValueError, match=r"raw_request: this artifact holds no way from raw values to ids "
                                         r"\(config\.json: raw_ids null\)"):
        served.raw_request({"price": [1.5]})


def test_the_rows_given_in_other_shapes_make_the_same_request(shop: Dict[str, str]) -> None:
    served = ServedModel.load(shop["artifact"], trust_program=True)
    dense, kjt = served.raw_request(REQUEST)
    other = {"user": np.array(REQUEST["user"], dtype=np.int32), "city": np.array(REQUEST["city"]),
             "cats": [np.array(["shoes", "bags"]), np.array([])], "price": np.array(REQUEST["price"])}
    dense_other, kjt_other = served.raw_request(other)
    assert dense_other.tolist() == dense.tolist() and dense.shape == (2, 1)
    assert kjt_other.values().tolist() == kjt.values().tolist()
    assert kjt_other.lengths().tolist() == kjt.lengths().tolist()
    assert served.predict(dense_other, kjt_other).tolist() == served.predict(dense, kjt).tolist()
    assert os.path.isdir(os.path.join(shop["artifact"], "ids"))


@pytest.mark.parametrize("price, shown", [(1.5, "float 1.5"), (None, "NoneType None")], ids=["a number", "None"])
def test_a_column_that_is_one_value_not_a_sequence_is_named(shop: Dict[str, str], price, shown: str) -> None:
    """A single value where a column of rows belongs is named by its column, as a single string is; ``len`` of it
    raised a TypeError that named no field."""
    served = ServedModel.load(shop["artifact"], trust_program=True)
    with pytest.raises(ValueError, match=rf"raw_request: column 'price' is {shown}; expected a sequence of one raw "
                                         r"value per row"):
        served.raw_request(dict(REQUEST, price=price))


def test_a_raw_requests_lengths_are_int32_for_every_feature(shop: Dict[str, str]) -> None:
    """A sequence's lengths come from ``raw_value_ids`` as int64; the KeyedJaggedTensor's lengths are int32 for every
    feature alike, as the docstring and INFERENCE.md's request have them."""
    served = ServedModel.load(shop["artifact"], trust_program=True)
    _, kjt = served.raw_request(REQUEST)
    assert kjt.lengths().dtype == torch.int32
    assert kjt["cats"].lengths().tolist() == [2, 0]


def test_an_id_beyond_64_bits_is_named_at_its_own_row_beside_the_lowest_int64(shop: Dict[str, str]) -> None:
    """-2**63 is an int64 id: only the id beyond 64 bits beside it is refused, at its own row."""
    with pytest.raises(DataError, match=r"field 'user', row 1: '18446744073709551616' is beyond 64 bits"):
        raw_value_ids(DatasetSchema.load(shop["data"]), "user", [-2**63, 2**64])


@pytest.fixture(scope="module")
def no_dense(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An artifact of a small DeepFM on prepared tabular data without dense fields."""
    root = tmp_path_factory.mktemp("raw_no_dense")
    rng = np.random.default_rng(1)
    lines = ["user,city,clicked"] + [f"{int(rng.integers(0, 100))},{CITIES[int(rng.integers(0, 4))]},"
                                     f"{int(rng.integers(0, 2))}" for _ in range(200)]
    schema = dict(SCHEMA, fields=[field for field in SCHEMA["fields"] if field["name"] in ("user", "city")])
    return _prepared_and_exported(root, lines, schema)["artifact"]


@pytest.mark.parametrize("recorded", [True, False], ids=["names recorded", "exported before names were recorded"])
def test_a_request_to_an_artifact_without_dense_fields_has_one_row_of_no_dense_values_per_row(
        no_dense: str, recorded: bool, tmp_path) -> None:
    """No dense field: (B, 0) dense features, one row per request row, served by ``predict``; an artifact that records
    no dense field names needs none (it has no dense feature to name)."""
    if not recorded:  # as an artifact exported before config.json held them
        artifact = str(tmp_path / "artifact")
        shutil.copytree(no_dense, artifact)
        with open(os.path.join(artifact, "config.json"), encoding="utf-8") as handle:
            config = json.load(handle)
        write_config_as_exported(os.path.join(artifact, "config.json"), dict(config, dense_feature_names=None))
        no_dense = artifact
    served = ServedModel.load(no_dense, trust_program=True)
    assert (served.dense_feature_names is None) is not recorded
    dense, kjt = served.raw_request({"user": [3, 7, 9], "city": ["Paris", None, "Nice"]})
    assert dense.shape == (3, 0) and dense.dtype == torch.float32
    assert served.predict(dense, kjt).shape == (3,)


@pytest.mark.usefixtures("ends_the_run_if_it_waits")  # a FIFO read would wait for good
def test_an_id_ways_file_that_is_no_file_is_named_as_what_it_is(shop: Dict[str, str], tmp_path) -> None:
    """A value-text file of the artifact's id ways (``ids/``) replaced by a named pipe: its digest check waited for
    a writer for good; a directory there was "file missing"."""
    artifact = shutil.copytree(shop["artifact"], str(tmp_path / "artifact"))
    with open(os.path.join(artifact, "config.json"), encoding="utf-8") as handle:
        names = [name for name in json.load(handle)["sha256"] if name.startswith("ids/") and name != "ids/schema.json"]
    target = os.path.join(artifact, names[0])
    os.remove(target)
    os.mkfifo(target)
    with pytest.raises(ValueError, match=rf"{re.escape(target)}: is a named pipe \(FIFO\), not a file"):
        ServedModel.load(artifact, trust_program=True)
