"""``raw_value_ids`` gives raw values the ids ``prepare tabular`` wrote for them, in every way it makes ids."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys_llm.data.schema import DatasetSchema, SchemaError
from recsys_llm.data.tabular import TabularConfig, prepare_tabular
from recsys_llm.data.tabular.raw_values import prepared_plan, raw_value_ids
from recsys_llm.data.tabular.tokens import with_lookup
from recsys_llm.data.validation import DataError

SCHEMA = """
name: shop
label: clicked
fields:
  - {name: user, kind: sparse, cardinality: 50}
  - {name: city, kind: sparse, cardinality: 10, description: "city of the shopper"}
  - {name: query, kind: sparse, cardinality: 97, hashed: true, description: "search query"}
  - {name: item, kind: sparse, cardinality: 7, hashed: true}
  - {name: code, kind: sparse, cardinality: 40, hashed: true}
  - {name: tags, kind: sequence, cardinality: 10, max_length: 4}
  - {name: price, kind: dense}
"""


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A CSV whose fields take every way (vocabulary, hashed text, integer ids, folded integer ids, --hash)."""
    rng = np.random.default_rng(0)
    rows = 120
    cities = ["Paris", " Lyon", "Nice", "", "Lille"]
    queries = ["red shoes", "bag", "", "blue hat", "NA"]
    tags = ["a|b", "", "c", "b| a|d", "d|NA"]
    lines = ["user,city,query,item,code,tags,price,clicked"]
    for row in range(rows):
        user = "NA" if row % 17 == 0 else str(int(rng.integers(0, 50)))
        lines.append(",".join([user, cities[row % 5], queries[row % 4 + (row % 3 == 0)], str(int(rng.integers(0, 10**6))),
                               str(int(rng.integers(0, 1000))), tags[row % 5], f"{rng.random():.3f}",
                               str(int(rng.integers(0, 2)))]))
    folder = tmp_path_factory.mktemp("shop")
    (folder / "shop.csv").write_text("\n".join(lines) + "\n")
    (folder / "shop.yaml").write_text(SCHEMA)
    schema = prepare_tabular(str(folder / "shop.csv"), str(folder / "shop.yaml"), str(folder / "out"),
                             TabularConfig(hash_fields=["code"]))
    raw = pa.csv.read_csv(str(folder / "shop.csv"), convert_options=pa.csv.ConvertOptions(
        column_types={name: pa.string() for name in ("user", "city", "query", "item", "code", "tags")},
        strings_can_be_null=False))
    written = pa.concat_tables([pq.read_table(schema.split_path(s)) for s in schema.splits]).sort_by("row_id")
    return schema, raw, written


def test_the_prepared_schema_records_each_fields_way(prepared):
    schema, _, _ = prepared
    assert schema.ids == {"user": "integer", "city": "vocabulary", "query": "hashed_text", "item": "integer",
                          "code": "hashed_text", "tags": "vocabulary"}
    assert DatasetSchema.load(schema.root).ids == schema.ids


@pytest.mark.parametrize("field", ["user", "city", "query", "item", "code"])
def test_raw_values_get_the_ids_prepare_wrote(prepared, field):
    schema, raw, written = prepared
    ids, lengths = raw_value_ids(schema, field, raw.column(field).to_pylist())
    assert lengths is None and ids.dtype == np.int64
    np.testing.assert_array_equal(ids, written.column(field).to_numpy())


def test_sequence_values_get_the_ids_prepare_wrote(prepared):
    schema, raw, written = prepared
    flat, lengths = raw_value_ids(schema, "tags", raw.column("tags").to_pylist())
    column = written.column("tags").combine_chunks()
    np.testing.assert_array_equal(lengths, pa.compute.list_value_length(column).to_numpy())
    np.testing.assert_array_equal(flat, column.flatten().to_numpy())
    as_lists, list_lengths = raw_value_ids(schema, "tags", [["b", " a"], None, ["d", "", "z"], ["z"], ["z", "c"]])
    vocabulary = schema.load_value_text("tags").column("text").to_pylist()
    # a token the vocabulary lacks ("z") is dropped as a missing one is: training never saw id 0 in a bag
    np.testing.assert_array_equal(list_lengths, [2, 0, 1, 0, 1])
    assert as_lists.tolist() == [vocabulary.index("b"), vocabulary.index("a"), vocabulary.index("d"),
                                 vocabulary.index("c")]


