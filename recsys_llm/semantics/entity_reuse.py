"""An earlier entity export's vectors, reused by a later day's export (``semantics export --reuse``): the ids it
holds keep their vectors, and only the ids the grown vocabulary added are encoded.

A day's entity export covers the earlier days' entities too (their ids stay in the grown vocabulary); encoding
them again costs an LLM pass over the whole catalogue every day, and gives vectors that differ wherever an
entity's text changed. The earlier export must come from the same adapted LLM, pooling, template, output, dtype
and projection, and its ids must mean the same values (the day prepared ``--like`` the earlier one).
"""

import json
from typing import Callable, Dict, Tuple

import numpy as np

from recsys_llm.data.schema import DatasetSchema
from recsys_llm.semantics.vector_export import REUSED_KEY, ProvenanceError, check_provenance, read_manifest
from recsys_llm.semantics.vector_reader import ExportLookup
#: provenance entries that follow the day's data (ids, schema), not what made the vectors
_DAY_KEYS = ("vocabulary", "schema", REUSED_KEY)

ReusedVectors = Callable[[np.ndarray], Tuple[np.ndarray, np.ndarray]]


def reused_from_record(directory: str) -> str:
    """The ``reused_from`` provenance value of an export reusing the finished export ``directory``: a resume must
    reuse the same vectors (its finished chunks hold them).

    Raises:
        FileNotFoundError: ``directory`` holds no export manifest (naming it).
        ValueError: an unfinished or damaged export, or a row export.
    """
    try:
        manifest = read_manifest(directory)
    except (FileNotFoundError, ValueError) as error:  # named as the option: the output directory is fine
        raise type(error)(f"--reuse {error}") from error
    if manifest["provenance"].get("granularity") != "entity":
        raise ValueError(f"--reuse {directory}: an export of {manifest['provenance'].get('granularity')!r} "
                         "granularity; expected an entity export (--granularity entity) of an earlier day")
    return json.dumps({"num_rows": int(manifest["num_rows"]), "keys_sha256": manifest.get("keys_sha256")},
                      sort_keys=True)


def reused_vectors(directory: str, provenance: Dict[str, str], schema: DatasetSchema, entity_field: str,
                   cache_bytes: int = 1 << 30) -> ReusedVectors:
    """A lookup of the vectors of the earlier entity export ``directory``, for an export of ``provenance``.

    Returns:
        ReusedVectors: ``keys (n,) int64 -> (found (n,) bool, vectors (found.sum(), d))`` in the export's dtype.

    Raises:
        ProvenanceError: the earlier export comes from another LLM, pooling, template, entity field, output, dtype
            or projection (naming what differs), or its ids mean other values than ``schema``'s (the data prepared
            afresh instead of ``--like``).
    """
    manifest = read_manifest(directory)
    earlier = dict(manifest["provenance"])
    recorded = earlier.get("vocabulary")
    compared = _DAY_KEYS if recorded is not None else ("vocabulary", REUSED_KEY)  # no record: the same schema
    try:
        check_provenance({k: v for k, v in earlier.items() if k not in compared},
                         {k: v for k, v in provenance.items() if k not in compared}, directory, complete=True)
    except ProvenanceError as error:
        raise ProvenanceError(f"--reuse {error}: its vectors lie in another space than this export's; reuse an "
                              "export made with the same adapted LLM and settings, or export without --reuse"
                              ) from error
    if recorded is not None and entity_field in schema.changed_vocabularies({entity_field: json.loads(recorded)}):
        raise ProvenanceError(
            f"--reuse {directory}: exported from data whose ids of {entity_field!r} mean other values than in "
            f"{schema.root} ({schema.other_ids_cause()}), so its vectors would land on other entities' ids; reuse "
            "an export of an earlier day of this data (prepared --like it), or export without --reuse")
    lookup = ExportLookup(directory, manifest, cache_bytes)
    recorded_keys = manifest.get("keys_sha256")
    if recorded_keys is not None and lookup.keys_sha256() != recorded_keys:  # the keys the chunks hold now
        raise ProvenanceError(
            f"--reuse {directory}: its chunks hold other keys than its manifest records (keys_sha256 "
            f"{lookup.keys_sha256()}, recorded {recorded_keys}: chunks replaced or edited), so its vectors may land "
            "on other entities' ids; reuse an export as it was written, or export without --reuse")

    def vectors_of(keys: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        positions = lookup.positions(keys)
        found = positions >= 0
        return found, lookup.vectors(positions[found])

    return vectors_of
