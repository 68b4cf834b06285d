"""Schema files: every key and value type is checked, errors name the file, the key and what was expected."""

import copy
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from recsys_llm.data.schema import SCHEMA_KEYS, DatasetSchema, FieldSpec, SchemaError

BASE = {
    "name": "shop",
    "label": "clicked",
    "fields": [
        {"name": "user", "kind": "sparse", "cardinality": 100},
        {"name": "cats", "kind": "sequence", "cardinality": 10, "max_length": 3},
        {"name": "price", "kind": "dense"},
    ],
}


def _write(tmp_path, raw, name="shop.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw) if name.endswith(".yaml") else json.dumps(raw))
    return str(path)


def _with_field(index, **values):
    raw = copy.deepcopy(BASE)
    raw["fields"][index].update(values)
    return raw


class TestFieldValueTypes:
    @pytest.mark.parametrize(
        "index, values, message",
        [
            (0, {"hashed": "false"}, r"field 'user': hashed='false': expected true or false, got a str"),
            (1, {"max_length": "3"}, r"field 'cats': max_length='3': expected an integer >= 0, got a str"),
            (1, {"max_length": -1}, r"field 'cats': max_length=-1: expected an integer >= 0"),
            (0, {"cardinality": "201"}, r"field 'user': cardinality='201': expected an integer >= 1 .*got a str"),
            (0, {"cardinality": 201.5}, r"field 'user': cardinality=201\.5: expected an integer >= 1 .*got a float"),
            (0, {"cardinality": True}, r"field 'user': cardinality=True: expected an integer >= 1 .*got a bool"),
            (0, {"cardinality": 0}, r"field 'user': cardinality=0: expected an integer >= 1"),
            (0, {"embedding_dim": "8"}, r"field 'user': embedding_dim='8': expected an integer >= 1, got a str"),
            (0, {"embedding_dim": 0}, r"field 'user': embedding_dim=0: expected an integer >= 1"),
            (0, {"description": 7}, r"field 'user': description=7: expected a string, got an int"),
            (0, {"value_text": ["a"]}, r"field 'user': value_text=\['a'\]: expected a non-empty string or null"),
            (2, {"kind": "dens"}, r"field 'price': kind='dens': expected one of sparse, dense, sequence"),
            # its table t_user.id is a torch module name, which may not hold a '.': prepared, then never trained
            (0, {"name": "user.id"}, r"field 'user\.id': name='user\.id': a sparse field's name may not contain '\.'"),
            (1, {"name": "cats.top"}, r"field 'cats\.top': name='cats\.top': a sequence field's name may not contain"),
        ],
    )
    def test_bad_value_names_file_field_and_expected_type(self, tmp_path, index, values, message):
        path = _write(tmp_path, _with_field(index, **values))
        with pytest.raises(SchemaError, match=r"shop\.yaml: " + message):
            DatasetSchema.load(path)

    def test_yaml_exponent_read_as_a_string_is_refused_with_a_hint(self, tmp_path):
        path = tmp_path / "shop.yaml"
        path.write_text("label: clicked\nfields:\n  - {name: user, kind: sparse, cardinality: 1e2}\n")
        with pytest.raises(SchemaError, match=r"shop\.yaml: field 'user': cardinality='1e2'.*write 100"):
            DatasetSchema.load(str(path))

    def test_a_name_that_is_no_string_is_refused(self):
        with pytest.raises(SchemaError, match=r"field name 3: expected a non-empty string, got an int"):
            FieldSpec(3)
        with pytest.raises(SchemaError, match=r"field name '': expected a non-empty string, got an empty string$"):
            FieldSpec("")  # was 'got a str'

    def test_a_dense_field_may_have_a_dot_in_its_name(self):
        assert FieldSpec("price.eur", "dense").name == "price.eur"  # no table: no module name

    def test_valid_values_load_and_numpy_ints_are_plain_ints(self, tmp_path):
        import numpy as np

        schema = DatasetSchema.load(_write(tmp_path, _with_field(0, hashed=True, embedding_dim=8), "s.json"))
        assert schema.field("user").hashed is True and schema.field("cats").max_length == 3
        spec = FieldSpec("x", "sequence", np.int64(5), max_length=np.int32(2))
        assert type(spec.cardinality) is int and type(spec.max_length) is int


class TestTopLevelKeys:
    @pytest.mark.parametrize("key, value, meant", [("nmae", "shop", "name"), ("rowkey", "event_id", "row_key"),
                                                   ("lable", "clicked", "label")])
    def test_unknown_top_level_key_is_refused_listing_the_allowed_ones(self, tmp_path, key, value, meant):
        raw = copy.deepcopy(BASE)
        raw[key] = value
        with pytest.raises(SchemaError, match=rf"shop\.yaml: unknown top-level keys \['{key}'\] "
                                              rf"\(did you mean '{key}' -> '{meant}'\?\); allowed: \['name', "):
            DatasetSchema.load(_write(tmp_path, raw))

    def test_every_key_a_saved_schema_writes_is_allowed(self, tmp_path):
        schema = DatasetSchema.load(_write(tmp_path, BASE, "s.json"))
        assert set(schema.to_dict()) <= set(SCHEMA_KEYS)

    @pytest.mark.parametrize(
        "key, value, message",
        [
            ("splits", ["train.parquet", "valid.parquet"],
             r"splits=\['train\.parquet', 'valid\.parquet'\]: expected a mapping of split name -> file.*got a list"),
            ("splits", {"train": 3}, r"splits\.train=3: expected a non-empty string"),
            ("extra_columns", "ts", r"extra_columns='ts': expected a list of column names, got a str"),
            ("extra_columns", ["ts", 4], r"extra_columns\[1\]=4: expected a non-empty string"),
            ("label", 1, r"label=1: expected a non-empty string, got an int"),
            ("row_key", ["a"], r"row_key=\['a'\]: expected a non-empty string or null"),
            ("name", "", r"name='': expected a non-empty string, got an empty string"),
            ("fields", {"user": {}}, r"fields: expected a list of field mappings, got a dict"),
        ],
    )
    def test_bad_top_level_value_names_file_key_and_expected_type(self, tmp_path, key, value, message):
        raw = copy.deepcopy(BASE)
        raw[key] = value
        with pytest.raises(SchemaError, match=r"shop\.yaml: " + message):
            DatasetSchema.load(_write(tmp_path, raw))

    @pytest.mark.parametrize("split", ["../../victim", "/tmp/victim", "sub/train", "a\\b", "..", ".hidden", "x\0"])
    def test_a_split_name_that_is_a_path_is_refused(self, tmp_path, split):
        # commands write <out>/<split>.parquet: a crafted split name must not reach outside <out>
        raw = dict(copy.deepcopy(BASE), splits={"train": "train.parquet", split: "test.parquet"})
        with pytest.raises(SchemaError, match=r"shop\.yaml: splits key .*: expected a plain split name"):
            DatasetSchema.load(_write(tmp_path, raw))
        with pytest.raises(SchemaError, match=r"schema 't': splits key .*: expected a plain split name"):
            DatasetSchema("t", [FieldSpec("user", "sparse", 3)], splits={split: "test.parquet"})

    def test_split_files_may_still_lie_elsewhere(self, tmp_path):
        # the files a split reads may be anywhere (relocated copies point back at the originals)
        raw = dict(copy.deepcopy(BASE), splits={"train": "../data/train.parquet", "test": "/data/test.parquet"})
        schema = DatasetSchema.load(_write(tmp_path, raw))
        assert schema.split_path("test") == "/data/test.parquet"

    def test_a_null_row_key_means_none(self, tmp_path):
        raw = dict(copy.deepcopy(BASE), row_key=None)
        assert DatasetSchema.load(_write(tmp_path, raw)).row_key is None


def test_a_missing_or_damaged_value_text_file_is_named_with_its_field(tmp_path) -> None:
    from recsys_llm.data.schema import DatasetSchema, FieldSpec, SchemaError

    schema = DatasetSchema("t", [FieldSpec("genre", "sparse", 3, value_text="text/genre.parquet")], root=str(tmp_path))
    with pytest.raises(SchemaError, match=r"genre\.parquet: value-text file of field 'genre' not found"):
        schema.load_value_text("genre")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "genre.parquet").write_bytes(b"not parquet")
    with pytest.raises(SchemaError, match="value-text file of field 'genre' is not a readable Parquet file"):
        schema.load_value_text("genre")


