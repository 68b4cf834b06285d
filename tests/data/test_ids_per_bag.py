"""``mean_ids_per_bag``: the mean ids per row of each sequence field, the planner's pooling factor."""

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys_llm.data.ids_per_bag import mean_ids_per_bag
from recsys_llm.data.schema import DatasetSchema, FieldKind, FieldSpec
from recsys_llm.data.validation import DataError

# a null list (empty), an empty list, lists of 1, 2 and 5 ids: the last cut to max_length 3 as the reader cuts it
TAGS = [None, [], [1], [1, 2], [1, 2, 3, 4, 5]]


def _schema(root: str, rows_per_group: int = 2) -> DatasetSchema:
    schema = DatasetSchema(name="lists", root=root, splits={"train": "train.parquet"}, row_key=None, fields=[
        FieldSpec("user_id", FieldKind.SPARSE, 10),
        FieldSpec("tags", FieldKind.SEQUENCE, 10, max_length=3),
        FieldSpec("history", FieldKind.SEQUENCE, 10),
        FieldSpec("price", FieldKind.DENSE)])
    table = pa.table({"user_id": pa.array(range(len(TAGS)), pa.int64()),
                      "tags": pa.array(TAGS, pa.list_(pa.int64())),
                      "history": pa.array([[1] * 4] * len(TAGS), pa.list_(pa.int64())),
                      "price": pa.array([1.0] * len(TAGS), pa.float32()),
                      "label": pa.array([0, 1, 0, 1, 0], pa.int64())})
    pq.write_table(table, os.path.join(root, "train.parquet"), row_group_size=rows_per_group)
    return schema


class TestMeanIdsPerBag:
    def test_every_sequence_field_has_its_mean_ids_per_row_cut_to_max_length(self, tmp_path) -> None:
        # tags: 0 + 0 + 1 + 2 + 3 ids over 5 rows; sparse and dense fields have none to measure
        assert mean_ids_per_bag(_schema(str(tmp_path)), "train") == {"tags": 6 / 5, "history": 4.0}

    def test_a_large_split_is_measured_on_row_groups_spread_over_it(self, tmp_path) -> None:
        schema = _schema(str(tmp_path), rows_per_group=1)  # 5 row groups of one row; at most 2 rows: groups 0, 3
        assert mean_ids_per_bag(schema, "train", max_rows=2) == {"tags": (0 + 2) / 2, "history": 4.0}

    def test_a_schema_without_sequence_fields_reads_nothing(self, tmp_path) -> None:
        schema = DatasetSchema(name="flat", root=str(tmp_path), splits={"train": "gone.parquet"},
                               fields=[FieldSpec("user_id", FieldKind.SPARSE, 10)])
        assert mean_ids_per_bag(schema, "train") == {}

    def test_a_missing_split_file_is_named(self, tmp_path) -> None:
        schema = _schema(str(tmp_path))
        os.remove(os.path.join(str(tmp_path), "train.parquet"))
        with pytest.raises(DataError, match="train.parquet: no such Parquet file"):
            mean_ids_per_bag(schema, "train")

    def test_a_split_without_rows_has_no_ids_per_bag(self, tmp_path) -> None:
        schema = _schema(str(tmp_path))
        empty = pq.read_table(os.path.join(str(tmp_path), "train.parquet")).slice(0, 0)
        pq.write_table(empty, os.path.join(str(tmp_path), "train.parquet"))
        assert mean_ids_per_bag(schema, "train") == {"tags": 0.0, "history": 0.0}

    def test_max_rows_of_one_reads_the_first_row_group_and_none_or_less_reads_all(self, tmp_path) -> None:
        schema = _schema(str(tmp_path), rows_per_group=1)  # rows 0..4 one a group: tags 0, 0, 1, 2, 3 ids
        assert mean_ids_per_bag(schema, "train", max_rows=1) == {"tags": 0.0, "history": 4.0}
        assert mean_ids_per_bag(schema, "train", max_rows=0) == {"tags": 6 / 5, "history": 4.0}
