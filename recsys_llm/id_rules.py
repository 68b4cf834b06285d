"""The reader's id rules, applied to serving requests.

Training batches come from :class:`~recsys_llm.data.parquet.ParquetBatchReader`, which folds
the ids of a ``hashed`` field modulo its cardinality, keeps the first ``max_length`` ids of a
sequence, refuses any other id outside ``[0, cardinality)``, and gives every row exactly one id
of a ``sparse`` field (a null there is refused). A served model gets raw ids
from its caller, so the export records these rules per feature (``config.json``,
``id_rules``) and :class:`IdRules` applies them to the request's KeyedJaggedTensor before the
table lookups: the tables see the rows they were trained on, and a bad id is an error naming
its feature instead of an index error deep in FBGEMM (on CPU) or, depending on FBGEMM's
bounds-check mode, a warning and another row (on GPU).

Example::

    rules = IdRules.from_config(id_rules(schema, ["user_id", "genres"]), {"user_id": 944, "genres": 20})
    kjt = rules(kjt)  # ids as the reader would have given them
"""

import contextlib
import itertools
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_llm.data.schema import FieldKind

ID_DTYPES = (torch.int64, torch.int32)  # what embedding_bag takes as ids and offsets
KEY_ORDERS_CACHED = 64  # key orders whose row bounds stay cached (per device); the least recently used goes
# of one key order: (K,) table rows, hashed positions, K max lengths, (K,) one-id keys (None: none)
_KeyOrderRules = Tuple[torch.Tensor, List[int], List[int], Optional[torch.Tensor]]