def test_python_values_and_unknown_ones(prepared):
    schema, _, _ = prepared
    vocabulary = schema.load_value_text("city").column("text").to_pylist()
    ids, _ = raw_value_ids(schema, "city", ["Paris", " Lyon ", None, "Berlin"])
    assert ids.tolist() == [vocabulary.index("Paris"), vocabulary.index("Lyon"), 0, 0]
    assert raw_value_ids(schema, "item", [3, 10**6 + 3, None])[0].tolist() == [3, (10**6 + 3) % 7, 0]


def test_missing_empty_mixed_and_unsigned_values(prepared):
    """Values as a caller has them, not as a typed column: all missing (pyarrow infers no type), none, several
    Python types in one field (read as their texts, as a CSV holds them), integers beyond int64 (a uint64 column's,
    folded as the int64 of the same bits)."""
    schema, _, _ = prepared
    assert raw_value_ids(schema, "city", [None, None])[0].tolist() == [0, 0]
    ids, lengths = raw_value_ids(schema, "city", [])
    assert ids.shape == (0,) and ids.dtype == np.int64 and lengths is None
    flat, lengths = raw_value_ids(schema, "tags", [None, None])
    assert flat.size == 0 and lengths.tolist() == [0, 0]
    assert raw_value_ids(schema, "user", [3, "4", None])[0].tolist() == [3, 4, 0]
    assert raw_value_ids(schema, "code", [5, "5"])[0].tolist() == raw_value_ids(schema, "code", ["5", "5"])[0].tolist()
    assert raw_value_ids(schema, "item", [2**64 - 1])[0].tolist() == [(2**64 - 1 - 2**64) % 7]
    flat, lengths = raw_value_ids(schema, "tags", [[2**64 - 1]])  # a token the vocabulary lacks: dropped
    assert flat.size == 0 and lengths.tolist() == [0]


def test_a_value_gets_its_id_whatever_the_other_values_of_the_call(prepared):
    """A value's id does not depend on its batch: a whole float is its digits and NaN missing, alone (a float
    column) or beside strings (their texts); only empty or missing lists of a sequence field are no error."""
    schema, _, _ = prepared
    for field, value in (("city", 3.0), ("query", 42.0), ("code", 7.0), ("user", 3.0), ("query", float("nan"))):
        alone = raw_value_ids(schema, field, [value])[0].tolist()
        assert raw_value_ids(schema, field, [value, "7"])[0].tolist()[:1] == alone, (field, value)
    assert raw_value_ids(schema, "query", [float("nan"), "x"])[0].tolist()[0] == 0
    assert raw_value_ids(schema, "user", [np.int64(3), "4", np.float32(5.0)])[0].tolist() == [3, 4, 5]
    for rows in ([[], []], [[], None], [[None]]):
        flat, lengths = raw_value_ids(schema, "tags", rows)
        assert flat.size == 0 and lengths.tolist() == [0] * len(rows)
    big = raw_value_ids(schema, "query", [10**20])[0]
    assert big.tolist() == raw_value_ids(schema, "query", [str(10**20)])[0].tolist()
    with pytest.raises(DataError, match=r"raw values of field 'user', row 1: '18446744073709551615' is beyond int64"):
        raw_value_ids(schema, "user", [-1, 2**64 - 1])


def test_a_plan_built_once_with_its_lookup_gives_the_same_ids(prepared):
    """A served model builds each field's plan once, a vocabulary's with a token -> id dict (``with_lookup``): the
    ids are those the plan built at each call gives, for every way, known, unknown, missing and mixed values."""
    schema, raw, _ = prepared
    for field, values in (("city", ["Paris", " Lyon ", None, "Berlin", "", 3.0, "NA"]), ("user", [3, "4", None]),
                          ("query", ["red shoes", "zzz", None]), ("code", [5, "5"]),
                          ("tags", [["b", " a"], None, ["d", "", "z"], ["z"]])):
        plan = with_lookup(prepared_plan(schema, field))
        assert (plan.lookup is not None) == (schema.ids[field] == "vocabulary"), field
        for rows in (values, raw.column(field).to_pylist()):
            once, lengths_once = raw_value_ids(schema, field, rows, plan=plan)
            each, lengths_each = raw_value_ids(schema, field, rows)
            np.testing.assert_array_equal(once, each)
            assert once.dtype == np.int64
            assert (lengths_once is None and lengths_each is None) or lengths_once.tolist() == lengths_each.tolist()


