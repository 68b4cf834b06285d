"""The embedding tables a run started ``train.init_scope=tables`` takes from its ``train.init_from`` checkpoint.

Each trained table of the new model takes the checkpoint's table under the same state-dict key, else the
checkpoint's table of its field: every built-in network names a field's table ``<prefix><field>``
(:data:`NETWORK_PREFIXES`: ``t_`` in a plain or LLaCTR run, ``teacher_`` in an ELEC gain network or a pair's
teacher, ``student_`` in a pair's student), so a plain run's ``t_city`` starts a gain network's ``teacher_city``, a
pair's ``student_city`` and ``teacher_city``, and the reverse. Shapes and dtypes are checked against the
checkpoint's metadata before anything is loaded.
"""

import re
from typing import Any, Collection, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
from torchrec.modules.embedding_configs import data_type_to_dtype
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from recsys_llm.modules.elec import STUDENT_PREFIX, TEACHER_PREFIX
from recsys_llm.modules.semantic_table import TABLE_PREFIX as SEMANTIC_TABLE_PREFIX
from recsys_llm.train.checkpoint import table_of
from recsys_llm.train.checkpoint_reader import SafeFileSystemReader
from recsys_llm.train.config import ConfigError, ExperimentConfig, config_differences

#: the model settings that shape every table's weights (a field's own ``embedding_dim`` in ``schema.json`` is
#: compared with the field)
TABLE_SETTINGS = ("model.embedding_dim", "model.embedding_dtype")
#: the prefixes of the built-in networks' table names (``<prefix><field>``: a plain or LLaCTR backbone's, an ELEC
#: gain network's or teacher's, an ELEC student's), by which a table the checkpoint keeps under another key is
#: matched to this model's table of the same field. No name of one prefix is another's (the prefixes differ in
#: their first two characters), so a name tells its field.
NETWORK_PREFIXES = ("t_", TEACHER_PREFIX, STUDENT_PREFIX)
_TABLE_WEIGHT = re.compile(r"(.*embedding_bags)\.([^.]+)\.weight")


class TableShape(NamedTuple):
    """A trained embedding table of this run's model (:func:`trained_tables`): its weight's key in the sharded
    model's state dict, rows, columns, dtype and the features it embeds (its ``feature_names``)."""

    key: str
    rows: int
    dim: int
    dtype: torch.dtype
    features: Tuple[str, ...] = ()


def trained_tables(tables: Mapping[str, Tuple[str, EmbeddingBagCollection]]) -> Dict[str, TableShape]:
    """The tables of :func:`~recsys_llm.train.planner_inputs.find_tables` (of the model before sharding) that
    training fills: all but those of frozen plug-in EBCs (ELEC's entity tables, a frozen teacher's), which come
    from their own files. Tables of ``sharding.frozen_tables`` count: they keep the weights they start from."""
    shapes = {}
    for name, (path, ebc) in tables.items():
        if getattr(ebc, "frozen", False):
            continue
        config = next(config for config in ebc.embedding_bag_configs() if config.name == name)
        shapes[name] = TableShape(f"{path}.embedding_bags.{name}.weight", config.num_embeddings,
                                  config.embedding_dim, data_type_to_dtype(config.data_type),
                                  tuple(config.feature_names))
    return shapes


def check_table_settings(config: ExperimentConfig, saved: ExperimentConfig, what: str) -> None:
    """Raises ConfigError where ``config`` sets one of :data:`TABLE_SETTINGS` otherwise than ``saved``."""
    changed = [difference for difference in config_differences(saved, config)
               if difference.split(":", 1)[0] in TABLE_SETTINGS]
    if changed:
        raise ConfigError(f"{what}: its run built its tables with other settings ({'; '.join(changed)}), so no table "
                          "of it fits this model's; expected the same, or leave train.init_from unset to start from "
                          "fresh weights")


