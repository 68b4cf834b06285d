"""The planner's pooling factors of each table: the mean ids per bag of each feature the table pools, measured on
the training split (:func:`recsys_llm.data.ids_per_bag.mean_ids_per_bag`), in the order of the table's
``feature_names``.

torchrec's planner reads them from ``ParameterConstraints.pooling_factors`` (1.0 per feature without them): its
perf estimator prices a table's lookups and input all-to-alls by ``batch size x pooling factor`` ids per feature,
and ``HeuristicalStorageReservation`` sizes the memory it keeps for the batches' ids the same way, so a multi-hot
field of 20 ids a row priced as one id made its table look 20 times cheaper to look up than it is.

A run records them in its ``sharding_plan.json`` (every table's, where they were measured); a resume plans with
them only where the run was planned with them (:func:`planned_without_pooling_factors`), so a run planned before
``sharding.measure_pooling`` existed resumes on the plan it was saved under.

Example::

    factors = table_pooling_factors(find_tables(task), {"genres": 1.7})   # {"t_genres": [1.7], "t_user_id": [1.0]}
"""

import json
from typing import Any, Dict, List, Mapping, Tuple

# torchrec's pooling factor of a feature it knows nothing of (planner.constants.POOLING_FACTOR): one id per bag
ONE_ID_PER_BAG = 1.0


def table_pooling_factors(tables: Mapping[str, Tuple[str, Any]],
                          ids_per_bag: Mapping[str, float]) -> Dict[str, List[float]]:
    """Table -> the mean ids per bag of each of its features (``ids_per_bag``; 1.0 for a feature not in it: a
    sparse field's one id, or a feature not read from the data).

    Args:
        tables (Mapping[str, Tuple[str, Any]]): :func:`recsys_llm.train.planner_inputs.find_tables` of the model
            (table -> module path, EmbeddingBagCollection).
        ids_per_bag (Mapping[str, float]): feature (field) -> mean ids per bag.

    Returns:
        Dict[str, List[float]]: every table's factors, one per feature, in its config's feature order.
    """
    factors: Dict[str, List[float]] = {}
    for name, (_, ebc) in tables.items():
        config = next(c for c in ebc.embedding_bag_configs() if c.name == name)
        factors[name] = [float(ids_per_bag.get(feature, ONE_ID_PER_BAG)) for feature in config.feature_names]
    return factors


def planned_without_pooling_factors(saved_plan: str) -> bool:
    """Whether ``saved_plan`` (a run's ``sharding_plan.json``) is a plan made without measured pooling factors: one
    that records none (planned before ``sharding.measure_pooling``, with it false, or read from
    ``sharding.plan_file``). A resume of that run plans without them too: factors it was not planned with could
    move its tables (a table replicated then and sharded now, or split into other column shards, does not load
    its checkpoint). False without a readable file (a new run).
    """
    try:
        with open(saved_plan, encoding="utf-8") as handle:
            placements = json.load(handle)
    except (OSError, ValueError):
        return False
    if not isinstance(placements, dict) or not placements:
        return False
    return not any(isinstance(p, dict) and "pooling_factors" in p for p in placements.values())