def test_bad_values_and_fields_are_named(prepared):
    schema, _, _ = prepared
    with pytest.raises(DataError, match=r"raw values of field 'user'.*row 1.*50"):
        raw_value_ids(schema, "user", ["3", "77"])
    with pytest.raises(DataError, match=r"raw values of field 'item', row 1: 'bag' is not an integer id.*\(ids: integer\)"):
        raw_value_ids(schema, "item", ["3", "bag"])
    with pytest.raises(DataError, match=r"field 'tags', row 1: 'b\|c' is not a list, and other rows are"):
        raw_value_ids(schema, "tags", [["a"], "b|c"])
    with pytest.raises(DataError, match=r"field 'city', row 0: 1.5 is not a whole number"):
        raw_value_ids(schema, "city", [1.5, "Paris"])
    with pytest.raises(DataError, match=r"field 'city', row 0: True \(bool\)"):
        raw_value_ids(schema, "city", [True, "Paris"])
    with pytest.raises(TypeError, match=r"field 'city': expected one value per row .* got one str 'Paris'"):
        raw_value_ids(schema, "city", "Paris")
    with pytest.raises(ValueError, match="field 'price' of schema 'shop' is dense"):
        raw_value_ids(schema, "price", [1.0])
    schema.ids.pop("city")
    try:
        with pytest.raises(ValueError, match=r"does not record how field 'city'.*prepare tabular"):
            raw_value_ids(schema, "city", ["Paris"])
    finally:
        schema.ids["city"] = "vocabulary"


def test_ids_in_a_schema_are_checked(tmp_path):
    fields = [{"name": "u", "kind": "sparse", "cardinality": 5}, {"name": "p", "kind": "dense"}]
    with pytest.raises(SchemaError, match=r"ids.u: expected one of \['vocabulary', 'hashed_text', 'integer'\]"):
        DatasetSchema.from_dict({"fields": fields, "ids": {"u": "hash"}})
    with pytest.raises(SchemaError, match=r"ids names 'p', which is not a sparse or sequence field"):
        DatasetSchema.from_dict({"fields": fields, "ids": {"p": "integer"}})
    with pytest.raises(SchemaError, match=r"ids=\['u'\]: expected a mapping"):
        DatasetSchema.from_dict({"fields": fields, "ids": ["u"]})
    with pytest.raises(SchemaError, match=r"ids.u is vocabulary, but field 'u' has no value_text"):
        DatasetSchema.from_dict({"fields": fields, "ids": {"u": "vocabulary"}})
    with pytest.raises(SchemaError, match=r"ids.u is hashed_text, but field 'u' is not hashed"):
        DatasetSchema.from_dict({"fields": fields, "ids": {"u": "hashed_text"}})


def test_prepare_tabular_refuses_ids_in_the_schema_it_reads(tmp_path):
    (tmp_path / "d.csv").write_text("u,clicked\n1,0\n2,1\n")
    (tmp_path / "s.yaml").write_text("label: clicked\nfields: [{name: u, kind: sparse, cardinality: 5}]\n"
                                     "ids: {u: integer}\n")
    with pytest.raises(SchemaError, match=r"s.yaml: ids is what prepare tabular writes .* --hash FIELD or --vocabulary"):
        prepare_tabular(str(tmp_path / "d.csv"), str(tmp_path / "s.yaml"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_export_id_ways_of_data_without_a_vocabulary_field(tmp_path):
    """Data of integer ids and dense values only (no value-text file to copy) still gets ids/schema.json:
    ``export`` of such a run failed on the missing ids/ directory."""
    from recsys_llm.serving.raw_ids import load_raw_id_ways, write_raw_id_ways

    lines = ["user,price,clicked"] + [f"{row % 9 + 1},{row / 10:.1f},{row % 2}" for row in range(30)]
    (tmp_path / "clicks.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "clicks.yaml").write_text(
        "name: clicks\nlabel: clicked\nfields:\n  - {name: user, kind: sparse, cardinality: 10}\n"
        "  - {name: price, kind: dense}\n")
    schema = prepare_tabular(str(tmp_path / "clicks.csv"), str(tmp_path / "clicks.yaml"), str(tmp_path / "out"),
                             TabularConfig())
    assert schema.ids == {"user": "integer"}
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    written = write_raw_id_ways(schema, str(artifact))
    assert written == ["ids/schema.json"]
    ways = load_raw_id_ways(str(artifact), written[0])
    ids, _ = raw_value_ids(ways, "user", ["3", None])
    assert ids.tolist() == [3, 0]