def id_rules(schema: Any, feature_names: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """Per feature of ``schema`` among ``feature_names``: ``{"hashed": bool, "max_length": int,
    "single_id": bool}`` (max_length 0: no limit; single_id: a ``sparse`` field, one id per row),
    for ``config.json``."""
    names = {f.name for f in schema.fields}
    return {
        name: {
            "hashed": bool(schema.field(name).hashed),
            "max_length": int(schema.field(name).max_length),
            "single_id": schema.field(name).kind == FieldKind.SPARSE,
        }
        for name in feature_names
        if name in names
    }


class IdRules:
    """Applies the reader's id rules to a KeyedJaggedTensor (one pass over its values).

    Args:
        rows (Mapping[str, int]): table rows per feature (ids must fall in ``[0, rows)``).
        hashed (Mapping[str, bool]): features whose ids are folded modulo ``rows``.
        max_length (Mapping[str, int]): ids kept per bag (0 or absent: all).
        single_id (Optional[Mapping[str, bool]]): features that take exactly one id per row
            (absent: any count).
    """

    def __init__(
        self,
        rows: Mapping[str, int],
        hashed: Mapping[str, bool],
        max_length: Mapping[str, int],
        single_id: Optional[Mapping[str, bool]] = None,
    ) -> None:
        self._rows = dict(rows)
        self._hashed = {k: bool(v) for k, v in hashed.items()}
        self._max_length = {k: int(v) for k, v in max_length.items() if v}
        self._single_id = {k for k, v in (single_id or {}).items() if v}
        self._per_keys: "OrderedDict[Tuple[Tuple[str, ...], torch.device], _KeyOrderRules]" = OrderedDict()

    @classmethod
    def from_config(cls, rules: Optional[Mapping[str, Mapping[str, Any]]], rows: Mapping[str, int]) -> "IdRules":
        """From an export's ``id_rules`` (None for an artifact written before they were recorded:
        bounds checks only; ``single_id`` absent, as before it was recorded: any id count) and
        the table rows per feature."""
        rules = rules or {}
        return cls(
            rows,
            {name: rule.get("hashed", False) for name, rule in rules.items()},
            {name: rule.get("max_length", 0) for name, rule in rules.items()},
            {name: rule.get("single_id", False) for name, rule in rules.items()},
        )

    def _per_key(self, keys: Tuple[str, ...], device: torch.device) -> _KeyOrderRules:
        """(K,) table rows, the positions of hashed keys, the K max lengths and (K,) which keys
        take one id per row (None: none does), of a key order, tensors on ``device`` (cached).

        Raises:
            ValueError: ``keys`` lack one of the model's features or repeat one.
        """
        cached = self._per_keys.get((keys, device))
        if cached is not None:
            with contextlib.suppress(KeyError):  # another request thread's insert dropped it meanwhile
                self._per_keys.move_to_end((keys, device))  # the least recently used order goes first
            return cached
        missing = [k for k in self._rows if k not in keys]
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        if missing or repeated:
            problems = [f"{what} {names}" for what, names in (("missing", missing), ("repeated", repeated)) if names]
            raise ValueError(
                f"sparse features: {', '.join(problems)}; expected each of this model's features once, in any "
                f"order: {list(self._rows)}"
            )
        rules = (
            torch.tensor([self._rows[k] for k in keys], dtype=torch.int64, device=device),
            [i for i, k in enumerate(keys) if self._hashed.get(k, False)],
            [self._max_length.get(k, 0) for k in keys],
            torch.tensor([k in self._single_id for k in keys], device=device) if self._single_id else None,
        )
        if len(self._per_keys) >= KEY_ORDERS_CACHED:  # clients that send keys in ever other orders: bounded
            with contextlib.suppress(KeyError):  # another request thread took the oldest first
                self._per_keys.popitem(last=False)
        self._per_keys[(keys, device)] = rules
        return rules

    def __call__(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """
        Args:
            features (KeyedJaggedTensor): raw ids; any key order, any stride per key; features
            the model does not have are dropped.

        Returns:
            KeyedJaggedTensor: the model's keys with the ids the reader would have given
            (``features`` itself when it holds only those and no id needs a change).

        Raises:
            ValueError: the KeyedJaggedTensor is malformed (a feature missing or repeated, ids
                not integers, lengths that do not match the ids: :meth:`check_structure`), a
                row holds no id or several of a single-id feature, or an id of a feature that is
                not hashed lies outside its table; named with the feature and the row in the
                batch (and the id and the table's size).
        """
        keys = tuple(features.keys())
        if any(key not in self._rows for key in keys):  # spare features, which an EBC would ignore too
            self.check_structure(features)
            features = features.permute([i for i, key in enumerate(keys) if key in self._rows])
            keys = tuple(features.keys())
        rows, hashed_positions, max_lengths, single_id = self._per_key(keys, features.values().device)
        self.check_structure(features)
        if single_id is not None:
            self._check_single_ids(features, single_id)
        if any(max_lengths):  # first, as the reader cuts a sequence before it checks its ids
            features = self._rebuilt(features, *self._truncate(features, max_lengths))
        values = features.values()
        per_key = features.length_per_key()
        if hashed_positions:
            values = values.clone()
            offsets = features.offset_per_key()
            for position in hashed_positions:  # in place on this key's slice of the copy
                values[offsets[position] : offsets[position + 1]].remainder_(self._rows[keys[position]])
        if values.numel():
            bounds = torch.repeat_interleave(rows, torch.tensor(per_key, device=values.device),
                                             output_size=values.numel())  # (N,)
            if bool(values.min() < 0) or bool((values >= bounds).any()):
                outside = torch.logical_or(values < 0, values >= bounds)
                self._raise_outside(features, keys, values, per_key, int(outside.nonzero()[0]))
        return self._rebuilt(features, values, features.lengths(), features.weights_or_none())

    @staticmethod
    def check_structure(features: KeyedJaggedTensor) -> None:
        """Raises unless ``features`` is a well-formed request: integer ids, and lengths that
        are counts (one per (feature, row), >= 0) summing to the number of ids.

        A few checks on whole tensors, no loop over rows: without them a float id fails deep
        in ``embedding_bag`` and lengths that do not sum to the ids fail in a reshape.

        Args:
            features (KeyedJaggedTensor): K keys; values (N,), lengths (sum of strides,),
                weights (N,) if any.

        Raises:
            ValueError: names what is wrong and what was expected.
        """
        values, lengths, weights = features.values(), features.lengths(), features.weights_or_none()
        if values.dtype not in ID_DTYPES or values.dim() != 1:
            raise ValueError(f"sparse features: ids (values) are a {values.dtype} tensor of shape {tuple(values.shape)}; "
                             "expected a 1-D integer tensor (torch.int64 or torch.int32) of raw ids")
        if lengths.dtype not in ID_DTYPES or lengths.dim() != 1:
            raise ValueError(f"sparse features: lengths are a {lengths.dtype} tensor of shape {tuple(lengths.shape)}; "
                             "expected a 1-D torch.int32 or torch.int64 tensor of counts")
        strides = features.stride_per_key()
        if lengths.numel() != sum(strides):
            raise ValueError(f"sparse features: {lengths.numel()} lengths for {len(strides)} features; expected one "
                             "length per (feature, row), feature-major (K features x B rows)")
        if lengths.numel() and int(lengths.min()) < 0:
            first = int((lengths < 0).nonzero()[0])
            key, row = IdRules._bag_of(features, first)
            raise ValueError(f"sparse features: feature {key!r}, row {row}: length {int(lengths[first])}; "
                             "expected a count >= 0")
        # per key from the lengths; a KJT built with length_per_key= keeps that one, which slices the ids per feature
        if len(set(strides)) == 1:  # one B for every key: one reduction
            counted = [int(n) for n in lengths.view(len(strides), strides[0]).sum(dim=1).tolist()]
        else:
            counted = [int(part.sum()) for part in lengths.split(strides)]
        total = sum(counted)
        if total != values.numel():
            raise ValueError(f"sparse features: lengths sum to {total} but there are {values.numel()} ids (values); "
                             "expected the lengths to count every id, one length per (feature, row)")
        given = features.length_per_key()
        if list(given) != counted:
            raise ValueError(f"sparse features: length_per_key is {list(given)} but the lengths count {counted} ids per "
                             f"feature ({features.keys()}); expected them to agree (or leave length_per_key out)")
        if weights is not None and weights.numel() != values.numel():
            raise ValueError(f"sparse features: {weights.numel()} weights for {values.numel()} ids; expected one each")

    @staticmethod
    def _check_single_ids(features: KeyedJaggedTensor, single_id: torch.Tensor) -> None:
        """Raises unless every row has exactly one id of each feature where ``single_id`` (K,) is True."""
        lengths = features.lengths()
        if lengths.numel() and bool(single_id.all()):  # the usual request: one min / max over the lengths
            low, high = torch.aminmax(lengths)
            if int(low) == 1 and int(high) == 1:
                return
        required = torch.repeat_interleave(
            single_id, torch.tensor(features.stride_per_key(), device=lengths.device)
        )  # (sum strides,)
        wrong = lengths.ne(1).logical_and_(required)
        if bool(wrong.any()):
            first = int(wrong.nonzero()[0])
            key, row = IdRules._bag_of(features, first)
            raise ValueError(
                f"sparse features: feature {key!r}, row {row}: {int(lengths[first])} ids; expected exactly one, as "
                "in training, where this sparse field has one id in every row (a missing value is id 0 in the "
                "data recsys-llm prepares, not an empty bag)"
            )

    @staticmethod
    def _bag_of(features: KeyedJaggedTensor, flat_index: int) -> Tuple[str, int]:
        """(feature, row in the batch) of entry ``flat_index`` of the feature-major lengths."""
        strides = features.stride_per_key()
        position = int(torch.searchsorted(torch.tensor(strides).cumsum(0), torch.tensor(flat_index), right=True))
        return features.keys()[position], flat_index - sum(strides[:position])

    @staticmethod
    def _rebuilt(features: KeyedJaggedTensor, values: torch.Tensor, lengths: torch.Tensor,
                 weights: Optional[torch.Tensor]) -> KeyedJaggedTensor:
        """``features`` with other values / lengths / weights (``features`` itself when they are its own)."""
        if values is features.values() and lengths is features.lengths():
            return features
        return KeyedJaggedTensor(
            keys=features.keys(), values=values, lengths=lengths, weights=weights,
            stride_per_key_per_rank=features.stride_per_key_per_rank() if features.variable_stride_per_key() else None,
        )

    @staticmethod
    def _truncate(
        features: KeyedJaggedTensor, max_lengths: List[int]
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Keeps the first max_length ids of every bag: (N',) values, (sum strides,) lengths, weights."""
        values, lengths, weights = features.values(), features.lengths(), features.weights_or_none()
        stride_per_key = features.stride_per_key()
        bag_offsets = [0, *itertools.accumulate(stride_per_key)]
        if not any(
            limit and stride and int(lengths[bag_offsets[i] : bag_offsets[i + 1]].max()) > limit
            for i, (limit, stride) in enumerate(zip(max_lengths, stride_per_key))
        ):
            return values, lengths, weights
        no_limit = torch.iinfo(torch.int64).max
        device = values.device
        limits = torch.repeat_interleave(
            torch.tensor([m or no_limit for m in max_lengths], dtype=torch.int64, device=device),
            torch.tensor(stride_per_key, dtype=torch.int64, device=device),
        )  # (sum strides,)
        lengths = lengths.to(torch.int64)
        starts = torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)  # (N,) first id of its bag
        keep = (torch.arange(values.numel(), device=device) - starts) < torch.repeat_interleave(limits, lengths)
        kept_lengths = torch.minimum(lengths, limits).to(features.lengths().dtype)
        return values[keep], kept_lengths, None if weights is None else weights[keep]

    def _raise_outside(self, features: KeyedJaggedTensor, keys: Tuple[str, ...], values: torch.Tensor,
                       per_key: List[int], first: int) -> None:
        position = int(torch.searchsorted(torch.tensor(per_key).cumsum(0), torch.tensor(first), right=True))
        key = keys[position]
        start = int(features.offset_per_key()[position])
        offsets = features[key].offsets()
        row = int(torch.searchsorted(offsets, torch.tensor(first - start, device=offsets.device), right=True)) - 1
        raise ValueError(
            f"feature {key!r}, row {row} of the batch: id {int(values[first])} is outside its table's "
            f"[0, {self._rows[key]}); the model was trained on ids in that range (ids of a \"hashed\" field "
            "are folded into it)"
        )
