"""Resumable, rank-split export of LLM vectors to chunked Parquet (``recsys-llm semantics export``).

Layout of an export directory::

    _manifest.json         provenance (with dtype, and the encoder's dim), chunk size, number of rows/chunks,
                           key and vector column names, a hash of the keys in order, and texts_check "chunk":
                           each chunk records a hash of its texts ("_" first: pyarrow,
                           pandas, Spark and Dask read the directory as one table of the chunks; an export
                           written before 2026-12-06 has manifest.json, read and resumed under that name)
    chunk-00000.parquet    columns: key (int64), vector (fixed_size_list<float32|float16, d>)
    chunk-00001.parquet    ... each with the provenance and the hash of its texts in the Parquet schema metadata

Chunk ``i`` holds source rows ``[i * chunk_rows, (i + 1) * chunk_rows)``. A chunk file is
written to a temporary name and renamed into place, so a file that exists is complete:
a re-run (after a crash, a kill, a preemption) skips it and never recomputes it. Under
``torchrun`` rank ``r`` of ``w`` takes the chunks ``i`` with ``i % w == r``. The directory
holds nothing else: one with other files is refused before any work (:func:`check_export_dir`).

A resume over other texts behind the same keys (the data or its value texts prepared again)
is refused: before it encodes, each rank renders the texts of its finished chunks and compares
their hash with the one the chunk recorded, so each row's text is rendered once per run,
whatever the number of ranks. An export written before the chunks recorded their texts' hash
has a hash of all its texts in its manifest (``texts_sha256``): its resume renders and hashes
them all on every rank, as it was written.

Two granularities: ``row`` (one vector per row, keyed by the schema's row key, as in the
ELEC paper) and ``entity`` (one vector per user or item id, keyed by the id; every row
with that id reuses it, and :mod:`recsys_llm.modules.semantic_table` loads them into a
frozen sharded table); :mod:`recsys_llm.semantics.schema_export` reads them from a data set's splits.

Provenance (model, revision, pooling, template, weights hash, projection, dtype) is stored
with the vectors; readers compare it with what they expect and refuse a mismatch with a
:class:`ProvenanceError` naming the differing keys.

Example::

    export = VectorExport(out_dir, provenance, VectorExportConfig(chunk_rows=4096))
    export.run(keys, texts, encode_fn=llm.encode)          # resumable

    from recsys_llm.semantics.vector_reader import attach_vectors, read_vectors

    keys, vectors = read_vectors(out_dir, expected=provenance)
    attach_vectors(split_path, out_dir, key_column="row_id", output_path=copy_path, expected=provenance)
"""

import contextlib
import dataclasses
import glob
import hashlib
import json
import os
import re
import secrets
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from recsys_llm.atomic_dir import check_own_entries, link_into_place, write_file_atomically
from recsys_llm.data.parquet_writer import vector_array
from recsys_llm.data.validation import check_number, first_non_finite_row
from recsys_llm.progress import bar_options
from recsys_llm.semantics.precision import long_dtype_name
from recsys_llm.semantics.vector_projection import load_projection
from recsys_llm.typed_config import check_str_settings

PROVENANCE_KEY = b"recsys_llm.provenance"
#: the provenance entry of an entity export that reused an earlier one's vectors (``semantics export --reuse``)
REUSED_KEY = "reused_from"
TEXTS_KEY = b"recsys_llm.texts_sha256"  # a chunk's schema metadata: the hash of its texts (texts_sha256)
# "_" first: pyarrow (pq.read_table of the directory), pandas, Spark and Dask read the chunks beside it and skip it
MANIFEST = "_manifest.json"
LEGACY_MANIFEST = "manifest.json"  # the manifest of exports written before 2026-12-06
DTYPES = {"float32": (np.float32, pa.float32()), "float16": (np.float16, pa.float16())}


class ProvenanceError(ValueError):
    """Vectors made by another model, template, pooling or projection than expected."""


