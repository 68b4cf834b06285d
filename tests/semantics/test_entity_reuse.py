"""``semantics export --reuse``: a day's entity export keeps an earlier day's vectors for the ids it holds and
encodes only the new ids of the grown vocabulary; an export of another LLM or of other ids is refused."""

import json
import os
from typing import Dict, List

import numpy as np
import pytest
import torch

from recsys_llm.cli import main
from recsys_llm.data.schema import DatasetSchema
from recsys_llm.semantics.vector_export import REUSED_KEY
from recsys_llm.semantics.row_text import RowTextRenderer
from recsys_llm.semantics.schema_export import export_schema_vectors
from recsys_llm.semantics.vector_export import ProvenanceError, VectorExportConfig, read_manifest
from recsys_llm.semantics.vector_reader import read_vectors
from tests.grown_days import grown_days

PROVENANCE = {"model": "tiny", "revision": "r1", "pooling": "mean", "weights_sha256": "w1"}


class _CountingEncoder:
    """Texts -> (n, 4) vectors from the texts' characters plus ``offset``; counts the texts it encoded."""

    def __init__(self, offset: float) -> None:
        self.offset = offset
        self.texts: List[str] = []

    def __call__(self, texts: List[str]) -> torch.Tensor:
        self.texts += texts
        codes = [[float(sum(map(ord, text)) % 97), float(len(text)), 1.0, self.offset] for text in texts]
        return torch.tensor(codes) + self.offset


def _export(schema: DatasetSchema, out: str, splits: List[str], encode: _CountingEncoder, reuse: str = None,
            provenance: Dict[str, str] = PROVENANCE, chunk_rows: int = 2) -> Dict[int, np.ndarray]:
    export_schema_vectors(schema, splits, RowTextRenderer(schema), encode, out, provenance,
                          VectorExportConfig(chunk_rows=chunk_rows), granularity="entity", entity_field="item",
                          progress=False, reuse=reuse)
    keys, vectors = read_vectors(out)
    return dict(zip(keys.tolist(), vectors))


def _earlier_days_then_train(root: str) -> List[str]:
    return [os.path.join(root, "d1", f"{split}.parquet") for split in ("train", "valid", "test")] + ["train"]


def test_a_days_export_reusing_the_earlier_one_encodes_only_the_new_ids(tmp_path) -> None:
    days = grown_days(str(tmp_path))
    day1 = _export(days["day1"], str(tmp_path / "v1"), list(days["day1"].splits), _CountingEncoder(0.0))
    encoder = _CountingEncoder(5.0)  # the same model as far as the provenance tells: its vectors show who made them
    day2 = _export(days["day2"], str(tmp_path / "v2"), _earlier_days_then_train(str(tmp_path)), encoder,
                   reuse=str(tmp_path / "v1"))
    new_ids = sorted(set(day2) - set(day1))
    assert len(new_ids) == 2 and set(day1) < set(day2)  # items a and c are new on day 2
    assert len(encoder.texts) == 2  # the new ids alone were encoded
    for key, vector in day1.items():
        np.testing.assert_array_equal(day2[key], vector)  # kept, not encoded again
    for key in new_ids:
        assert day2[key][3] == 10.0  # encoded by this day's encoder: offset 5, added twice
    manifest = read_manifest(str(tmp_path / "v2"))
    assert json.loads(manifest["provenance"][REUSED_KEY])["num_rows"] == len(day1)


def test_an_export_of_another_llm_or_of_other_ids_is_not_reused(tmp_path) -> None:
    days = grown_days(str(tmp_path))
    _export(days["day1"], str(tmp_path / "v1"), list(days["day1"].splits), _CountingEncoder(0.0))
    splits = _earlier_days_then_train(str(tmp_path))
    other_llm = dict(PROVENANCE, weights_sha256="w2")
    with pytest.raises(ProvenanceError, match=r"^--reuse .*v1: vectors do not match the expected provenance "
                                              r"\(weights_sha256: stored 'w1', expected 'w2'\): its vectors lie in "
                                              r"another space"):
        _export(days["day2"], str(tmp_path / "other_llm"), splits, _CountingEncoder(0.0), str(tmp_path / "v1"),
                provenance=other_llm)
    # day 2 prepared afresh: the same fingerprint, but its ids mean other items than day 1's
    with pytest.raises(ProvenanceError, match=r"^--reuse .*v1: exported from data whose ids of 'item' mean other "
                                              r"values than in .*fresh"):
        _export(days["fresh"], str(tmp_path / "fresh_v"), ["train"], _CountingEncoder(0.0), str(tmp_path / "v1"))
    assert not os.path.exists(tmp_path / "other_llm" / "chunk-00000.parquet")


