import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys_llm.data.schema import DatasetSchema, FieldSpec
from recsys_llm.semantics.templates import PromptTemplates, distinct_values, field_text, select_fields, ssft_prompt


class TestTemplates:
    def test_ssft_prompt_is_alpaca_with_method_wording(self) -> None:
        prompt = ssft_prompt("shade 3", ["color", "city"], PromptTemplates())
        assert prompt.startswith("Below is an instruction that describes a task")
        assert "### Instruction:\nGiven a feature, answer which field it belongs to, choosing from the candidate set\n" in prompt
        assert "### Input:\nThe feature is: shade 3. The candidate set is: [color, city]\n" in prompt
        assert prompt.endswith("### Response:\n")

    def test_the_template_id_tells_every_template_apart(self) -> None:
        """template_id keys the encode cache and the vectors' provenance: a change of any one template, the number
        format of dense values included, is another id."""
        import dataclasses

        base = PromptTemplates()
        changed = dict(field="{name} - {description}", field_without_description="field {name}",
                       instruction="Name the field.", input="Value: {value}", prompt="{instruction} {input}",
                       number_format="{:.2f}")
        assert set(changed) == {f.name for f in dataclasses.fields(PromptTemplates)}
        ids = {base.template_id()} | {dataclasses.replace(base, **{k: v}).template_id() for k, v in changed.items()}
        assert len(ids) == 1 + len(changed)
        assert PromptTemplates().template_id() == base.template_id()

    def test_field_text_uses_description_or_name(self, tiny_schema: DatasetSchema) -> None:
        templates = PromptTemplates()
        assert field_text(tiny_schema.field("city"), templates) == "city: city of the user"
        assert field_text(tiny_schema.field("C1"), templates) == "C1"
        custom = PromptTemplates(field="Field {name} ({kind}) means {description}")
        assert field_text(tiny_schema.field("price"), custom) == "Field price (dense) means price paid in dollars"
        assert custom.template_id() != templates.template_id()

    def test_select_fields(self, tiny_schema: DatasetSchema) -> None:
        assert [f.name for f in select_fields(tiny_schema)] == ["color", "city", "user_id", "price"]
        assert len(select_fields(tiny_schema, include_without_description=True)) == 5

    def test_values_per_kind(self, tiny_schema: DatasetSchema) -> None:
        colors = distinct_values(tiny_schema, "color", 10, random.Random(0))
        assert len(colors) == 10 and len(set(colors)) == 10 and all(c.startswith("shade ") for c in colors)
        prices = distinct_values(tiny_schema, "price", 500, random.Random(0))
        assert len(prices) == 100 and "12.5" in prices  # distinct values of the train split, formatted
        ids = distinct_values(tiny_schema, "user_id", 20, random.Random(0))
        assert len(set(ids)) == 20 and {int(i) for i in ids} <= {(7 * i) % 300 for i in range(200)}  # ids of the data
        assert distinct_values(tiny_schema, "color", 10, random.Random(0)) == colors  # seeded

    def test_the_missing_id_is_no_value_of_a_field(self, tiny_schema: DatasetSchema) -> None:
        """Id 0 is the missing value of every prepared field ("unknown", the same text in each): sampled as a value,
        SSFT taught the first field with that text to own it and held it out as a "value" to retrieve."""
        texts = ["unknown"] + [f"shade {i}" for i in range(1, 4)]
        pq.write_table(pa.table({"id": pa.array(range(4), pa.int64()), "text": texts}), tiny_schema.value_text_path("color"))
        assert sorted(distinct_values(tiny_schema, "color", 10, random.Random(0))) == ["shade 1", "shade 2", "shade 3"]
        ids = distinct_values(tiny_schema, "user_id", 300, random.Random(0))
        assert sorted(int(i) for i in ids) == sorted({(7 * i) % 300 for i in range(200)} - {0})  # 0 is among the data's

    def test_values_differing_only_in_case_or_spacing_are_one_value(self, tiny_schema: DatasetSchema) -> None:
        """An uncased tokenizer (MiniLM's) reads "Comedy" and "COMEDY" as one text: SSFT could hold one out and
        train on the other, and count the retrieval of a value it had trained on as held out."""
        texts = ["unknown", "Comedy", "comedy", " COMEDY ", "Drama", "drama  noir", "Drama noir"]
        pq.write_table(pa.table({"id": pa.array(range(len(texts)), pa.int64()), "text": texts}),
                       tiny_schema.value_text_path("color"))
        values = distinct_values(tiny_schema, "color", 10, random.Random(0))
        assert sorted(values) == [" COMEDY ", "Drama", "Drama noir"]

    def test_value_texts_of_numbers_are_their_text(self, tiny_schema: DatasetSchema) -> None:
        """A value-text column of numbers (years) is read as text, as ELEC's row text reads it; it used to fail
        with AttributeError: 'int' object has no attribute 'strip'."""
        years = pa.table({"id": pa.array(range(100), pa.int64()), "text": pa.array(range(1900, 2000), pa.int64())})
        pq.write_table(years, tiny_schema.value_text_path("color"))
        colors = distinct_values(tiny_schema, "color", 10, random.Random(0))
        assert len(set(colors)) == 10 and all(1900 <= int(c) < 2000 for c in colors)

    @pytest.mark.parametrize("text_type", [pa.large_string(), pa.dictionary(pa.int32(), pa.string())]
                             + ([pa.string_view()] if hasattr(pa, "string_view") else []))  # pyarrow >= 16
    def test_value_texts_of_other_string_types_are_read(self, tiny_schema: DatasetSchema, text_type) -> None:
        """A value-text file rewritten by another tool with string_view texts failed in SSFT with pyarrow's
        "Function 'array_take' has no kernel matching input types (string_view, uint16)"."""
        texts = pa.array(["unknown"] + [f"shade {i}" for i in range(1, 4)]).cast(text_type)
        pq.write_table(pa.table({"id": pa.array(range(4), pa.int64()), "text": texts}),
                       tiny_schema.value_text_path("color"))
        assert sorted(distinct_values(tiny_schema, "color", 10, random.Random(0))) == ["shade 1", "shade 2", "shade 3"]

    @pytest.mark.skipif(not hasattr(pa, "string_view"), reason="pyarrow < 16 has no string_view")
    def test_string_view_texts_come_back_as_strings(self, tiny_schema: DatasetSchema) -> None:
        """load_value_text promises ``string`` (the type every reader's kernels take), not another string type."""
        texts = pa.array(["unknown", "shade 1"]).cast(pa.string_view())
        pq.write_table(pa.table({"id": pa.array(range(2), pa.int64()), "text": texts}),
                       tiny_schema.value_text_path("color"))
        table = tiny_schema.load_value_text("color")
        assert table.column("text").type == pa.string() and table.column("text").to_pylist() == ["unknown", "shade 1"]

    def test_dense_values_of_a_split_directory_read_its_parquet_files_only(self, tmp_path) -> None:
        """A split directory is its *.parquet files (data.parquet_files): a temp file a killed write left beside
        them is no data, and read as Parquet it failed with Arrow's "magic bytes not found"."""
        import os
        import shutil

        from tests.semantics.conftest import make_schema

        schema = make_schema(str(tmp_path / "data"))
        os.makedirs(tmp_path / "data" / "train")
        shutil.move(str(tmp_path / "data" / "train.parquet"), str(tmp_path / "data" / "train" / "part-0.parquet"))
        (tmp_path / "data" / "train" / "part-1.parquet.0123abcd.tmp").write_bytes(b"PAR1 cut short")
        schema = DatasetSchema(name=schema.name, fields=schema.fields, splits={"train": "train"}, root=schema.root)
        prices = distinct_values(schema, "price", 500, random.Random(0))
        assert len(prices) == 100 and "12.5" in prices


