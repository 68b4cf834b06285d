"""What differs between the schema a vector file or run was made for and the current one.

Both record :meth:`DatasetSchema.fingerprinted <recsys_llm.data.schema.DatasetSchema.fingerprinted>`
beside the fingerprint; a fingerprint mismatch then names the fields and settings that differ
instead of two hashes.
"""

from typing import Any, Collection, Dict, List, Mapping, Optional, Sequence

from recsys_llm.data.schema import DatasetSchema


def _fields_by_name(recorded: Mapping[str, Any]) -> Dict[str, Dict[str, Any]]:
    return {str(field.get("name")): dict(field) for field in recorded.get("fields", []) if isinstance(field, Mapping)}


def _shown(field: Mapping[str, Any], key: str) -> str:
    """The setting as the message shows it: its repr, or ``unset`` (FieldSpec.to_dict leaves defaults out)."""
    return repr(field[key]) if key in field else "unset"


def schema_changes(recorded: Mapping[str, Any], schema: DatasetSchema,
                   settings: Optional[Collection[str]] = None) -> List[str]:
    """One line per difference between a recorded ``fingerprinted()`` mapping and ``schema``'s.

    Fields only one side has, the settings of a field that differ (``item_id: cardinality 1682 ->
    1700``; recorded first), the label, and the order of the fields both have. Empty when
    the two are the same, or ``recorded`` is no such mapping (written by an older version).
    ``settings`` names the field settings compared (e.g. :data:`~recsys_llm.data.schema.SEMANTIC_FIELD_KEYS`,
    what field vectors depend on); None compares them all.

    Example::

        schema_changes(provenance.schema_contents, DatasetSchema.load("data/ml-100k"))
        # ["field 'genre' only in the current schema", "item_id: cardinality 1682 -> 1700"]
    """
    if not isinstance(recorded, Mapping) or not isinstance(recorded.get("fields"), list):
        return []
    current = schema.fingerprinted()
    before, after = _fields_by_name(recorded), _fields_by_name(current)
    changes = [f"field {name!r} only in the recorded schema" for name in before if name not in after]
    changes += [f"field {name!r} only in the current schema" for name in after if name not in before]
    for name in (name for name in after if name in before):
        keys = sorted(key for key in set(before[name]) | set(after[name]) if settings is None or key in settings)
        changes += [f"{name}: {key} {_shown(before[name], key)} -> {_shown(after[name], key)}"
                    for key in keys if _shown(before[name], key) != _shown(after[name], key)]
    if recorded.get("label") != current["label"]:
        changes.append(f"label {recorded.get('label')!r} -> {current['label']!r}")
    common_before, common_after = [n for n in before if n in after], [n for n in after if n in before]
    if common_before != common_after:
        changes.append(f"field order {common_before} -> {common_after}")
    return changes


def schema_change_note(recorded: Any, schema: DatasetSchema, otherwise: str = "",
                       settings: Optional[Collection[str]] = None) -> str:
    """``" (change; change)"``: the :func:`schema_changes` of ``recorded`` (``settings``: the field settings
    compared, None: all) for a message, or ``otherwise`` when it names none (a record of an older version)."""
    changes = schema_changes(recorded, schema, settings)
    return f" ({'; '.join(changes)})" if changes else otherwise


def moved_hashed_text_fields(before: Sequence[str], after: Sequence[str], hashed_text: Collection[str]) -> List[str]:
    """``field 'query' (hashed text): position 6 -> 5`` for each field of ``hashed_text`` (whose ids hash its text
    with the field's position among all the fields, dense ones included, as the salt) that both field lists
    ``before`` and ``after`` hold at other positions: the same values would get other ids there."""
    return [f"field {name!r} (hashed text): position {before.index(name)} -> {after.index(name)}"
            for name in hashed_text if name in before and name in after and before.index(name) != after.index(name)]
