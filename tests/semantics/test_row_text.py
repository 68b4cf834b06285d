import dataclasses
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys_llm.data.schema import DatasetSchema, FieldSpec, SchemaError
from recsys_llm.semantics.row_text import RowTextConfig, RowTextRenderer


def make_schema(root: str) -> DatasetSchema:
    os.makedirs(os.path.join(root, "text"), exist_ok=True)
    pq.write_table(pa.table({"id": pa.array([0, 1, 2], pa.int64()), "text": ["Alice", "Bob", "Carl"]}),
                   os.path.join(root, "text", "user.parquet"))
    pq.write_table(pa.table({"id": pa.array([0, 1, 2], pa.int64()), "text": ["Drama", "Comedy", "Horror"]}),
                   os.path.join(root, "text", "genre.parquet"))
    return DatasetSchema("t", [
        FieldSpec("user_id", "sparse", 3, description="user name", value_text="text/user.parquet"),
        FieldSpec("item_id", "sparse", 5, description="item id"),
        FieldSpec("genres", "sequence", 3, description="genres", value_text="text/genre.parquet", max_length=3),
        FieldSpec("age", "dense", description="age"),
    ], root=root)


def rows() -> pa.Table:
    return pa.table({
        "user_id": pa.array([0, 2, 1, 5], pa.int64()),
        "item_id": pa.array([3, 3, 1, 0], pa.int64()),
        "genres": pa.array([[0, 1], [], [2], None], pa.list_(pa.int64())),
        "age": pa.array([1.23456, 2.0, None, 4.5], pa.float32()),
    })