class TestPromptTemplateChecks:
    """Unknown placeholders are refused when the templates are made, not when a prompt is built."""

    @pytest.mark.parametrize("settings,message", [
        (dict(field="{descr}: {name}"), r"^PromptTemplates.field \(--field-template\) '\{descr\}: \{name\}': unknown "
                                        r"placeholder \{descr\}; use \{name\}, \{description\}, \{kind\}$"),
        (dict(field_without_description="{value}"),
         r"PromptTemplates.field_without_description .*unknown placeholder \{value\}"),
        (dict(input="The feature is {val}"),
         r"PromptTemplates.input .*unknown placeholder \{val\}; use \{value\}, \{fields\}"),
        (dict(input="Candidates: {fields}"), r"PromptTemplates.input .*needs the placeholder \{value\}"),
        (dict(prompt="{instruction}\n{inputs}"), r"PromptTemplates.prompt .*unknown placeholder \{inputs\}"),
        (dict(instruction="Choose from {fields}"), r"PromptTemplates.instruction .*unknown placeholder \{fields\}; "
                                                  r"it takes no placeholders"),
        (dict(field="{name"), r"PromptTemplates.field \(--field-template\) '\{name': not a str.format template"),
        # without the field's name or description every field's text, and so its vector, is the same
        (dict(field="name: description"), r"^PromptTemplates.field \(--field-template\) 'name: description': needs "
                                          r"\{name\} or \{description\}, or every field's text is the same; use "),
        (dict(field="{kind} field"), r"PromptTemplates.field \(--field-template\) '\{kind\} field': needs \{name\} "
                                     r"or \{description\}"),
        (dict(field_without_description="{description} {kind}"),
         r"PromptTemplates.field_without_description '\{description\} \{kind\}': needs the placeholder \{name\}"),
        (dict(number_format="{:d}"), r"PromptTemplates.number_format '\{:d\}': expected one positional field"),
        # no field at all formats every dense value to the same text (and so the same vector)
        (dict(number_format="value"), r"PromptTemplates.number_format 'value': expected one positional field"),
    ])
    def test_refused(self, settings, message) -> None:
        with pytest.raises(ValueError, match=message):
            PromptTemplates(**settings)

    def test_allowed(self) -> None:
        templates = PromptTemplates(field="{name!r} ({kind:>6}): {description}", input="{value} of [{fields}]",
                                    prompt="{input}\n", number_format="{:.2f}")
        assert ssft_prompt("3", ["a", "b"], templates) == "3 of [a, b]\n"