def shared_tables(checkpoint: str, tables: Mapping[str, TableShape], what: str,
                  fields: Optional[Collection[str]] = None, untaken_prefixes: Collection[str] = ()) -> Dict[str, str]:
    """``{table: the checkpoint's state-dict key}`` of the tables of ``tables`` that ``checkpoint`` holds: under the
    same key, else (a table of one feature, one of ``fields``: those both runs share unchanged) its table of that
    field, named ``<prefix><field>`` (:data:`NETWORK_PREFIXES`; a table named with one of ``untaken_prefixes`` is
    taken in neither way). Of two such tables, the one of this table's name is taken (a gain network's
    ``teacher_x`` for a pair's teacher); otherwise both refused.

    Raises:
        ConfigError: none, one of another shape or dtype (naming it, the checkpoint's table, and both shapes),
            or a table whose field two of the checkpoint's tables embed (naming them).
    """
    metadata = SafeFileSystemReader(checkpoint).read_metadata()
    untaken = tuple(untaken_prefixes)
    # tables of untaken_prefixes are not that run's training (a frozen teacher's): taken neither by key nor by field
    saved = {key[len("model."):]: item for key, item in metadata.state_dict_metadata.items()
             if key.startswith("model.") and not (untaken and _TABLE_WEIGHT.fullmatch(key)
                                                  and table_of(key).startswith(untaken))}
    prefixes = [prefix for prefix in NETWORK_PREFIXES if prefix not in untaken]
    sources = _match_tables(tables, saved, fields, prefixes, what)
    if not sources:
        raise ConfigError(f"{what}: its checkpoint holds none of this model's tables ({', '.join(sorted(tables))}) "
                          f"under {', '.join(sorted({t.key.rsplit('.', 2)[0] for t in tables.values()}))} "
                          f"({_where_kept(saved)}); expected the tables of the fields both runs have where "
                          "this model keeps them: a plain or LLaCTR run keeps a field's table as t_<field> under "
                          "model., an ELEC gain network as teacher_<field> under model., an ELEC teacher-student "
                          "pair as student_<field> under student.model. (and teacher_<field> under teacher.model.), "
                          "and a table passes under the same key, or to the table of its field (<prefix><field>) "
                          "where both runs have that field unchanged; or leave train.init_from unset to start from "
                          "fresh weights")
    _check_same_shapes(tables, saved, sources, what)
    return sources


def _match_tables(tables: Mapping[str, TableShape], saved: Mapping[str, Any], fields: Optional[Collection[str]],
                  prefixes: Sequence[str], what: str) -> Dict[str, str]:
    """:func:`shared_tables`' ``{table: the checkpoint's key}`` (``saved``: the checkpoint's model keys), before
    the shapes are checked.

    Raises:
        ConfigError: a table whose field two of the checkpoint's tables embed, none of this table's name.
    """
    by_name: Dict[str, List[str]] = {}
    for key in saved:
        if _TABLE_WEIGHT.fullmatch(key):
            by_name.setdefault(table_of(key), []).append(key)
    sources: Dict[str, str] = {}
    ambiguous = []
    for name, table in sorted(tables.items()):
        if table.key in saved:  # the same key: taken without matching by field
            sources[name] = table.key
            continue
        if fields is None or len(table.features) != 1 or table.features[0] not in fields:
            continue
        candidates = sorted(key for prefix in prefixes for key in by_name.get(prefix + table.features[0], []))
        if len(candidates) > 1:
            candidates = [key for key in candidates if table_of(key) == name] or candidates
        if len(candidates) > 1:
            ambiguous.append(f"{name} (field {table.features[0]}): {', '.join(candidates)}")
        elif candidates:
            sources[name] = candidates[0]
    if ambiguous:
        raise ConfigError(f"{what}: its checkpoint holds several tables of the field of this model's table(s) "
                          f"({'; '.join(ambiguous)}), of which none is the one to take; expected one table of each "
                          "field there (a plain, LLaCTR, gain-network or offline / frozen-teacher student run), or "
                          "leave train.init_from unset to start from fresh weights")
    return sources


def _check_same_shapes(tables: Mapping[str, TableShape], saved: Mapping[str, Any], sources: Mapping[str, str],
                       what: str) -> None:
    """Raises ConfigError where a table of ``tables`` differs in shape or dtype from the checkpoint's table it takes
    (``sources``; ``saved``: the checkpoint's model keys' metadata), naming both tables and both shapes."""
    other = []
    for name, source in sources.items():
        table, there = tables[name], saved[source]
        if (list(there.size), there.properties.dtype) != ([table.rows, table.dim], table.dtype):
            named = name if source == table.key else f"{name} from {table_of(source)}"
            other.append(f"{named}: {_shape_text(list(there.size), there.properties.dtype)} there, "
                         f"{_shape_text([table.rows, table.dim], table.dtype)} here")
    if other:
        raise ConfigError(f"{what}: table(s) both models have differ in shape or dtype ({'; '.join(other)}); "
                          "expected each as that run built it (the same model.embedding_dim, model.embedding_dtype, "
                          "and each shared field's cardinality and embedding_dim), or leave train.init_from unset")


def _where_kept(saved: Mapping[str, Any]) -> str:
    """What a checkpoint's model keys (``saved``, without ``model.``) say of its tables, for a message:
    ``"that run keeps t_city, t_user under model.embedding_bag_collection.embedding_bags"``, or that it keeps none."""
    places: Dict[str, List[str]] = {}
    for key in saved:
        match = _TABLE_WEIGHT.fullmatch(key)
        if match and not match.group(2).startswith(SEMANTIC_TABLE_PREFIX):  # frozen entity tables: never taken
            places.setdefault(match.group(1), []).append(match.group(2))
    if not places:
        return "that run keeps no embedding table"
    return "; ".join(f"that run keeps {', '.join(sorted(names))} under {path}"
                     for path, names in sorted(places.items()))


def _shape_text(size: List[int], dtype: torch.dtype) -> str:
    """``"121 x 16 float32"`` for a message."""
    return f"{' x '.join(str(n) for n in size)} {str(dtype).replace('torch.', '')}"