class TestRowTextRenderer:
    def test_one_sentence_per_field(self, tmp_path):
        texts = RowTextRenderer(make_schema(str(tmp_path))).render(rows()).to_pylist()
        assert texts[0] == "user name is Alice. item id is 3. genres is Drama, Comedy. age is 1.235."
        assert texts[1] == "user name is Carl. item id is 3. genres is none. age is 2."
        assert texts[2] == "user name is Bob. item id is 1. genres is Horror. age is unknown."
        assert texts[3].startswith("user name is 5.")  # id without value text: the number

    def test_the_description_is_filled_in_after_the_value_too(self, tmp_path):
        """A template may name the field after its value: "{description}" is filled in on both sides of "{value}",
        not left as the placeholder."""
        config = RowTextConfig(fields=["user_id", "age"], template="{value} is the {description}.",
                               templates={"age": "{description} {value} ({description})."})
        texts = RowTextRenderer(make_schema(str(tmp_path)), config).render(rows()).to_pylist()
        assert texts[0] == "Alice is the user name. age 1.235 (age)."

    def test_a_null_id_is_written_unknown_as_a_null_dense_value_is(self, tmp_path):
        """A null sparse id, or a null id inside a list, made the whole row's text None (the LLM's tokenizer
        then failed on it), with a value-text file or without."""
        table = pa.table({
            "user_id": pa.array([None, 0], pa.int64()),
            "item_id": pa.array([1, None], pa.int64()),
            "genres": pa.array([[0, None], [None]], pa.list_(pa.int64())),
            "age": pa.array([1.0, None], pa.float32()),
        })
        texts = RowTextRenderer(make_schema(str(tmp_path))).render(table).to_pylist()
        assert texts == ["user name is unknown. item id is 1. genres is Drama, unknown. age is 1.",
                         "user name is Alice. item id is unknown. genres is unknown. age is unknown."]

    def test_the_texts_of_nulls_and_empty_sequences_are_settings(self, tmp_path):
        """`unknown` and `none` are our choices (METHODS.md asks such choices to be options); the defaults keep the
        fingerprint of earlier versions' vector files."""
        config = RowTextConfig(null_text="not given", empty_sequence_text="nothing")
        texts = RowTextRenderer(make_schema(str(tmp_path)), config).render(rows()).to_pylist()
        assert texts[1] == "user name is Carl. item id is 3. genres is nothing. age is 2."
        assert texts[2] == "user name is Bob. item id is 1. genres is Horror. age is not given."
        assert RowTextConfig().fingerprint() == RowTextConfig(null_text="unknown", empty_sequence_text="none").fingerprint()
        assert "null_text" not in RowTextConfig().fingerprint() and "not given" in config.fingerprint()
        # row_text.json and an interrupted adapt's checkpoint record the settings as before (a checkpoint of an
        # earlier version was refused as "made with other settings (row_text.null_text: None -> 'unknown')")
        assert sorted(RowTextConfig().recorded()) == ["dense_decimals", "fields", "list_separator", "missing_value",
                                                      "separator", "template", "templates"]
        assert config.recorded()["null_text"] == "not given" and RowTextConfig(**config.recorded()) == config

    def test_an_integer_dense_value_beyond_2_to_the_53_is_written_as_a_number(self, tmp_path):
        """An int64 dense column (training takes it, as float32) holding a value above 2**53 (a timestamp in
        nanoseconds) failed in Arrow's cast ('Integer value ... not in range'), naming neither field nor file."""
        table = pa.table({"age": pa.array([1_700_000_000_123_456_789, 7], pa.int64())})
        texts = RowTextRenderer(make_schema(str(tmp_path)), RowTextConfig(fields=["age"])).render(table).to_pylist()
        assert texts == ["age is 1.7000000001234568e+18.", "age is 7."]

    def test_a_sequence_is_written_up_to_its_max_length_as_training_reads_it(self, tmp_path):
        """A list longer than the field's max_length (prepare keeps it; training and serving read its first
        max_length ids) was written whole: the text named ids the model never sees, and a long one pushed the
        fields after it past --max-length tokens."""
        table = pa.table({"genres": pa.array([[2, 1, 0, 1, 2], [1], None], pa.list_(pa.int64()))})
        texts = RowTextRenderer(make_schema(str(tmp_path)), RowTextConfig(fields=["genres"])).render(table)
        assert texts.to_pylist() == ["genres is Horror, Comedy, Drama.", "genres is Comedy.", "genres is none."]

    def test_a_blank_value_text_is_an_id_without_value_text(self, tmp_path):
        """An empty or blank text in a value-text file (prepare accepts it) was written as it was: 'user name is .',
        a sentence without a value (SSFT's value sampling already skips such texts)."""
        schema = make_schema(str(tmp_path))
        pq.write_table(pa.table({"id": pa.array([0, 1, 2], pa.int64()), "text": ["", " \t", "Carl"]}),
                       os.path.join(str(tmp_path), "text", "user.parquet"))
        table = pa.table({"user_id": pa.array([0, 1, 2], pa.int64())})
        texts = RowTextRenderer(schema, RowTextConfig(fields=["user_id"])).render(table).to_pylist()
        assert texts == ["user name is 0.", "user name is 1.", "user name is Carl."]
        config = RowTextConfig(fields=["user_id"], missing_value="n/a")
        assert RowTextRenderer(schema, config).render(table).to_pylist()[:2] == ["user name is n/a.", "user name is n/a."]

    def test_a_description_is_written_without_surrounding_spaces_and_a_blank_one_is_the_name(self, tmp_path):
        """A YAML block description ('description: >' ends in a newline) was written as it was ('user name\\n is
        Alice.'), and a blank one gave ' is 3.'; LLaCTR's field text strips it and takes the name for a blank one."""
        schema = make_schema(str(tmp_path))
        schema.fields[0] = dataclasses.replace(schema.fields[0], description="user name\n")
        schema.fields[1] = dataclasses.replace(schema.fields[1], description="  ")
        texts = RowTextRenderer(schema, RowTextConfig(fields=["user_id", "item_id"])).render(rows()).to_pylist()
        assert texts[0] == "user name is Alice. item_id is 3."

    def test_a_uint64_id_above_2_to_the_63_of_a_hashed_field_is_written_as_its_number(self, tmp_path):
        """A hashed field's uint64 column (training folds its ids, those above 2**63 - 1 included) failed in
        Arrow's cast to int64 ('Integer value ... not in range'), naming neither field nor file."""
        schema = make_schema(str(tmp_path))
        for index in range(3):
            schema.fields[index] = dataclasses.replace(schema.fields[index], hashed=True)
        big = 2**64 - 1
        table = pa.table({"user_id": pa.array([big, 1], pa.uint64()), "item_id": pa.array([big, 3], pa.uint64()),
                          "genres": pa.array([[big, 2], [1]], pa.list_(pa.uint64()))})
        config = RowTextConfig(fields=["user_id", "item_id", "genres"])
        assert RowTextRenderer(schema, config).render(table).to_pylist() == [
            f"user name is {big}. item id is {big}. genres is {big}, Horror.",
            "user name is Bob. item id is 3. genres is Comedy.",
        ]

    def test_a_per_field_template_of_a_field_the_schema_lacks_is_refused_naming_it(self, tmp_path):
        """A per-field template under a misspelt field name ('user' for 'user_id') was never used, without a word:
        the field kept the default template."""
        config = RowTextConfig(templates={"user": "the user is {value}", "age": "aged {value}"})
        with pytest.raises(SchemaError, match=r"^row-text templates name \['user'\], no field of schema 't' "
                                              r"\(fields \['user_id', 'item_id', 'genres', 'age'\]\)"):
            RowTextRenderer(make_schema(str(tmp_path)), config)

    def test_a_value_ending_its_own_sentence_keeps_one_full_stop(self, tmp_path):
        schema = make_schema(str(tmp_path))
        pq.write_table(pa.table({"id": pa.array([0, 1, 2], pa.int64()), "text": ["Acme Inc.", "Help!", "a.b"]}),
                       os.path.join(str(tmp_path), "text", "user.parquet"))
        config = RowTextConfig(fields=["user_id", "item_id"], templates={"item_id": "{value}. is the item"})
        texts = RowTextRenderer(schema, config).render(rows()).to_pylist()
        assert texts[:3] == ["user name is Acme Inc. 3. is the item", "user name is a.b. 3. is the item",
                             "user name is Help! 1. is the item"]

    def test_the_fingerprint_does_not_depend_on_the_order_of_the_per_field_templates(self):
        one = RowTextConfig(templates={"b": "{value} b", "a": "{value} a"})
        other = RowTextConfig(templates={"a": "{value} a", "b": "{value} b"})
        assert one.fingerprint() == other.fingerprint()
        assert one.fingerprint() != RowTextConfig(templates={"a": "{value} a"}).fingerprint()
        assert RowTextConfig().fingerprint() == (  # as before, and as vector files of earlier versions record it
            "[('dense_decimals', 3), ('fields', None), ('list_separator', ', '), ('missing_value', None), "
            "('separator', ' '), ('template', '{description} is {value}.'), ('templates', {})]")

    def test_sliced_input_and_templates(self, tmp_path):
        config = RowTextConfig(fields=["genres", "user_id"], separator=" | ", missing_value="?",
                               templates={"user_id": "the user is called {value}"})
        texts = RowTextRenderer(make_schema(str(tmp_path)), config).render(rows().slice(2)).to_pylist()
        assert texts == ["genres is Horror. | the user is called Bob", "genres is none. | the user is called ?"]

    def test_bad_template_and_columns(self, tmp_path):
        schema = make_schema(str(tmp_path))
        with pytest.raises(SchemaError, match="exactly one"):
            RowTextRenderer(schema, RowTextConfig(template="{description}")).render(rows())
        with pytest.raises(SchemaError, match="lack columns"):
            RowTextRenderer(schema).render(rows().drop_columns(["age"]))

    def test_entity_text_first_row_per_id(self, tmp_path):
        renderer = RowTextRenderer(make_schema(str(tmp_path)))
        items = renderer.entity_text(rows(), "item_id", ["item_id", "genres"]).to_pylist()
        assert items == [
            {"id": 0, "text": "item id is 0. genres is none."},
            {"id": 1, "text": "item id is 1. genres is Horror."},
            {"id": 3, "text": "item id is 3. genres is Drama, Comedy."},
        ]
        users = renderer.entity_text(rows(), "user_id").column("text").to_pylist()
        assert users == ["user name is Alice.", "user name is Bob.", "user name is Carl.", "user name is 5."]

    def test_entity_text_of_fields_outside_the_row_text_fields_uses_their_value_text(self, tmp_path):
        """`semantics export --granularity entity --entity-fields` may name fields the LLM's row text (adapt
        --fields) leaves out: their ids were written as numbers, not as their value text."""
        renderer = RowTextRenderer(make_schema(str(tmp_path)), RowTextConfig(fields=["item_id"]))
        items = renderer.entity_text(rows(), "item_id", ["item_id", "genres"]).column("text").to_pylist()
        assert items == ["item id is 0. genres is none.", "item id is 1. genres is Horror.",
                         "item id is 3. genres is Drama, Comedy."]
        users = renderer.entity_text(rows(), "user_id").column("text").to_pylist()
        assert users == ["user name is Alice.", "user name is Bob.", "user name is Carl.", "user name is 5."]

    def test_an_entity_text_field_named_twice_is_refused_naming_it(self, tmp_path):
        """`--entity-fields item_id genres genres` failed, after the LLM had loaded, with pyarrow's KeyError
        ('Field "genres" exists 2 times in schema'); `--entity-fields item_id item_id` wrote the sentence twice."""
        renderer = RowTextRenderer(make_schema(str(tmp_path)))
        for fields, twice in ((["item_id", "genres", "genres"], "'genres'"), (["item_id", "item_id"], "'item_id'")):
            with pytest.raises(SchemaError, match=rf"^entity text fields .* \(semantics export --entity-fields\) "
                                                  rf"name {twice} more than once; name each field once$"):
                renderer.entity_text(rows(), "item_id", fields)


