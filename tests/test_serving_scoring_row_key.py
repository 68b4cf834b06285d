"""``recsys-llm score --output`` on data whose row key has the name of a scores column."""

import dataclasses
import os

import pyarrow.parquet as pq
import pytest

from recsys_llm.data.parquet_files import resolve_paths
from recsys_llm.data.schema import DatasetSchema
from recsys_llm.data.synthetic import generate_synthetic
from recsys_llm.serving import ServedModel
from recsys_llm.serving.scoring import score_split
from tests.small_artifact import export_small_deepfm


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("scoring_row_key")
    data = str(root / "data")
    generate_synthetic(data, 600, seed=0)
    schema = DatasetSchema.load(data)
    artifact = str(root / "artifact")
    export_small_deepfm(schema, artifact, batch_size=64, steps=2)
    return schema, artifact


@pytest.mark.parametrize("row_key", ["label", "logit", "probability"])
def test_a_row_key_named_like_a_scores_column_is_refused_and_no_file_is_written(exported, tmp_path, row_key) -> None:
    """A row key named `logit` gave a file of two `logit` columns, the float one holding the row keys, which
    pyarrow's read_table refused ("Multiple matches for FieldRef.Name(logit)")."""
    schema, artifact = exported
    table = pq.read_table(resolve_paths(schema, "test")[0])
    names = {schema.row_key: row_key, schema.label: "clicked"}  # a label of another name: the row key may be `label`
    table = table.rename_columns([names.get(name, name) for name in table.column_names])
    split = str(tmp_path / "test.parquet")
    pq.write_table(table, split)
    renamed = dataclasses.replace(schema, row_key=row_key, label="clicked")
    served = ServedModel.load(artifact, trust_program=True)
    output = str(tmp_path / "scores.parquet")
    with pytest.raises(ValueError, match=rf"the data's row key column '{row_key}' has the name of a column the scores "
                                         "file writes"):
        score_split(served, renamed, split, batch_size=64, output=output, progress=False)
    assert not os.path.exists(output)
    report = score_split(served, renamed, split, batch_size=64, output=None, progress=False)  # metrics alone: fine
    assert report["rows"] == table.num_rows
