"""Raw data -> Parquet splits + schema: one entry point per source, plus a post-check.

``recsys-llm prepare`` (see :mod:`recsys_llm.cli.data`) calls :func:`prepare_dataset`,
which dispatches to the converter of the source, then re-opens every written split
with :func:`~recsys_llm.data.parquet_files.read_schema_and_check` (footers only) and
returns a :class:`PrepareReport` with the rows and click rate per split.

Every source is written whole or not at all (:func:`~recsys_llm.data.parquet_writer.write_prepared`):
the output directory is replaced only by a complete, checked data set, and only if it is
absent, empty or an earlier prepared data set.
"""

import dataclasses
import os
from typing import Dict, Optional, Type, TypeVar, Union

import pyarrow.compute as pc

from recsys_llm.data.criteo import CriteoConfig, prepare_criteo
from recsys_llm.data.movielens import MovieLensConfig, prepare_movielens
from recsys_llm.data.parquet_files import first_file_columns, label_row_groups, read_schema_and_check
from recsys_llm.data.parquet_writer import write_prepared
from recsys_llm.data.schema import DatasetSchema
from recsys_llm.data.synthetic import SyntheticConfig, generate_synthetic
from recsys_llm.data.tabular import TabularConfig, prepare_tabular, prepare_tabular_like

SOURCES = ("synthetic", "movielens", "criteo", "tabular")
SourceConfig = Union[SyntheticConfig, MovieLensConfig, CriteoConfig, TabularConfig]
C = TypeVar("C", SyntheticConfig, MovieLensConfig, CriteoConfig, TabularConfig)


@dataclasses.dataclass
class PrepareReport:
    """What ``prepare`` wrote.

    Args:
        schema (DatasetSchema): the written schema (``schema.root`` is the output directory).
        rows (Dict[str, int]): rows per split.
        click_rate (Dict[str, Optional[float]]): mean label per split; None for a split without labels
            (rows to score, ``prepare tabular --like`` of rows without the label column).
        field_ways (Dict[str, str]): ``prepare tabular``'s way of each sparse and sequence field's ids
            (:func:`~recsys_llm.data.tabular.convert.field_way`: ``schema.ids`` plus the option that asked
            for it); empty for the other sources.
    """

    schema: DatasetSchema
    rows: Dict[str, int]
    click_rate: Dict[str, Optional[float]]
    field_ways: Dict[str, str] = dataclasses.field(default_factory=dict)

    def summary(self) -> str:
        """A short human-readable table of splits and fields."""
        lines = [f"data set {self.schema.name!r} in {self.schema.root}"]
        for split, rows in self.rows.items():
            rate = self.click_rate[split]
            clicks = "no labels (rows to score)" if rate is None else f"click rate {rate:.3f}"
            lines.append(f"  {split:<6} {rows:>12,d} rows   {clicks}")
        for spec in self.schema.fields:
            size = f"{spec.cardinality:,d}{' (hashed)' if spec.hashed else ''}" if spec.is_categorical else "-"
            text = "  text" if spec.value_text else ""
            way = f"  ids: {self.field_ways[spec.name]}" if spec.name in self.field_ways else ""
            lines.append(f"  {spec.name:<20} {spec.kind.value:<8} {size:>20}{text}{way}  {spec.description}")
        return "\n".join(lines)


def check_prepared(schema: DatasetSchema) -> PrepareReport:
    """Footer check of every split plus its label mean (reads only the label column, a row group at a time);
    a split whose first file has no label column (rows to score) gets no click rate (None)."""
    rows: Dict[str, int] = {}
    rate: Dict[str, Optional[float]] = {}
    for split in schema.splits:
        path = schema.split_path(split)
        labeled = schema.label in first_file_columns(schema, path)
        rows[split] = read_schema_and_check(schema, path, with_label=labeled)
        rate[split] = (label_sum(schema, path) / rows[split] if rows[split] else 0.0) if labeled else None
    return PrepareReport(schema, rows, rate)


def label_sum(schema: DatasetSchema, path: str) -> float:
    """Sum of the label column of a split's file or directory, read one row group at a time."""
    return float(sum(pc.sum(labels).as_py() or 0 for _, _, labels in label_row_groups(schema, path)))