class TestRowTextConfig:
    """A template is filled by replacing {description} and {value}: any other {...} would reach the LLM."""

    @pytest.mark.parametrize("template", ["{descr} is {value}", "{description} is {value:.2f}", "{} is {value}"])
    def test_unknown_placeholders_are_refused_when_the_config_is_made(self, template):
        with pytest.raises(SchemaError, match=r"^row-text template '.*': unknown placeholder \{.*\}; "
                                              r"use \{description\} and \{value\}$"):
            RowTextConfig(template=template)

    @pytest.mark.parametrize("template", ["{description is {value}.", "{description} is {value}}.", "{{value}}"])
    def test_an_unmatched_brace_is_refused_when_the_config_is_made(self, template):
        """A placeholder missing a brace ('{description is {value}.') was taken: every row text began with the
        literal '{description is', sent to the LLM."""
        with pytest.raises(SchemaError, match=r"^row-text template '.*': unmatched '\{' or '\}' outside "
                                              r"\{description\} and \{value\}"):
            RowTextConfig(template=template)
        with pytest.raises(SchemaError, match=r"^row-text template for field 'age' "):
            RowTextConfig(templates={"age": template})

    def test_a_field_named_twice_is_refused_naming_it(self):
        """`semantics adapt --fields color color` failed in pyarrow's read ('Field "color" exists 2 times in
        schema'), which named neither the option nor the row text."""
        with pytest.raises(SchemaError, match=r"^row-text fields \['user_id', 'age', 'user_id'\] \(semantics adapt / "
                                              r"export --fields\) name 'user_id' more than once; name each field once$"):
            RowTextConfig(fields=["user_id", "age", "user_id"])

    def test_per_field_templates_and_replaced_configs_are_checked(self):
        with pytest.raises(SchemaError, match=r"row-text template for field 'age' '\{value\} \{unit\}': "
                                              r"unknown placeholder \{unit\}"):
            RowTextConfig(templates={"age": "{value} {unit}"})
        with pytest.raises(SchemaError, match="unknown placeholder {descr}"):
            dataclasses.replace(RowTextConfig(), template="{descr} is {value}")  # `semantics adapt --template`
        with pytest.raises(SchemaError, match="needs exactly one '{value}'"):
            RowTextConfig(template="{value} and {value}")
        assert RowTextConfig(template="the {description}: {value}!").template == "the {description}: {value}!"


def test_a_single_field_name_is_refused_not_read_letter_by_letter():
    from recsys_llm.semantics.row_text import check_entity_fields

    with pytest.raises(SchemaError, match=r"single string 'user_id'; pass \['user_id'\]"):
        RowTextConfig(fields="user_id")
    with pytest.raises(SchemaError, match=r"single string 'item_id'"):
        check_entity_fields("item_id")


def test_row_text_config_refuses_non_string_separators_and_a_fractional_dense_decimals():
    from recsys_llm.semantics.row_text import RowTextConfig

    with pytest.raises(ValueError, match=r"RowTextConfig.separator: expected a string, got None"):
        RowTextConfig(separator=None)
    with pytest.raises(ValueError, match=r"RowTextConfig.list_separator: expected a string, got 3"):
        RowTextConfig(list_separator=3)
    with pytest.raises(ValueError, match=r"RowTextConfig.dense_decimals must be an integer, got 2.5"):
        RowTextConfig(dense_decimals=2.5)