@dataclasses.dataclass
class VectorExportConfig:
    """How vectors are written.

    Args:
        chunk_rows (int): source rows per chunk file (the unit of resumption).
        batch_size (int): texts per encoder call.
        dtype (str): ``float32`` or ``float16`` storage.
        projection (Optional[str]): a PCA projection file (:func:`~recsys_llm.semantics.vector_projection.save_projection`) applied
            before storage, shrinking d to its number of components.
        key_column (str): name of the key column in the chunk files.
        vector_column (str): name of the vector column in the chunk files.
    """

    chunk_rows: int = 4096
    batch_size: int = 64
    dtype: str = "float32"
    projection: Optional[str] = None
    key_column: str = "key"
    vector_column: str = "vector"

    def __post_init__(self) -> None:
        check_str_settings(self, ("dtype", "key_column", "vector_column"), "VectorExportConfig", paths=("projection",))
        check_number("VectorExportConfig.chunk_rows", self.chunk_rows, integer=True, minimum=1)
        check_number("VectorExportConfig.batch_size", self.batch_size, integer=True, minimum=1)
        if long_dtype_name(self.dtype) not in DTYPES:
            raise ValueError(f"VectorExportConfig.dtype must be one of {sorted(DTYPES)} (or fp32, fp16), got "
                             f"{self.dtype!r}")
        self.dtype = long_dtype_name(self.dtype)  # recorded as torch names it


# keys ``CTRAdaptedLLM.provenance`` leaves out at these values (so exports written before the
# setting existed keep their provenance): an absent key means its value here
PROVENANCE_DEFAULTS = {"output": "representation", "llm_dtype": "float32"}
# keys that follow from the others (the width from the model and its output): named after them
DERIVED_PROVENANCE_KEYS = ("dim",)


def same_model_files(first: Dict[str, Any], second: Dict[str, Any]) -> bool:
    """Whether two provenances record the same known ``revision``: the base model's files, whatever its path."""
    revision = first.get("revision")
    return revision not in (None, "", "unknown") and revision == second.get("revision")


def check_provenance(found: Dict[str, str], expected: Dict[str, str], source: str, complete: bool = False) -> None:
    """Raises :class:`ProvenanceError` when an expected key is absent or differs.

    Args:
        found (Dict[str, str]): provenance stored with the vectors.
        expected (Dict[str, str]): what the caller needs (a subset of keys is allowed).
        source (str): file or directory named in the error.
        complete (bool): ``expected`` is a whole provenance (a resumed export's): keys only
            ``found`` has differ too.

    The error names the differing settings first and what follows from them (``dim``) last. ``model`` (the
    base model's path, its last two parts) is a name: where both sides record the same ``revision`` (the
    fingerprint of the model's files), the files are the same wherever they lie, and ``model`` is not compared.
    """
    keys = list(expected) + ([k for k in found if k not in expected] if complete else [])
    if same_model_files(found, expected):
        keys = [k for k in keys if k != "model"]

    def value(provenance: Dict[str, str], key: str) -> Optional[str]:
        return provenance.get(key, PROVENANCE_DEFAULTS.get(key))

    differing = sorted((k for k in keys if str(value(found, k)) != str(value(expected, k))),
                       key=lambda k: k in DERIVED_PROVENANCE_KEYS)  # stable: the settings first
    if differing:
        diffs = "; ".join(f"{k}: stored {value(found, k)!r}, expected {value(expected, k)!r}" for k in differing)
        raise ProvenanceError(f"{source}: vectors do not match the expected provenance ({diffs})")


def rank_and_world() -> Tuple[int, int]:
    """``(RANK, WORLD_SIZE)`` from the torchrun environment, ``(0, 1)`` outside it.

    Raises:
        ValueError: a variable that is no integer, or a rank outside the world (naming them).
    """
    from recsys_llm.train.distributed import launch_ranks

    rank, world_size, _ = launch_ranks()
    return rank, world_size


# ---- export ----------------------------------------------------------------------------
def chunk_path(directory: str, index: int) -> str:
    """The Parquet file of chunk ``index`` in an export directory."""
    return os.path.join(directory, f"chunk-{index:05d}.parquet")


def manifest_path(directory: str) -> str:
    """The manifest of the export in ``directory``: ``MANIFEST``, or where only an export written before
    2026-12-06 lies there, its ``LEGACY_MANIFEST`` (read, and resumed, under that name)."""
    legacy = os.path.join(directory, LEGACY_MANIFEST)
    current = os.path.join(directory, MANIFEST)
    return legacy if os.path.exists(legacy) and not os.path.exists(current) else current


# what an export directory holds: the manifest, the chunks, the temp files of both, and the file of a
# shared-directory check a killed torchrun export left (train.run_records.check_run_dir_shared)
_EXPORT_ENTRY = re.compile(r"(_?manifest\.json|chunk-\d{5,}\.parquet)(\.[0-9a-f]+\.tmp)?|\.shared-check-[0-9a-f]+")