def prepare_dataset(
    source: str,
    out_dir: str,
    input_path: Optional[str] = None,
    schema_path: Optional[str] = None,
    config: Optional[SourceConfig] = None,
    progress: bool = True,
    like_dir: Optional[str] = None,
    split_name: Optional[str] = None,
    grow_vocabulary: bool = False,
) -> PrepareReport:
    """Converts one source into ``out_dir`` and checks the result.

    Args:
        source (str): one of :data:`SOURCES`.
        out_dir (str): output directory.
        input_path (Optional[str]): raw data: MovieLens directory, Criteo file, tabular CSV/Parquet
            (unused for ``synthetic``).
        schema_path (Optional[str]): the user's schema file (``tabular`` only).
        config (Optional[SourceConfig]): the source's config dataclass (defaults when None);
            another source's config is a TypeError.
        progress (bool): tqdm bars.
        like_dir (Optional[str]): ``tabular`` only: an earlier ``prepare tabular`` output whose schema and ids
            the new rows are prepared into, as one split (:func:`~recsys_llm.data.tabular.like.prepare_tabular_like`;
            with ``schema_path``, a schema file of the earlier fields as they were plus new ones).
        split_name (Optional[str]): with ``like_dir``, the name of that split (None: ``test``).
        grow_vocabulary (bool): with ``like_dir``, values a vocabulary lacks take its table's free ids instead of
            id 0 (:mod:`~recsys_llm.data.tabular.growth`).

    Returns:
        PrepareReport: rows and click rate per split, and the ways of the fields' ids.

    Example::

        report = prepare_dataset("movielens", "data/ml-100k", input_path="../shared/data/ml-100k")
        print(report.summary())
    """
    field_ways: Dict[str, str] = {}
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; expected one of {SOURCES}")
    if source != "synthetic" and not input_path:
        raise ValueError(f"prepare {source} needs an input path")
    if input_path and not os.path.exists(input_path):
        raise FileNotFoundError(f"{input_path}: input not found")
    if source == "criteo" and os.path.isdir(input_path):
        raise ValueError(f"{input_path}: is a directory; prepare criteo reads one file of rows (e.g. train.txt or "
                         "day_0.gz): pass that file")
    if like_dir is not None and source != "tabular":
        raise ValueError(f"prepare {source}: like_dir (--like) prepares new rows like an earlier prepare tabular "
                         "output; expected source tabular")
    if split_name is not None and like_dir is None:
        raise ValueError("split_name (--split-name) names the one split of new rows prepared like an earlier output; "
                         "expected it only with like_dir (--like)")
    if grow_vocabulary and like_dir is None:
        raise ValueError("grow_vocabulary (--grow-vocabulary) gives the new values of rows prepared like an earlier "
                         "output ids of their own; expected it only with like_dir (--like)")
    if like_dir is not None:
        schema = prepare_tabular_like(input_path, like_dir, out_dir, _source_config(source, config, TabularConfig),
                                      split_name=split_name or "test", progress=progress, field_ways=field_ways,
                                      grow_vocabulary=grow_vocabulary, schema_path=schema_path or None)
    elif source == "synthetic":
        c = _source_config(source, config, SyntheticConfig) or SyntheticConfig()
        schema = write_prepared(out_dir, "synthetic", [],
                                lambda tmp: generate_synthetic(tmp, c.num_rows, progress=progress, config=c))
    elif source == "movielens":
        schema = prepare_movielens(input_path, out_dir, _source_config(source, config, MovieLensConfig),
                                   progress=progress)
    elif source == "criteo":
        schema = prepare_criteo(input_path, out_dir, _source_config(source, config, CriteoConfig), progress=progress)
    else:
        if not schema_path:
            raise ValueError("prepare tabular needs a schema file (JSON/YAML, --schema FILE) describing the fields, or "
                             "like_dir (--like PREPARED_DIR) to prepare new rows into an earlier output's schema and "
                             "ids")
        schema = prepare_tabular(input_path, schema_path, out_dir, _source_config(source, config, TabularConfig),
                                 progress=progress, field_ways=field_ways)
    return dataclasses.replace(check_prepared(schema), field_ways=field_ways)


def _source_config(source: str, config: Optional[SourceConfig], expected: Type[C]) -> Optional[C]:
    """``config`` when it is None or an ``expected``, the config class of ``source``.

    Raises:
        TypeError: another source's config, naming both classes.
    """
    if config is not None and not isinstance(config, expected):
        raise TypeError(f"prepare {source}: config is a {type(config).__name__}; expected a {expected.__name__}")
    return config