class TestFileContent:
    def test_a_yaml_key_written_twice_is_refused_naming_its_path_and_both_lines(self, tmp_path):
        path = tmp_path / "shop.yaml"
        path.write_text("label: clicked\nfields:\n  - name: user\n    cardinality: 100\n    cardinality: 10\n")
        with pytest.raises(SchemaError, match=r"shop\.yaml: not valid YAML: key 'fields\[0\]\.cardinality' is written "
                                              r"twice, on line 4 and line 5; expected each key once"):
            DatasetSchema.load(str(path))

    def test_a_json_key_written_twice_is_refused(self, tmp_path):
        path = tmp_path / "shop.json"
        path.write_text('{"label": "clicked", "label": "bought", "fields": []}')
        with pytest.raises(SchemaError, match=r"shop\.json: not valid JSON: key 'label' is written twice"):
            DatasetSchema.load(str(path))

    def test_a_parquet_file_given_as_the_schema_is_named_as_data(self, tmp_path):
        """``score --data data/mine/test.parquet``, or --schema and --input swapped: it was called not UTF-8."""
        path = tmp_path / "test.parquet"
        pq.write_table(pa.table({"user_id": [1, 2]}), str(path))
        with pytest.raises(SchemaError, match=r"test\.parquet: a Parquet data file, not a schema; expected a schema "
                                              r"file \(JSON or YAML\) or the prepared data's directory"):
            DatasetSchema.load(str(path))

    def test_a_file_that_is_not_utf8_is_named(self, tmp_path):
        path = tmp_path / "shop.yaml"
        path.write_bytes(b"name: caf\xe9\nfields: []\n")
        with pytest.raises(SchemaError, match=r"shop\.yaml: byte 0xe9 at offset 9 is not UTF-8; expected a UTF-8 text "
                                              r"file"):
            DatasetSchema.load(str(path))