def test_ids_of_a_sequence_field_without_texts_are_the_ids_in_its_lists(tmp_path) -> None:
    pq.write_table(pa.table({"tags": pa.array([[3, 5], None, [], [5, 0, 9]], pa.list_(pa.int64())),
                             "label": pa.array([0, 1, 0, 1], pa.int64())}), str(tmp_path / "train.parquet"))
    schema = DatasetSchema(name="seq", fields=[FieldSpec("tags", "sequence", cardinality=1000, max_length=4,
                                                         description="tags")],
                           splits={"train": "train.parquet"}, root=str(tmp_path))
    assert sorted(distinct_values(schema, "tags", 10, random.Random(0))) == ["3", "5", "9"]  # not 0, the missing id


def test_ids_of_fields_without_texts_as_the_reader_gives_them(tmp_path) -> None:
    """A fixed-size list column (which the data checks accept for a sequence field) failed in pyarrow's unique; a
    hashed field's raw ids were shown, not the buckets the reader folds them into (some folding to 0, the missing id)."""
    hist = pa.FixedSizeListArray.from_arrays(pa.array([3, 5, 0, 5, 9, 9], pa.int64()), 3)
    pq.write_table(pa.table({"hist": hist, "h": pa.array([12, -1], pa.int64()),
                             "label": pa.array([0, 1], pa.int64())}), str(tmp_path / "train.parquet"))
    schema = DatasetSchema(name="seq", fields=[
        FieldSpec("hist", "sequence", cardinality=100, max_length=3, description="history"),
        FieldSpec("h", cardinality=10, hashed=True, description="hashed")],
        splits={"train": "train.parquet"}, root=str(tmp_path))
    assert sorted(distinct_values(schema, "hist", 10, random.Random(0))) == ["3", "5", "9"]
    assert sorted(distinct_values(schema, "h", 10, random.Random(0))) == ["2", "9"]  # 12 % 10, -1 % 10
