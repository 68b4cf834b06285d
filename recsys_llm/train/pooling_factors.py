"""The planner's pooling factors of each table: the mean ids per bag of each feature the table pools, measured on
the training split (:func:`recsys_llm.data.ids_per_bag.mean_ids_per_bag`), in the order of the table's
``feature_names``.

torchrec's planner reads them from ``ParameterConstraints.pooling_factors`` (1.0 per feature without them): its
perf estimator prices a table's lookups and input all-to-alls by ``batch size x pooling factor`` ids per feature,
and ``HeuristicalStorageReservation`` sizes the memory it keeps for the batches' ids the same way, so a multi-hot
field of 20 ids a row priced as one id made its table look 20 times cheaper to look up than it is.

Example::

    factors = table_pooling_factors(find_tables(task), {"genres": 1.7})   # {"t_genres": [1.7], "t_user_id": [1.0]}
"""

from typing import Any, Dict, List, Mapping, Tuple

# torchrec's pooling factor of a feature it knows nothing of (planner.constants.POOLING_FACTOR): one id per bag
ONE_ID_PER_BAG = 1.0


def table_pooling_factors(tables: Mapping[str, Tuple[str, Any]],
                          ids_per_bag: Mapping[str, float]) -> Dict[str, List[float]]:
    """Table -> the mean ids per bag of each of its features (``ids_per_bag``; 1.0 for a feature not in it: a
    sparse field's one id, or a feature not read from the data).

    Args:
        tables (Mapping[str, Tuple[str, Any]]): :func:`recsys_llm.train.sharding.find_tables` of the model
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