def test_a_column_listed_as_field_and_extra_column_is_refused() -> None:
    fields = [FieldSpec("user_id", "sparse", 10), FieldSpec("day", "sparse", 7)]
    with pytest.raises(SchemaError, match=r"extra_columns \['day', 'label'\] are also fields or the label"):
        DatasetSchema("t", fields, extra_columns=["timestamp", "day", "label"])
    DatasetSchema("t", fields, extra_columns=["timestamp"])


@pytest.mark.parametrize("edit, message", [
    ({"fields": BASE["fields"] + [{"name": "user", "kind": "dense"}]},
     r"schema 'shop': duplicate field names \['user'\]"),
    ({"label": "price"}, r"schema 'shop': the label 'price' is also listed as an input field"),
], ids=["field twice", "label as field"])
def test_a_column_read_twice_by_the_schema_is_refused_naming_the_file_and_column(tmp_path, edit, message) -> None:
    """A field listed twice (or the label also listed as a field) reads one column as two inputs: the second
    spec silently replaced the first, or the label was fed to the model as a feature."""
    with pytest.raises(SchemaError, match=r"shop\.yaml: " + message):
        DatasetSchema.load(_write(tmp_path, {**copy.deepcopy(BASE), **edit}))


def test_an_extra_column_listed_twice_is_refused(tmp_path) -> None:
    """``extra_columns: [ts, ts]`` was taken and written into the prepared data's schema.json as it was."""
    fields = [FieldSpec("user_id", "sparse", 10)]
    with pytest.raises(SchemaError, match=r"schema 't': extra_columns lists \['ts'\] more than once; list each "
                                          r"column once"):
        DatasetSchema("t", fields, extra_columns=["ts", "day", "ts"])
    path = tmp_path / "schema.json"
    path.write_text(json.dumps({"name": "t", "extra_columns": ["ts", "ts"], "fields": [{"name": "user_id",
                                "kind": "sparse", "cardinality": 10}]}))
    with pytest.raises(SchemaError, match=r"extra_columns lists \['ts'\] more than once"):
        DatasetSchema.load(str(path))


