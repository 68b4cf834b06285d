"""New values of a day's rows given ids of their own (``prepare tabular --like --grow-vocabulary``): a vocabulary
field's values that the earlier vocabulary lacks take the free ids of the field's table (``cardinality`` beyond
the values it holds), so a run that goes on with the day (``train.init_from``) learns embeddings for them
instead of sharing id 0. The earlier ids stay as they were (the schema fingerprint too); a value past the
table's free ids still gets id 0.

Example::

    schema = prepare_tabular_like("day2.csv", "data/shop", "data/shop-day2", grow_vocabulary=True)
"""

import collections
import dataclasses
from typing import Counter, Dict, List

import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from recsys_llm.data.schema import DatasetSchema
from recsys_llm.data.tabular.config import TabularConfig
from recsys_llm.data.tabular.source import read_blocks
from recsys_llm.data.tabular.tokens import FieldPlan, field_tokens, missing_tokens
from recsys_llm.progress import bar_options


@dataclasses.dataclass(frozen=True)
class Growth:
    """What :func:`grow_vocabularies` did to one field: ``added`` new values took ids ``first_id`` ..
    ``first_id + added - 1``; ``left_out`` more found no free id (they get id 0). ``read`` values (tokens of a
    sequence) were read besides the missing ones, ``lacking`` of them not in the earlier vocabulary: every one
    (``lacking == read``) is a sign of values written in another form than the earlier data's."""

    added: int
    first_id: int
    left_out: int
    read: int = 0
    lacking: int = 0

    def describe(self) -> str:
        """The prepare report's words, e.g. ``3 new values, ids 41-43`` (the values left out are counted with the
        others the vocabulary lacks: :func:`~recsys_llm.data.tabular.convert.field_way`)."""
        text = f"{self.added} new value{'s' * (self.added != 1)}"
        if self.added:
            last = self.first_id + self.added - 1
            text += f", id{'s' * (self.added != 1)} {self.first_id}{f'-{last}' if last != self.first_id else ''}"
        return text


def grow_vocabularies(data_path: str, like: DatasetSchema, plans: Dict[str, FieldPlan], config: TabularConfig,
                      progress: bool = False) -> Dict[str, Growth]:
    """Reads the vocabulary fields of ``data_path`` once and appends the values each vocabulary lacks to
    ``plans[field].vocabulary`` in place, as ids ``V + 1`` .. (V: the values it held) up to the field's
    ``cardinality``, the most frequent first (ties in value order).

    Args:
        data_path (str): the new rows (CSV, Parquet file or directory), read as ``prepare tabular --like`` reads them.
        like (DatasetSchema): the earlier output's schema.
        plans (Dict[str, FieldPlan]): each categorical field's plan
            (:func:`~recsys_llm.data.tabular.raw_values.prepared_plan`); the ``vocab`` ones grow.
        config (TabularConfig): how the rows are read (CSV options, ``sequence_separator``, ``missing_tokens``).
        progress (bool): a tqdm bar over the rows read.

    Returns:
        Dict[str, Growth]: for each vocabulary field that met values it lacked.
    """
    fields = [spec for spec in like.categorical_fields if plans[spec.name].mode == "vocab"]
    if not fields:
        return {}
    counts: Dict[str, Counter[str]] = {spec.name: collections.Counter() for spec in fields}
    read: Counter[str] = collections.Counter()
    missing = missing_tokens(config)
    with tqdm(desc="tabular rows (new values)", unit="row", disable=not progress, **bar_options()) as bar:
        for file_path, row, block in read_blocks(data_path, like, [spec.name for spec in fields], config):
            bar.update(block.num_rows)
            for spec in fields:
                flat, _ = field_tokens(block.column(spec.name), spec, config.sequence_separator, file_path, row,
                                       missing)
                if not (pa.types.is_string(flat.type) or pa.types.is_large_string(flat.type)):
                    flat = pc.cast(flat, pa.string())  # integer ids mapped through a vocabulary, as token_ids does
                flat = flat.drop_null()  # a missing value keeps id 0
                read[spec.name] += len(flat)
                lacking = pc.invert(pc.is_in(flat, value_set=plans[spec.name].vocabulary))
                for entry in pc.value_counts(flat.filter(lacking)).to_pylist():
                    counts[spec.name][entry["values"]] += entry["counts"]
    grown: Dict[str, Growth] = {}
    for spec in fields:
        if not counts[spec.name]:
            continue
        plan = plans[spec.name]
        new: List[str] = [value for value, _ in sorted(counts[spec.name].items(), key=lambda kv: (-kv[1], kv[0]))]
        free = max(spec.cardinality - 1 - len(plan.vocabulary), 0)  # id 0 is the unknown value's
        grown[spec.name] = Growth(added=min(free, len(new)), first_id=len(plan.vocabulary) + 1,
                                  left_out=max(len(new) - free, 0), read=read[spec.name],
                                  lacking=sum(counts[spec.name].values()))
        plan.vocabulary = pa.concat_arrays([plan.vocabulary, pa.array(new[:free], plan.vocabulary.type)])
    return grown
