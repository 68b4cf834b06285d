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


def test_the_semantic_fingerprint_leaves_the_sizes_of_the_tables_out() -> None:
    """What one LLM vector per field depends on: each field's name, kind and description, their order, the label;
    not how many ids a table holds, how they are hashed or kept, nor the model's width."""
    from recsys_llm.data.schema import SEMANTIC_FIELD_KEYS

    base = _schema(FieldSpec("item_id", cardinality=10, description="the item"),
                   FieldSpec("tags", "sequence", cardinality=5, max_length=3), FieldSpec("price", "dense"))
    sized = _schema(FieldSpec("item_id", cardinality=99, hashed=True, description="the item", embedding_dim=4,
                              value_text="text/item.parquet"),
                    FieldSpec("tags", "sequence", cardinality=50, max_length=8), FieldSpec("price", "dense"))
    assert sized.fingerprint() != base.fingerprint() and sized.semantic_fingerprint() == base.semantic_fingerprint()
    assert schema_changes(base.fingerprinted(), sized, SEMANTIC_FIELD_KEYS) == []
    others = [
        _schema(FieldSpec("item", cardinality=10, description="the item"), *base.fields[1:]),
        _schema(FieldSpec("item_id", cardinality=10, description="an item"), *base.fields[1:]),
        _schema(FieldSpec("item_id", "sequence", cardinality=10, description="the item"), *base.fields[1:]),
        _schema(base.fields[1], base.fields[0], base.fields[2]),
        _schema(*base.fields, label="click"),
    ]
    assert len({base.semantic_fingerprint(), *(other.semantic_fingerprint() for other in others)}) == len(others) + 1
    kind = schema_changes(base.fingerprinted(), others[2], SEMANTIC_FIELD_KEYS)
    assert kind == ["item_id: kind 'sparse' -> 'sequence'"]
