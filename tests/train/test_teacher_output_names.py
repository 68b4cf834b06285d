"""``teacher-outputs`` on data whose own columns have the names of the teacher's columns."""

import pytest

from recsys_llm.data.schema import DatasetSchema, FieldSpec
from recsys_llm.train.teacher_outputs import check_teacher_columns_free


@pytest.mark.parametrize("where", ["dense field", "sparse field", "label", "row key"])
def test_a_field_label_or_row_key_named_like_a_teacher_column_is_refused_naming_it(where: str) -> None:
    """A dense field named teacher_logits had its values replaced by the teacher's logits in the copies, whose
    schema then failed to load (the column listed both as a field and as an extra column)."""
    fields = [FieldSpec("user", "sparse", 10)]
    label, row_key = "clicked", "row_id"
    if where == "dense field":
        fields.append(FieldSpec("teacher_logits", "dense"))
    elif where == "sparse field":
        fields.append(FieldSpec("teacher_representation", "sparse", 5))
    elif where == "label":
        label = "teacher_logits"
    else:
        row_key = "teacher_representation"
    schema = DatasetSchema("mine", fields, label=label, row_key=row_key)
    with pytest.raises(ValueError, match=r"schema 'mine' has a field, label or row key named 'teacher_(logits|"
                                         r"representation)', a column teacher-outputs writes"):
        check_teacher_columns_free(schema)


def test_data_with_other_names_and_an_earlier_teachers_extra_columns_passes() -> None:
    """Copies of copies (a teacher trained on teacher-outputs data) carry the columns as extra columns: replaced,
    not refused."""
    schema = DatasetSchema("mine", [FieldSpec("user", "sparse", 10), FieldSpec("teacher_logit", "dense")],
                           extra_columns=["teacher_logits", "teacher_representation"])
    check_teacher_columns_free(schema)