def _create_manifest(path: str, manifest: Dict[str, object]) -> bool:
    """Writes ``manifest`` to ``path`` unless a manifest is there by then: False then (another rank's, or
    that of another export launched into the same directory at once), for the caller to check as an
    earlier one. The temp file is this call's own (random digits: ranks, and exports on other hosts, share
    the directory) and is linked, not renamed, into place, so one export's manifest neither replaces
    another's (beside whose chunks this one's would be written) nor mixes with it (:func:`link_into_place`)."""
    tmp = f"{path}.{secrets.randbelow(10 ** 12)}.tmp"  # a temp entry of _EXPORT_ENTRY
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())  # on disk before its name: a power loss leaves no empty manifest
        return link_into_place(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


def check_export_dir(directory: str) -> None:
    """Raises unless ``directory`` is absent, empty or an earlier export (resumed there).

    Call it before any work: an export is written into ``directory`` next to what is
    there, so a directory holding anything else is refused.

    Raises:
        FileExistsError: ``directory`` holds an entry an export does not write (named).
        ValueError: its manifest (:func:`manifest_path`) is not an export manifest (damaged, or
            another program's).
    """
    check_own_entries(directory, "vector export", lambda name: _EXPORT_ENTRY.fullmatch(name) is not None,
                      f"{MANIFEST}, chunk-NNNNN.parquet files")
    manifest = manifest_path(directory)
    if os.path.exists(manifest):
        load_manifest(manifest)


def require_unique_keys(keys: np.ndarray, what: str, is_sorted: bool = False) -> None:
    """Raises when a key repeats: a vector looked up by key would then belong to another row.

    Raises:
        ValueError: naming ``what``, the first repeated key and how many keys repeat.
    """
    repeated = repeated_in_sorted(keys if is_sorted else np.sort(keys, kind="stable"))
    if len(repeated):
        raise repeated_keys_error(repeated, what)


def repeated_in_sorted(ordered: np.ndarray) -> np.ndarray:
    """The keys of the sorted ``ordered`` (N,) that equal their predecessor: (R,), empty when all are unique."""
    return ordered[1:][ordered[1:] == ordered[:-1]]


def repeated_keys_error(repeated: np.ndarray, what: str) -> ValueError:
    """The error of :func:`require_unique_keys` for the (non-empty) keys found more than once."""
    distinct = np.unique(repeated)
    return ValueError(
        f"{what}: keys must be unique, but {len(distinct)} repeat (first: {distinct[0].item()!r}); a "
        "vector looked up by key would go to the wrong row. Give every row its own key (e.g. a row number)"
    )


# the error of a resume over other texts than the export's, and what to do
_OTHER_TEXTS = ("holds vectors of other texts than this run's, for the same keys (the data or its value texts changed "
                "since it was exported, e.g. prepared again)")
_OTHER_TEXTS_FIX = "use another --output-dir, or delete this one to export the new texts"


def _hash_texts(digest: "hashlib._Hash", texts: Sequence[str]) -> str:
    """Feeds ``texts`` to ``digest`` (each prefixed by its length) and returns its first 16 hex digits."""
    for text in texts:
        data = str(text).encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()[:16]


class VectorExport:
    """Writes ``encode_fn(texts)`` for every key in resumable chunks.

    Args:
        directory (str): output directory (created).
        provenance (Dict[str, str]): what made the vectors (model, revision, pooling,
            template, granularity, ...); ``dtype`` and ``projection`` are added.
        config (VectorExportConfig): chunking, dtype, projection.
    """

    def __init__(self, directory: str, provenance: Dict[str, str], config: VectorExportConfig) -> None:
        self._directory = directory
        self._config = config
        self._projection: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        provenance = {k: str(v) for k, v in provenance.items()}
        provenance["dtype"] = config.dtype
        provenance["projection"] = "none"
        if config.projection is not None:
            mean, components, digest = load_projection(config.projection)
            self._projection = (mean, components)
            provenance["projection"] = f"pca{components.size(1)}-{digest}"
        self._provenance = provenance

    @property
    def provenance(self) -> Dict[str, str]:
        return dict(self._provenance)

    def _texts_sha256(self, texts: Callable[[int, int], Sequence[str]], num_rows: int) -> str:
        """The hash of every text to export that an export's manifest held before its chunks recorded
        theirs (``texts_sha256``), rendered a chunk at a time: checked when such an export resumes."""
        digest = hashlib.sha256()
        for start in range(0, num_rows, self._config.chunk_rows):
            _hash_texts(digest, texts(start, min(start + self._config.chunk_rows, num_rows)))
        return digest.hexdigest()[:16]

    def _write_manifest(self, keys: np.ndarray, texts: Callable[[int, int], Sequence[str]]) -> Dict[str, object]:
        """Writes the manifest, or checks an earlier export's (resumed here) against this run.

        Returns:
            Dict[str, object]: the manifest in the directory.
        """
        num_rows = len(keys)
        manifest = {
            "provenance": self._provenance,
            "chunk_rows": self._config.chunk_rows,
            "num_rows": num_rows,
            "keys_sha256": keys_sha256(keys),
            "texts_check": "chunk",  # each chunk's TEXTS_KEY, checked by _check_finished_chunks
            "num_chunks": self._num_chunks(num_rows),
            "key_column": self._config.key_column,
            "vector_column": self._config.vector_column,
        }
        path = manifest_path(self._directory)
        # one made by an earlier export, or first by another rank or an export launched here at the same time
        if os.path.exists(path) or not _create_manifest(path, manifest):
            return self._check_resumable(path, manifest, texts)
        return manifest

    def _check_resumable(self, path: str, manifest: Dict[str, object],
                         texts: Callable[[int, int], Sequence[str]]) -> Dict[str, object]:
        """The manifest at ``path`` of an earlier export, checked to be one this run (``manifest``) can resume; one
        begun before exports recorded their vocabulary drops this run's (provenance and ``manifest``).

        Raises:
            ProvenanceError: it was made with other provenance (vocabulary, --reuse or other settings).
            ValueError: it holds other rows, other texts, or other chunking or columns.
        """
        num_rows = manifest["num_rows"]
        existing = load_manifest(path)
        if "vocabulary" in self._provenance and "vocabulary" not in existing["provenance"]:
            # begun before exports recorded their vocabulary: resumed in that form (training checks it not)
            self._provenance = {k: v for k, v in self._provenance.items() if k != "vocabulary"}
            manifest["provenance"] = self._provenance
        try:
            check_provenance(existing["provenance"], self._provenance, path, complete=True)
        except ProvenanceError as error:
            theirs, ours = existing["provenance"].get("vocabulary"), self._provenance.get("vocabulary")
            if theirs != ours and theirs is not None and ours is not None:
                raise ProvenanceError(
                    f"{self._directory}: holds an export of data whose entity ids mean other values (its "
                    f"vocabulary {theirs}, this data's {ours}: a later day's grown vocabulary, or data prepared "
                    "again), which this one cannot resume or reuse: use another --output-dir (or delete this one "
                    "to replace it)"
                ) from error
            reused = existing["provenance"].get(REUSED_KEY)
            if reused != self._provenance.get(REUSED_KEY):
                how = ("without --reuse: its finished chunks hold vectors encoded afresh; resume it without "
                       "--reuse" if reused is None else
                       f"with --reuse of an export {reused} that this run does not name: its finished chunks "
                       "hold that export's vectors; resume it with the same --reuse")
                raise ProvenanceError(
                    f"{self._directory}: holds an export begun {how}, or use another --output-dir") from error
            raise ProvenanceError(
                f"{error}: it was exported with other settings than this run's; re-run with them to resume "
                "it, or use another --output-dir"
            ) from error
        settings = ("chunk_rows", "num_rows", "key_column", "vector_column")
        differs = [k for k in settings if existing[k] != manifest[k]]
        if not differs and existing.get("keys_sha256", manifest["keys_sha256"]) != manifest["keys_sha256"]:
            # as many rows, other keys or in another order (other splits, splits in another order, other
            # data): a finished chunk i would hold other rows than this run's chunk i
            raise ValueError(
                f"{self._directory}: holds an export of other rows (keys in another order, or other keys: other "
                "splits, the splits in another order, or other data), as many as this run's; use another "
                "--output-dir, or re-run with the splits it was made from"
            )
        if not differs and "texts_sha256" in existing \
                and existing["texts_sha256"] != self._texts_sha256(texts, num_rows):
            # an export made before the chunks recorded their texts' hash, of other texts for the same keys
            # (the data or its value texts prepared again): a finished chunk holds the vectors of the old texts
            raise ValueError(f"{self._directory}: {_OTHER_TEXTS}; {_OTHER_TEXTS_FIX}")
        if differs:
            theirs = ", ".join(f"{k}={existing[k]!r}" for k in differs)
            ours = ", ".join(f"{k}={manifest[k]!r}" for k in differs)
            done = all(os.path.exists(chunk_path(self._directory, i)) for i in range(int(existing["num_chunks"])))
            if done and "num_rows" in differs:
                raise ValueError(
                    f"{self._directory}: holds a finished export of num_rows={existing['num_rows']} rows or "
                    f"entities; this run's data and --splits give num_rows={num_rows} (other data, e.g. a later "
                    "day's, or other --splits): use another --output-dir (or delete this one to replace it)"
                )
            if done:
                raise ValueError(
                    f"{self._directory}: holds a finished export made with {theirs}; this run has {ours}. "
                    "Re-run with its settings to use it (e.g. the same --chunk-rows for --attach-dir), "
                    "or use another --output-dir (or delete this one to replace it)"
                )
            raise ValueError(
                f"{self._directory}: holds an unfinished export made with {theirs}; this run has {ours}, so "
                "it cannot resume it. Re-run with its settings, or use another --output-dir"
            )
        return existing

    def _check_finished_chunks(self, keys: pa.Array, texts: Callable[[int, int], Sequence[str]], rank: int,
                               world_size: int) -> None:
        """Renders the texts of this rank's finished chunks and compares their hash with the one each
        chunk recorded (the texts it was encoded from).

        Raises:
            ValueError: a chunk was encoded from other texts (naming it, its rows and keys), records no
                hash of its texts, or is not readable as Parquet (naming it).
        """
        from recsys_llm.semantics.vector_reader import read_chunk_schema  # it imports this module

        chunk_rows = self._config.chunk_rows
        for index in range(rank, self._num_chunks(len(keys)), world_size):
            path = chunk_path(self._directory, index)
            if not os.path.exists(path):
                continue
            recorded = (read_chunk_schema(path).metadata or {}).get(TEXTS_KEY)
            if recorded is None:
                # written into this export by a recsys_llm from before the chunks recorded their texts' hash
                raise ValueError(
                    f"{path}: records no hash of the texts it was encoded from ({TEXTS_KEY.decode()} in its schema "
                    f"metadata), which every chunk of this export's {MANIFEST} does (texts_check 'chunk'), so a "
                    "resume cannot tell whether its texts changed; delete it, and re-run to encode it again"
                )
            start, stop = index * chunk_rows, min((index + 1) * chunk_rows, len(keys))
            if recorded.decode() != _hash_texts(hashlib.sha256(), self._chunk_texts(texts, start, stop)):
                raise ValueError(
                    f"{self._directory}: {_OTHER_TEXTS}: {os.path.basename(path)} (rows [{start}, {stop}), keys "
                    f"{keys[start].as_py()} to {keys[stop - 1].as_py()}) was encoded from other texts; "
                    f"{_OTHER_TEXTS_FIX}"
                )

    @staticmethod
    def _chunk_texts(texts: Callable[[int, int], Sequence[str]], start: int, stop: int) -> Sequence[str]:
        """``texts(start, stop)``, checked to hold a text per row."""
        chunk_texts = texts(start, stop)
        if len(chunk_texts) != stop - start:
            raise ValueError(f"texts({start}, {stop}) returned {len(chunk_texts)} texts, expected {stop - start}")
        return chunk_texts

    def _num_chunks(self, num_rows: int) -> int:
        return (num_rows + self._config.chunk_rows - 1) // self._config.chunk_rows

    def pending_chunks(self, num_rows: int, rank: int = 0, world_size: int = 1) -> List[int]:
        """Chunks of this rank whose file does not exist yet."""
        return [i for i in range(rank, self._num_chunks(num_rows), world_size)
                if not os.path.exists(chunk_path(self._directory, i))]

    def _encode(
        self,
        texts: Sequence[str],
        encode_fn: Callable[[List[str]], torch.Tensor],
        keys: pa.Array,
        path: str,
        on_batch: Callable[[int], object],
    ) -> np.ndarray:
        """Vectors (n, d) of one chunk's ``texts`` in the storage dtype; ``on_batch(rows)`` after each encoder call.

        Raises:
            ValueError: a vector holds NaN/inf (before or after the cast to the storage
                dtype), naming the chunk ``path`` and the first such row's key; ``encode_fn`` gave other than
                one vector per text; or the projection is of another width than the encoder's vectors.
        """
        parts = []
        for start in range(0, len(texts), self._config.batch_size):
            batch = list(texts[start : start + self._config.batch_size])
            vectors = torch.as_tensor(encode_fn(batch)).float().cpu()  # (b, d)
            if vectors.dim() != 2 or vectors.size(0) != len(batch):
                raise ValueError(
                    f"{path}: encode_fn gave vectors of shape {tuple(vectors.shape)} for {len(batch)} texts; expected "
                    f"({len(batch)}, d): one vector per text, in the order of the texts"
                )
            if self._projection is not None:
                mean, components = self._projection
                if vectors.dim() != 2 or vectors.size(1) != components.size(0):
                    raise ValueError(
                        f"VectorExportConfig.projection={self._config.projection!r} (semantics export --projection) "
                        f"projects vectors of width {components.size(0)}, but the encoder gives vectors of shape "
                        f"{tuple(vectors.shape)}; fit it (fit_projection) on vectors of this model and --output"
                    )
                vectors = (vectors - mean) @ components  # (b, k)
            parts.append(vectors.numpy())
            on_batch(len(vectors))
        encoded = np.concatenate(parts)  # (n, d) float32
        with np.errstate(over="ignore"):  # a float16 overflow becomes inf, refused below
            stored = encoded.astype(DTYPES[self._config.dtype][0])
        bad = first_non_finite_row(stored)
        if bad is not None:
            first, count, value = bad
            largest = np.abs(encoded[first]).max()
            cause = ("the encoder gave NaN/inf" if not np.isfinite(encoded[first]).all() else
                     f"a value beyond the {self._config.dtype} range (largest |value| {largest:.4g}; store float32)")
            raise ValueError(
                f"{path}: not written: the vector of key {keys[first].as_py()} holds "
                f"{value}: {cause}; {count} of {len(stored)} rows of "
                "this chunk are not finite. Expected finite vectors (check the model, its dtype and the pooling)"
            )
        return stored

    def _chunk_vectors(
        self,
        texts: Sequence[str],
        encode_fn: Callable[[List[str]], torch.Tensor],
        keys: pa.Array,
        path: str,
        on_batch: Callable[[int], object],
        reuse: Optional[Callable[[np.ndarray], Tuple[np.ndarray, np.ndarray]]],
    ) -> np.ndarray:
        """Vectors (n, d) of one chunk: those ``reuse`` holds for its ``keys``, the others encoded from their
        ``texts`` (:meth:`_encode`)."""
        if reuse is None:
            return self._encode(texts, encode_fn, keys, path, on_batch)
        found, kept = reuse(keys.to_numpy(zero_copy_only=False))
        on_batch(int(found.sum()))
        new = np.flatnonzero(~found)
        if not len(new):
            return kept.astype(DTYPES[self._config.dtype][0], copy=False)
        encoded = self._encode([texts[i] for i in new], encode_fn, keys.take(pa.array(new)), path, on_batch)
        if len(kept) and kept.shape[1] != encoded.shape[1]:
            raise ValueError(f"{path}: the reused vectors are {kept.shape[1]}-d, the encoder gives "
                             f"{encoded.shape[1]}-d ones; reuse an export of this model and --output")
        out = np.empty((len(found), encoded.shape[1]), dtype=encoded.dtype)
        out[found], out[new] = kept, encoded
        return out

    def _checked_keys(self, keys: pa.Array) -> Tuple[pa.Array, np.ndarray]:
        """``keys`` as one int64 array and as numpy (N,), checked to be some, none null and none repeated."""
        keys = pc.cast(keys, pa.int64())
        if isinstance(keys, pa.ChunkedArray):
            keys = keys.combine_chunks()
        if not len(keys):
            raise ValueError(
                f"{self._directory}: no keys to export (splits without rows, or an entity field without an id); an "
                "export of no vectors has no width, and an entity table loaded from it would be all zeros"
            )
        if keys.null_count:
            first = int(np.argmax(~np.asarray(keys.is_valid())))
            raise ValueError(
                f"{self._directory}: {keys.null_count} of the {len(keys)} keys to export are null (first: position "
                f"{first}); expected an int64 key for every row (a row export's keys are the schema's row_key column)"
            )
        key_values = keys.to_numpy(zero_copy_only=False)  # (N,) int64
        require_unique_keys(key_values, f"{self._directory}: the keys to export")
        return keys, key_values

    def _write_chunk(self, path: str, table: pa.Table) -> None:
        """Writes a chunk's ``table`` to ``path`` atomically, after removing the temp files a killed run left."""
        for stale in glob.glob(f"{glob.escape(path)}.*.tmp"):  # left by a killed run of this rank
            with contextlib.suppress(FileNotFoundError):  # or an export beside this one's, renamed meanwhile
                os.remove(stale)
        # a chunk file that exists is complete: Ctrl-C, SIGTERM or a full disk leave no half-written one
        try:
            write_file_atomically(path, lambda handle: pq.write_table(table, handle))
        except FileNotFoundError:
            if not os.path.isdir(self._directory):
                raise
            # another export of these settings (the manifest matched) into this --output-dir, started at
            # the same time, removed this temp file as a killed run's above: its chunk of the same rows
            # is whole once there, else this one is written again (removing no temp file this time)
            if not os.path.exists(path):
                write_file_atomically(path, lambda handle: pq.write_table(table, handle))

    def run(
        self,
        keys: pa.Array,
        texts: Callable[[int, int], Sequence[str]],
        encode_fn: Callable[[List[str]], torch.Tensor],
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        progress: bool = True,
        reuse: Optional[Callable[[np.ndarray], Tuple[np.ndarray, np.ndarray]]] = None,
    ) -> List[int]:
        """Encodes and writes this rank's missing chunks.

        Args:
            keys (pa.Array): (N,) int64 keys (row ids or entity ids), in source order.
            texts (Callable[[int, int], Sequence[str]]): ``texts(start, stop)`` gives the texts
                of source rows ``[start, stop)`` (rendered lazily, one chunk at a time).
            encode_fn (Callable[[List[str]], torch.Tensor]): texts -> (n, d) vectors.
            rank (Optional[int]): this rank (default: torchrun's ``RANK``).
            world_size (Optional[int]): number of ranks (default: torchrun's ``WORLD_SIZE``).
            progress (bool): show a tqdm bar.
            reuse (Optional[Callable]): ``keys (n,) -> (found (n,) bool, vectors (found.sum(), d))``, the vectors
                kept from an earlier export (:func:`~recsys_llm.semantics.entity_reuse.reused_vectors`); only
                the other keys' texts are encoded. None: every key's.

        Returns:
            List[int]: the chunks written by this call.

        Raises:
            FileExistsError: the directory holds an entry an export does not write (:func:`check_export_dir`).
            ValueError: there is no key, a key is null or repeats, ``rank`` is not below
                ``world_size``, or the directory holds an export this run cannot resume (other
                settings or rows, before any work; or a chunk of this rank encoded from other texts
                than this run's for its keys, named before this rank encodes), or a chunk of this
                rank records no hash of its texts or is not readable as Parquet (named).
        """
        env_rank, env_world = rank_and_world()
        rank = env_rank if rank is None else rank
        world_size = env_world if world_size is None else world_size
        if not 0 <= rank < world_size:
            # rank 1 of 1 (RANK set, WORLD_SIZE not) would write chunks 1, 2, ...: those of rank 0 too
            raise ValueError(
                f"{self._directory}: rank {rank} of world size {world_size} (RANK, WORLD_SIZE); expected "
                "0 <= RANK < WORLD_SIZE, as torchrun sets them: each rank writes the chunks i with i % WORLD_SIZE == RANK"
            )
        keys, key_values = self._checked_keys(keys)
        check_export_dir(self._directory)
        os.makedirs(self._directory, exist_ok=True)
        if self._write_manifest(key_values, texts).get("texts_check") == "chunk":
            self._check_finished_chunks(keys, texts, rank, world_size)  # before any encoding
        pending = self.pending_chunks(len(keys), rank, world_size)
        provenance = json.dumps(self._provenance, sort_keys=True).encode()
        written = []
        chunk_rows = self._config.chunk_rows
        rows = sum(min(chunk_rows, len(keys) - index * chunk_rows) for index in pending)
        description = f"export vectors (rank {rank}/{world_size})"
        with tqdm(total=rows, desc=description, unit="row", disable=not progress, **bar_options()) as bar:
            for index in pending:
                start = index * chunk_rows
                stop = min(start + chunk_rows, len(keys))
                chunk_texts = self._chunk_texts(texts, start, stop)
                path = chunk_path(self._directory, index)
                chunk_keys = keys.slice(start, stop - start)
                vectors = self._chunk_vectors(chunk_texts, encode_fn, chunk_keys, path, bar.update, reuse)  # (n, d)
                column = vector_array(vectors, DTYPES[self._config.dtype][1])
                table = pa.table({self._config.key_column: chunk_keys, self._config.vector_column: column})
                texts_sha256 = _hash_texts(hashlib.sha256(), chunk_texts).encode()
                table = table.replace_schema_metadata({PROVENANCE_KEY: provenance, TEXTS_KEY: texts_sha256})
                self._write_chunk(path, table)
                written.append(index)
        return written


# ---- the manifest of a finished export --------------------------------------------------
def read_manifest(directory: str, expected: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """The manifest of a finished export, checked for completeness and provenance.

    Raises:
        FileNotFoundError: no manifest (not an export directory).
        ValueError: chunks are missing (the export has not finished).
        ProvenanceError: provenance differs from ``expected``.
    """
    path = manifest_path(directory)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory}: no {MANIFEST} (nor the {LEGACY_MANIFEST} of an export written before "
                                "2026-12-06); not a vector export directory")
    manifest = load_manifest(path)
    if expected is not None:
        check_provenance(manifest["provenance"], expected, path)
    missing = [i for i in range(int(manifest["num_chunks"])) if not os.path.exists(chunk_path(directory, i))]
    if missing:
        raise ValueError(
            f"{directory}: export unfinished, {len(missing)} of {manifest['num_chunks']} chunks missing "
            f"(first: {missing[:5]}); re-run the export to complete it (ranks on several hosts write their "
            "chunks into one --output-dir: it must be a volume every host mounts at the same path)"
        )
    return manifest


MANIFEST_KEYS = ("provenance", "chunk_rows", "num_rows", "num_chunks", "key_column", "vector_column")


def load_manifest(path: str) -> Dict[str, Any]:
    """The parsed export manifest at ``path`` (:func:`manifest_path`).

    Raises:
        ValueError: it is not a JSON object with the manifest's keys (a damaged file).
    """
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise ValueError(
            f"{path}: damaged export manifest, not valid JSON ({error}); re-run the export into an empty --output-dir"
        ) from error
    if not isinstance(manifest, dict) or not set(MANIFEST_KEYS) & set(manifest):
        found = f"keys {sorted(manifest)}" if isinstance(manifest, dict) else f"a JSON {type(manifest).__name__}"
        raise ValueError(
            f"{path}: not a vector export manifest (written by `recsys-llm semantics export`): expected a JSON "
            f"object with {list(MANIFEST_KEYS)}, found {found}; {os.path.dirname(path) or '.'} holds something else "
            "than a vector export"
        )
    missing = [k for k in MANIFEST_KEYS if k not in manifest]
    if missing:
        raise ValueError(
            f"{path}: damaged export manifest, expected a JSON object with {list(MANIFEST_KEYS)}, lacks {missing}; "
            "re-run the export into an empty --output-dir"
        )
    chunk_rows, num_rows, num_chunks = (manifest[k] for k in ("chunk_rows", "num_rows", "num_chunks"))
    counts = (chunk_rows, num_rows, num_chunks)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in counts) or chunk_rows < 1 or num_rows < 0 \
            or num_chunks != (num_rows + chunk_rows - 1) // chunk_rows:
        raise ValueError(
            f"{path}: damaged export manifest: chunk_rows={chunk_rows!r}, num_rows={num_rows!r}, "
            f"num_chunks={num_chunks!r}; expected integers, chunk_rows >= 1 and num_chunks = ceil(num_rows / "
            "chunk_rows); re-run the export into an empty --output-dir"
        )
    return manifest


def keys_sha256(keys: Any) -> str:
    """The manifest's ``keys_sha256``: of the export's keys (N,) in their order, as little-endian int64."""
    return hashlib.sha256(np.ascontiguousarray(keys, dtype="<i8").tobytes()).hexdigest()[:16]