def test_a_count_beyond_int64_and_a_hashed_field_of_one_row_are_refused_naming_the_field() -> None:
    """cardinality 10**23 was written into schema.json (a data set no table can hold) or crashed the hashing with
    an OverflowError; hashed with cardinality 1 failed in the hashing without naming the field."""
    with pytest.raises(SchemaError, match=r"field 'query': cardinality=100000000000000000000000: expected an integer "
                                          r"of at most 2\*\*63 - 1"):
        FieldSpec("query", "sparse", 10**23, hashed=True)
    with pytest.raises(SchemaError, match=r"field 'tags': max_length=9223372036854775808: expected an integer of at "
                                          r"most 2\*\*63 - 1"):
        FieldSpec("tags", "sequence", 10, max_length=2**63)
    with pytest.raises(SchemaError, match=r"field 'query': cardinality=1 with hashed=true: expected at least 2 \(id 0 "
                                          r"is kept for a missing value"):
        FieldSpec("query", "sparse", 1, hashed=True)
    assert FieldSpec("query", "sparse", 2**63 - 1, hashed=True).cardinality == 2**63 - 1


def test_a_key_of_another_kind_is_refused_as_a_sign_of_the_wrong_kind() -> None:
    """cardinality on a dense field and max_length on a sparse one were accepted and meant nothing."""
    with pytest.raises(SchemaError, match=r"field 'price': cardinality=100 on a dense field \(one float per row, no "
                                          r"ids\); a field of ids is kind: sparse"):
        FieldSpec("price", "dense", 100)
    with pytest.raises(SchemaError, match=r"field 'tags': max_length=3 on a sparse field \(one value per row\); a "
                                          r"field of several ids per row is kind: sequence"):
        FieldSpec("tags", "sparse", 10, max_length=3)


def test_a_schema_that_is_no_yaml_is_one_line(tmp_path) -> None:
    """PyYAML's message spans lines (the text, a caret): the CLI's one-line error was several."""
    from recsys_llm.data.schema import load_raw

    path = tmp_path / "shop.yaml"
    path.write_text("name: [unclosed\nfields: 3\n")
    with pytest.raises(SchemaError, match=r"shop\.yaml: not valid YAML: while parsing a flow sequence") as caught:
        load_raw(str(path))
    assert "\n" not in str(caught.value)


def test_schema_built_in_python_refuses_strings_for_lists_and_mappings():
    """DatasetSchema("n", fields, "label", "row_id", "train") took "train" as splits t, r, a, i, n; extra_columns="ts"
    was kept as letters."""
    fields = [FieldSpec(name="item", kind="sparse", cardinality=4)]
    with pytest.raises(SchemaError, match="splits must be a mapping, got 'train'"):
        DatasetSchema("n", fields, "label", "row_id", "train")
    with pytest.raises(SchemaError, match="ids must be a mapping"):
        DatasetSchema("n", fields, ids=["item"])
    with pytest.raises(SchemaError, match="extra_columns must be a list, got the string 'ts'"):
        DatasetSchema("n", fields, extra_columns="ts")
    with pytest.raises(SchemaError, match="fields must be a list, got the string"):
        DatasetSchema("n", "item")
    with pytest.raises(SchemaError, match="row_key must be a column name or None"):
        DatasetSchema("n", fields, row_key=True)


def test_schema_built_in_python_takes_a_path_root_and_refuses_a_label_or_root_of_another_type(tmp_path):
    """A pathlib.Path root is kept as its string (os.path.join takes it); a label or root of another type is named."""
    fields = [FieldSpec(name="item", kind="sparse", cardinality=4)]
    schema = DatasetSchema("n", fields, splits={"train": "train.parquet"}, root=tmp_path)
    assert schema.root == str(tmp_path) and isinstance(schema.root, str)
    assert schema.split_path("train") == str(tmp_path / "train.parquet")
    with pytest.raises(SchemaError, match="label must be a string, got 1"):
        DatasetSchema("n", fields, label=1)
    with pytest.raises(SchemaError, match="root must be a string, got 3"):
        DatasetSchema("n", fields, root=3)


@pytest.mark.usefixtures("ends_the_run_if_it_waits")  # a FIFO read would wait for good
def test_a_schema_file_that_is_a_fifo_is_refused_not_waited_on(tmp_path) -> None:
    """data.schema naming a named pipe: the read waited for a writer for good."""
    path = tmp_path / "schema.json"
    os.mkfifo(path)
    with pytest.raises(SchemaError, match=r"schema\.json: is a named pipe \(FIFO\), not a schema file"):
        DatasetSchema.load(str(path))