def test_an_export_begun_with_reuse_resumes_with_it_only(tmp_path) -> None:
    """Its finished chunks hold the reused vectors: resumed without --reuse (or with another export) they would sit
    beside vectors encoded afresh."""
    days = grown_days(str(tmp_path))
    _export(days["day1"], str(tmp_path / "v1"), list(days["day1"].splits), _CountingEncoder(0.0))
    splits = _earlier_days_then_train(str(tmp_path))
    done = _export(days["day2"], str(tmp_path / "v2"), splits, _CountingEncoder(5.0), str(tmp_path / "v1"))
    os.remove(os.path.join(str(tmp_path / "v2"), "chunk-00002.parquet"))
    with pytest.raises(ProvenanceError, match=r"v2: holds an export begun with --reuse of an export .* that this run "
                                              r"does not name: .* resume it with the same --reuse"):
        _export(days["day2"], str(tmp_path / "v2"), splits, _CountingEncoder(5.0))
    _export(days["day2"], str(tmp_path / "afresh"), splits, _CountingEncoder(5.0), chunk_rows=2)
    os.remove(os.path.join(str(tmp_path / "afresh"), "chunk-00002.parquet"))
    with pytest.raises(ProvenanceError, match=r"afresh: holds an export begun without --reuse: .* resume it without "
                                              r"--reuse, or use another --output-dir"):
        _export(days["day2"], str(tmp_path / "afresh"), splits, _CountingEncoder(5.0), str(tmp_path / "v1"))
    again = _CountingEncoder(5.0)
    resumed = _export(days["day2"], str(tmp_path / "v2"), splits, again, str(tmp_path / "v1"))
    assert resumed.keys() == done.keys() and all(np.array_equal(resumed[k], done[k]) for k in done)
    assert len(again.texts) <= 2  # the removed chunk's new ids at most


def test_reuse_is_refused_for_row_exports_before_the_llm_loads(tmp_path, capsys) -> None:
    days = grown_days(str(tmp_path))
    _export(days["day1"], str(tmp_path / "v1"), list(days["day1"].splits), _CountingEncoder(0.0))
    common = ["semantics", "export", "--schema", days["day2"].root, "--llm", str(tmp_path / "no_llm_here"),
              "--output-dir", str(tmp_path / "v2")]
    assert main(common + ["--reuse", str(tmp_path / "v1")]) == 2
    assert "--reuse: only with --granularity entity" in capsys.readouterr().err
    assert main(common + ["--granularity", "entity", "--entity-field", "item", "--reuse",
                          str(tmp_path / "missing")]) == 2
    assert str(tmp_path / "missing") in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "v2")


def test_an_export_whose_chunks_hold_other_keys_than_its_manifest_is_not_reused(tmp_path) -> None:
    """A chunk replaced or edited (its keys reordered) would put its vectors on other ids, in an export whose
    manifest then records them as this LLM's."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    days = grown_days(str(tmp_path))
    _export(days["day1"], str(tmp_path / "v1"), list(days["day1"].splits), _CountingEncoder(0.0))
    path = os.path.join(str(tmp_path / "v1"), "chunk-00000.parquet")
    table = pq.read_table(path)
    keys = table.column("key").to_numpy()[::-1].copy()
    pq.write_table(table.set_column(0, "key", pa.array(keys)).replace_schema_metadata(table.schema.metadata), path)
    with pytest.raises(ProvenanceError, match=r"^--reuse .*v1: its chunks hold other keys than its manifest records"):
        _export(days["day2"], str(tmp_path / "v2"), _earlier_days_then_train(str(tmp_path)), _CountingEncoder(5.0),
                str(tmp_path / "v1"))


def test_a_chunk_of_several_kept_ids_and_new_ones_keeps_each_vector_on_its_own_id(tmp_path) -> None:
    """In one chunk (chunk_rows above the ids' count) several kept vectors and the new ids' encoded ones are merged
    back into the chunk's row order: each kept vector lands on its own id, not on another kept one's."""
    days = grown_days(str(tmp_path))
    day1 = _export(days["day1"], str(tmp_path / "v1"), list(days["day1"].splits), _CountingEncoder(0.0),
                   chunk_rows=64)
    encoder = _CountingEncoder(5.0)
    day2 = _export(days["day2"], str(tmp_path / "v2"), _earlier_days_then_train(str(tmp_path)), encoder,
                   reuse=str(tmp_path / "v1"), chunk_rows=64)
    assert len(day1) >= 2 and len(encoder.texts) == len(set(day2) - set(day1)) >= 1
    assert len({tuple(vector) for vector in day1.values()}) == len(day1)  # distinct: a swap would show
    for key, vector in day1.items():
        np.testing.assert_array_equal(day2[key], vector)
