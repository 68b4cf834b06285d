from recsys_llm.data.schema import DatasetSchema, FieldSpec
from recsys_llm.data.schema_changes import schema_changes


def _schema(*fields: FieldSpec, label: str = "label") -> DatasetSchema:
    return DatasetSchema(name="toy", fields=list(fields), label=label)


def test_each_difference_is_a_line_naming_the_field_and_setting() -> None:
    recorded = _schema(FieldSpec("user_id", cardinality=10, description="the user"),
                       FieldSpec("genre", cardinality=5), FieldSpec("price", "dense")).fingerprinted()
    current = _schema(FieldSpec("user_id", cardinality=12, description="the user"), FieldSpec("genre", cardinality=5),
                      FieldSpec("city", cardinality=3), label="click")
    assert schema_changes(recorded, current) == [
        "field 'price' only in the recorded schema",
        "field 'city' only in the current schema",
        "user_id: cardinality 10 -> 12",
        "label 'label' -> 'click'",
    ]


def test_a_setting_only_one_side_has_and_the_order_of_the_fields() -> None:
    recorded = _schema(FieldSpec("a", cardinality=3), FieldSpec("b", cardinality=3)).fingerprinted()
    current = _schema(FieldSpec("b", cardinality=3), FieldSpec("a", cardinality=3, hashed=True))
    assert schema_changes(recorded, current) == ["a: hashed unset -> True", "field order ['a', 'b'] -> ['b', 'a']"]


def test_the_same_schema_and_records_of_older_versions_give_nothing() -> None:
    schema = _schema(FieldSpec("a", cardinality=3))
    assert schema_changes(schema.fingerprinted(), schema) == []
    for older in (None, {}, {"fields": "a"}, []):
        assert schema_changes(older, schema) == []
