"""Bring your own data: any CSV/Parquet file + a schema file -> validated Parquet splits.

The user writes a schema file (JSON or YAML, the format of
:class:`~recsys_llm.data.schema.DatasetSchema`) naming the fields to use::

    name: shop-clicks
    label: clicked
    row_key: event_id                 # optional: a column of unique integers; without it rows are numbered as row_id
    extra_columns: [timestamp]
    fields:
      - {name: user, kind: sparse, cardinality: 50000, description: "shopper id"}
      - {name: city, kind: sparse, cardinality: 400, description: "city of the shopper"}
      - {name: query, kind: sparse, cardinality: 1000000, hashed: true, description: "search query"}
      - {name: categories, kind: sequence, cardinality: 300, max_length: 5, description: "product categories"}
      - {name: price, kind: dense, description: "price in euros"}

Columns are converted per field kind (values are taken as they are: no scaling):

* **sparse**: integer columns are ids (checked against ``cardinality``; folded with a
  modulo when ``hashed``, a ``uint64`` id above ``2**63 - 1`` included, folded as the int64 of the same
  64 bits, which is how a served model receives it). A floating column (pandas
  writes an integer column with a gap as float64) holds ids too: whole numbers, NaN or null for
  missing; another value is an error naming its row. Dictionary-encoded columns (pandas'
  ``category``) are read as their values. String columns holding only integers are parsed as ids (a
  column of mostly integers with a few other values is an error naming the first one, unless
  the field is listed in ``vocabulary_fields`` or hashed); other strings are hashed
  (``hashed: true``) or mapped through a vocabulary built from the data (ids ``1..V`` in
  sorted order, ``cardinality`` must be at least ``V + 1``), and the vocabulary is written as the field's value text: the strings become what the
  LLM methods read. Missing values get id 0; in a CSV, only an empty cell is missing
  (``TabularConfig.missing_tokens``), so ``NA`` or ``null`` are words like any other,
  except in a column of integer ids, where pyarrow's missing markers (``NA``, ``null``,
  ``NaN``, ...) are missing (R's ``write.csv`` writes ``NA``).
* **sequence**: list columns (Parquet) or strings joined by ``sequence_separator``
  (CSV, or a Parquet string column), tokens handled as for sparse fields, except that a missing
  token is dropped from its sequence, not given id 0: a null element of a list (of strings or of
  integers), an empty or blank string token, a missing-value marker among integer ids. A scalar
  column of numbers is no sequence column (an error).
* **dense**: numbers; NaN/inf/missing are errors unless ``fill_missing_dense`` is set.
* **value text**: a field's own ``value_text`` file (Parquet, columns ``id`` and ``text``) is checked
  before any row is read (integer ids, none null or repeated; UTF-8 text) and written with int64 ids
  and string text. Its text is keyed by the column's ids: a field with its own ``value_text`` whose
  column holds other strings (which a vocabulary would renumber), or is listed in ``vocabulary_fields``,
  is refused.
* **label**: 0/1 (or ``value > label_threshold`` when a threshold is set, e.g. ratings).
* **row key**: the column ``row_key`` names must exist and hold a unique integer per row;
  without ``row_key`` in the schema a ``row_id`` column of the data is used, else the rows
  are numbered ``0..N-1`` as ``row_id``.

Errors name CSV rows as ``data row R (line L if no blank line or multi-line cell precedes it)``:
``R`` counts data rows from 0, ``L`` counts lines from the header line 1 (the CSV reader skips
blank lines, and a quoted cell may span lines: either shifts ``L``).

Splits are random (seeded, stable per row) or time-ordered by ``split_by`` (rows
ranked by that column, ties in file order; rows keep file order inside a split). The split
column holds one sortable type: numbers, or ISO-8601 dates/timestamps (all with or all without
a zone offset); a text column of them is parsed, other text is an error naming the first such
cell, as text order is no time order (``"10" < "100" < "20"``, ``"12/31/2023" > "01/05/2024"``).
In a directory of Parquet files, every file must hold the columns, each of one token type (integer
ids or string tokens) in all files; a field listed in ``vocabulary_fields`` may mix them (every
value is then read as text). Reading is streamed in blocks; only the split column, the row keys (checked for repeats)
and the vocabularies are held in memory. The output is written whole or not at all (a failed run keeps an earlier one).
"""
from recsys_llm.data.tabular.config import TabularConfig
from recsys_llm.data.tabular.convert import prepare_tabular
from recsys_llm.data.tabular.like import prepare_tabular_like

__all__ = ["TabularConfig", "prepare_tabular", "prepare_tabular_like"]
