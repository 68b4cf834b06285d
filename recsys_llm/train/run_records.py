"""A run directory's records and the checks a job makes against them: ``plugins.json`` (schema,
data and vectors the run trained with), ``results.json``, ``metrics.jsonl``'s standing records, the
lock of the job training there."""

import contextlib
import hashlib
import json
import math
import os
import socket
import time
import uuid
from typing import IO, Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import numpy as np

from recsys_llm.atomic_dir import TryAgainLater, try_lock
from recsys_llm.data.parquet_files import resolve_paths, same_split_fingerprint, split_fingerprint
from recsys_llm.data.schema import DatasetSchema
from recsys_llm.data.schema_changes import moved_hashed_text_fields, schema_change_note, schema_changes
from recsys_llm.data.validation import DataError, check_number
from recsys_llm.error_text import telling_line
from recsys_llm.semantics.vector_export import REUSED_KEY
from recsys_llm.train.checkpoint import TRAIN_STATE_FILE, run_dir_of
from recsys_llm.train.config import (PLUGINS_FILE, SETTINGS_KEY, ConfigError, ExperimentConfig, config_differences,
                                     config_from_dict, load_config, schema_json_path)
from recsys_llm.train.distributed import host_group

RESULTS_FILE = "results.json"
METRICS_FILE = "metrics.jsonl"
PLAN_FILE = "sharding_plan.json"  # the plan the run trained with (a resume checks its table layout)
# metrics.jsonl: the first record of every job, started from scratch or resumed from a checkpoint
STARTED_EVENT = "started"
RESUMED_EVENT = "resumed"
FINISHED_EVENT = "finished"  # the job ended: results.json written (its last record)
TRAIN_WINDOW_EVENT = "train_window"  # windowed training metrics (train.metrics_window) at a global step
REDONE_KEY = "redone"  # of a resumed record: events at its step that the killed job wrote after the checkpoint
# what a run directory holds once its checks have passed (config.yaml and results.json are
# common names, so they do not mark a directory as a run's)
RUN_MARKERS = (METRICS_FILE, PLAN_FILE, "checkpoints", "best")
RUN_LOCK_FILE = ".lock"  # rank 0 of a training job holds an exclusive lock on it
# rank 0 writes a token into ".shared-check-<token>" that every rank must read back (a name of its own: two jobs
# whose new run dirs share a parent check there at once)
SHARED_CHECK_FILE = ".shared-check"
# seconds a rank waits for rank 0's file to show (a network file system may list a new file late)
SHARED_CHECK_WAIT_ENV = "RECSYS_LLM_SHARED_DIR_WAIT_S"
SHARED_CHECK_WAIT_S = 60.0
# parts of the llactr record that describe where and when, not which, vectors; and schema_contents, which
# follows from the schema_fingerprint compared beside it (a file of an older version records it empty)
VECTOR_RECORD_PLACE_KEYS = frozenset({"config", "vectors", "created_at", "created_by", "schema_contents"})
SCHEMA_FINGERPRINT_KEY = "schema_fingerprint"  # in PLUGINS_FILE: the data set's schema the run trained on
SCHEMA_CONTENTS_KEY = "schema_contents"  # in PLUGINS_FILE: what that fingerprint hashes (DatasetSchema.fingerprinted)
DATA_FINGERPRINTS_KEY = "data_fingerprints"  # in PLUGINS_FILE: split -> the Parquet footers' hash of its files
VOCABULARIES_KEY = "vocabularies"  # in PLUGINS_FILE: DatasetSchema.vocabulary_records, which ids meant which


def _read_splits(config: ExperimentConfig, schema: DatasetSchema) -> List[str]:
    data = config.data
    splits = [split for split in (data.train_split, data.valid_split, data.test_split) if split and split in schema.splits]
    return list(dict.fromkeys(splits))


def data_fingerprints(config: ExperimentConfig, schema: DatasetSchema) -> Dict[str, str]:
    """Split name -> :func:`~recsys_llm.data.parquet_files.split_fingerprint` of every split the run reads."""
    return {split: split_fingerprint(schema, split) for split in _read_splits(config, schema)}


def split_file_stats(config: ExperimentConfig, schema: DatasetSchema) -> List[Tuple[str, int, int, int]]:
    """(path, size, mtime in ns, inode) of every file of the splits the run reads: a cheap first look for a change
    before :func:`data_fingerprints` reads their footers (and bytes)."""
    stats = []
    for split in _read_splits(config, schema):
        for path in resolve_paths(schema, split):
            status = os.stat(path)
            stats.append((path, status.st_size, status.st_mtime_ns, status.st_ino))
    return stats


def changed_splits(saved_record: Dict[str, Any], current: Dict[str, str]) -> List[str]:
    """The splits of ``current`` (:func:`data_fingerprints`) whose fingerprint differs from the one
    ``saved_record`` (a run's ``plugins.json``) holds; splits it has none for (older runs) are not compared."""
    saved = saved_record.get(DATA_FINGERPRINTS_KEY) or {}
    return [split for split in current if split in saved and not same_split_fingerprint(saved[split], current[split])]


def data_differences(config: ExperimentConfig, run_dir: str) -> List[str]:
    """Whether the data ``config`` names is still what the finished run in ``run_dir`` trained and was
    tested on: its ``plugins.json`` records the schema fingerprint and each split's Parquet-footer hash,
    so the same config on a directory prepared again with other rows (same fields and sizes) differs.
    Runs without that record (older ones), or data not there yet, are not compared.

    Returns:
        List[str]: what differs, one line each (empty: the same data).
    """
    plugins, schema_file = os.path.join(run_dir, PLUGINS_FILE), schema_json_path(config.data.schema)
    if not os.path.isfile(plugins) or not os.path.isfile(schema_file):
        return []
    saved = read_run_record(plugins)
    schema = DatasetSchema.load(schema_file)
    if saved.get(SCHEMA_FINGERPRINT_KEY) not in (None, schema.fingerprint()):
        return [f"the schema of {schema.root}: fingerprint {saved[SCHEMA_FINGERPRINT_KEY]} -> {schema.fingerprint()}"
                + schema_change_note(saved.get(SCHEMA_CONTENTS_KEY), schema)]
    changed = changed_splits(saved, data_fingerprints(config, schema))
    if not changed:
        return []
    return [f"the data of split(s) {changed} in {schema.root} changed since the run (prepared again?)"]


def check_same_data(saved_record: Dict[str, Any], current: Dict[str, str], schema: DatasetSchema, source: str) -> None:
    """Raises when a split a resumed run reads now holds other rows than when the run started (the
    directory prepared again with the same fields and sizes): the run would go on with other data,
    and skip as many batches of it as it had trained of the old. Runs that recorded no data
    fingerprints (older ones) are not checked.

    Raises:
        ConfigError: naming the splits that changed, and, where ``data.schema`` now names another directory than
            the one the run started on (the next day's data, say), both directories and ``train.init_from``.
    """
    changed = changed_splits(saved_record, current)
    if not changed:
        return
    started_on = ((saved_record.get(SETTINGS_KEY) or {}).get("data") or {}).get("schema")
    if isinstance(started_on, str) and _data_dir(started_on) != _data_dir(schema.root):
        # another data directory than the run's own: most likely the next day's rows, meant for a run of their own
        raise ConfigError(
            f"{source}: this run started on {started_on}, and data.schema now names {schema.root}, whose split(s) "
            f"{changed} hold other rows; a resume would train on both. To train on these rows from this run's "
            f"weights, start another run from it: train.init_from={os.path.dirname(source) or '.'} "
            "train.run_dir=NEW_DIR; to resume, name the data the run started with"
        )
    raise ConfigError(
        f"{source}: the data of split(s) {changed} in {schema.root} changed since this run started (other rows "
        "under the same fields and sizes, e.g. prepared again); a resume would train on both. Restore the data "
        "the run started with, or train into another train.run_dir"
    )


def _data_dir(schema: str) -> str:
    """The data directory ``data.schema`` (a directory or its schema file) names, as a real path."""
    return os.path.realpath(os.path.dirname(schema_json_path(schema)))


def check_data_unchanged(config: ExperimentConfig, schema: DatasetSchema, started: Dict[str, str]) -> None:
    """Raises when a split the run reads holds other data than when it started (``started``:
    :func:`data_fingerprints` then): prepared again or its files replaced while it trained. Called
    between epochs: the run would go on with other rows (or ranks with other row counts, which wait
    on each other until the collective timeout) under the record of the first ones.

    Raises:
        DataError: naming the splits that changed.
    """
    changed = changed_splits({DATA_FINGERPRINTS_KEY: started}, data_fingerprints(config, schema))
    if changed:
        raise DataError(
            f"{schema.root}: the data of split(s) {changed} changed while this run trained (prepared again, or files "
            "replaced); it stops here, and its checkpoints hold what it trained on the data it started with: "
            "restore that data and run the same command to resume, or train on the new data into another "
            "train.run_dir"
        )


class RunDirBusyError(ConfigError, TryAgainLater):
    """Another job trains in the run directory, or changed its checkpoints while this one started."""


def lock_run_dir(run_dir: str) -> IO[str]:
    """Creates ``run_dir`` and takes an exclusive lock on ``run_dir/.lock`` (released when the returned
    file is closed, or its process ends, even by SIGKILL).

    Raises:
        RunDirBusyError: another process holds the lock (a job training in ``run_dir``).
    """
    os.makedirs(run_dir, exist_ok=True)
    handle = try_lock(os.path.join(run_dir, RUN_LOCK_FILE))
    if handle is None:
        raise RunDirBusyError(
            f"{run_dir}: another job is training in this train.run_dir (it holds {RUN_LOCK_FILE} there); wait for "
            "it to end (or stop it), or use another train.run_dir"
        )
    return handle


def _reads_token(path: str, token: str, wait_s: float) -> bool:
    """Whether the file at ``path`` holds ``token`` within ``wait_s`` seconds."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with open(path, encoding="utf-8") as handle:
                if handle.read() == token:
                    return True
        except OSError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(min(0.5, wait_s))


def _shared_check_wait_s() -> float:
    """``$RECSYS_LLM_SHARED_DIR_WAIT_S`` in seconds (60 when unset); a value that is no number >= 0 is named."""
    raw = os.environ.get(SHARED_CHECK_WAIT_ENV, "")
    if not raw.strip():
        return SHARED_CHECK_WAIT_S
    try:
        wait_s = float(raw)
    except ValueError:
        wait_s = math.nan
    check_number(f"${SHARED_CHECK_WAIT_ENV} (seconds a rank waits for rank 0's check file; got {raw!r})", wait_s,
                 minimum=0)
    return wait_s


def _nearest_directory(path: str) -> str:
    """``path`` or its nearest ancestor that is a directory, spelled as ``path`` is (relative stays relative)."""
    while path and not os.path.isdir(path):
        path = os.path.dirname(path)
    return path or "."


def check_run_dir_shared(
    run_dir: str,
    wait_s: Optional[float] = None,
    setting: str = "train.run_dir",
    use: str = "Every rank reads and writes checkpoints in train.run_dir",
) -> None:
    """Raises on every rank unless every rank sees the file rank 0 writes where ``run_dir`` is (collective).

    Every rank reads ``run_dir`` (whether to resume, and from which checkpoint) and writes its
    checkpoint shards there, so the ranks of a job on several hosts need one shared directory. With a
    directory local to each host (a path inside each container, or a relative path read from
    different working directories) a resume went on from a checkpoint on some ranks and from scratch
    on others, and a new run hung at its end with incomplete checkpoints everywhere. The file goes into
    ``run_dir``, or while it does not exist yet into its nearest existing parent, and is removed again;
    a token rather than the file's presence is compared, so one left on a host by an earlier job does
    not pass, and the file is named by its token, so jobs whose new run dirs share a parent (a sweep)
    check there at once without reading or removing each other's file; no rank returns before it is
    removed. One process, or a parent
    rank 0 cannot write to (the run would fail there anyway): nothing is checked.

    Args:
        run_dir (str): ``train.run_dir``, or another directory every rank must share.
        wait_s (Optional[float]): how long a rank waits for the file to show; None: ``$RECSYS_LLM_SHARED_DIR_WAIT_S``,
            else 60 s.
        setting (str): what the error calls ``run_dir`` (the config key or option that set it).
        use (str): the error's sentence on what every rank does there.

    Raises:
        ConfigError: naming the ranks (and their hosts) that do not see rank 0's file.
        ValueError: ``wait_s`` (or ``$RECSYS_LLM_SHARED_DIR_WAIT_S``) is no number >= 0 (on every
            rank, before any collective).
    """
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    # on every rank, before any collective
    if wait_s is None:
        wait_s = _shared_check_wait_s()
    else:
        check_number("check_run_dir_shared: wait_s", wait_s, minimum=0)
    group = host_group()
    shared: List[Optional[str]] = [None, None]  # (file path, token) as rank 0 wrote them
    if dist.get_rank() == 0:
        token = uuid.uuid4().hex
        path = os.path.join(_nearest_directory(run_dir), f"{SHARED_CHECK_FILE}-{token}")
        try:
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(token)
            shared = [path, token]
        except OSError:
            pass
    dist.broadcast_object_list(shared, src=0, group=group)  # after rank 0's write
    path, token = shared
    if path is None or token is None:
        return
    seen = dist.get_rank() == 0 or _reads_token(path, token, wait_s)
    answers: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(answers, (socket.gethostname(), seen), group=group)
    if dist.get_rank() == 0:
        with contextlib.suppress(OSError):  # raised on rank 0 alone, it would leave the others in their next collective
            os.remove(path)
    dist.barrier(group=group)  # no rank lists the directory while the file is still there
    blind = [f"rank {rank} on {host}" for rank, (host, sees) in enumerate(answers) if not sees]
    if blind:
        raise ConfigError(
            f"{run_dir}: {setting} is not shared by every rank: {', '.join(blind)} did not see the file {path} "
            f"that rank 0 (on {answers[0][0]}) wrote within {wait_s:g} s. {use}: put it on a volume every host "
            "mounts at the same path (an absolute path; a relative one is read from each rank's working directory)"
        )


def check_same_config_on_every_rank(config: ExperimentConfig, shown: int = 5) -> None:
    """Raises on every rank when the ranks were started with different settings (another config file on one
    host, an override given to some ranks only): a table's width that differed failed deep in torchrec's sharding
    ("Shard tensor size does not match with metadata.shard_lengths"), and a setting that keeps every shape (a
    learning rate, ``train.epochs``) trained each rank's replica of the dense part otherwise, or left one rank
    waiting in a collective the others never made.

    Args:
        config (ExperimentConfig): this rank's experiment, as its command line and config file made it.
        shown (int): at most this many differing keys are named per rank.

    Raises:
        ConfigError: naming each rank whose settings differ from rank 0's, with the keys and both values
            (:func:`~recsys_llm.train.config.config_differences`).
    """
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    settings = config.to_dict()
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode("utf-8")).hexdigest()
    digests: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest, group=host_group())
    if len(set(digests)) == 1:
        return
    everyone: List[Any] = [None] * dist.get_world_size()  # only when they differ: the settings to name
    dist.all_gather_object(everyone, settings, group=host_group())
    first = config_from_dict(everyone[0], "rank 0's settings")
    lines = []
    for rank, theirs in enumerate(everyone[1:], start=1):
        differences = config_differences(first, config_from_dict(theirs, f"rank {rank}'s settings"))
        if differences:
            more = f" (and {len(differences) - shown} more)" if len(differences) > shown else ""
            lines.append(f"rank {rank}: {'; '.join(differences[:shown])}{more}")
    if not lines:  # the same settings written otherwise (a plug-in's default given on one rank only)
        return
    raise ConfigError("the ranks were started with different settings (rank 0's -> theirs): " + " | ".join(lines)
                      + ". Every rank must run the same --config and overrides: the same config file on every host")


def check_run_dir_is_ours(run_dir: str) -> None:
    """Raises when ``run_dir`` holds files but is no run directory: training would write its
    config.yaml, results.json and checkpoints among (or over) them.

    Raises:
        ConfigError: naming the directory and a few of its entries.
    """
    entries = sorted(os.listdir(run_dir)) if os.path.isdir(run_dir) else []
    entries = [name for name in entries if not name.startswith(SHARED_CHECK_FILE)]  # a killed job's check file
    if entries and not any(marker in entries for marker in (*RUN_MARKERS, RUN_LOCK_FILE)):
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise ConfigError(
            f"{run_dir}: train.run_dir is not empty and holds no run of recsys-llm train (it has {shown}; a run "
            f"has {', '.join(RUN_MARKERS)}); training would write config.yaml, results.json and checkpoints "
            "among them. Use a new or empty train.run_dir"
        )


def _without_model_places(record: Dict[str, Any]) -> Dict[str, Any]:
    """An llactr record without where its model and SSFT adapter lay (``model_id``, the model
    directory's path, and ``extra.ssft_adapter``): for records whose ``model_hash`` says they are the same files."""
    record = {key: value for key, value in record.items() if key != "model_id"}
    if isinstance(record.get("extra"), dict):
        record["extra"] = {key: value for key, value in record["extra"].items() if key != "ssft_adapter"}
    return record


def changed_field_vectors(saved_plugins: Dict[str, Any], current_plugins: Dict[str, Any]) -> List[str]:
    """The provenance entries (model, SSFT adapter, template, schema, ...) of an LLaCTR run's vector
    file in which ``current_plugins`` differs from the ``saved_plugins`` a run recorded (``llactr``),
    sorted; where the file lies and when it was written, where the model and the adapter lay when both
    records' ``model_hash`` (their files' hash) is the same, the schema's full fingerprint when both records'
    ``schema_semantic_fingerprint`` is the same (a file encoded again after a table grew), and entries only one
    record has (written by another version), are not compared."""
    saved, current = saved_plugins.get("llactr"), current_plugins.get("llactr")
    if not saved or not current:
        return []
    current = json.loads(json.dumps(current, default=str))  # as plugins.json stores it
    if saved.get("model_hash") and saved.get("model_hash") == current.get("model_hash"):  # the same model files
        saved, current = _without_model_places(saved), _without_model_places(current)
    ignored = set(VECTOR_RECORD_PLACE_KEYS)
    if saved.get("schema_semantic_fingerprint") and \
            saved.get("schema_semantic_fingerprint") == current.get("schema_semantic_fingerprint"):
        ignored.add("schema_fingerprint")  # encoded again under a grown table: the same fields' texts
    keys = sorted((set(saved) & set(current)) - ignored)
    return [key for key in keys if saved[key] != current[key]]


# what check_same_field_vectors tells a resume to do; evaluate, export and train.init_from say their own
NEW_VECTORS_ADVICE = ("Pass the vector file the run started with (llactr.vectors_path; moved is fine), or train the "
                      "new vectors in another train.run_dir")


def check_same_field_vectors(saved_plugins: Dict[str, Any], current_plugins: Dict[str, Any], source: str,
                             advice: str = NEW_VECTORS_ADVICE) -> None:
    """Raises when an LLaCTR run's vector file (as a resume, evaluate or export names it) now holds
    other vectors than the run trained with.

    The checkpoint restores the vectors it trained with (FRE's and FIE's buffers, in the trained
    field order), so going on would train with the old vectors while ``plugins.json`` recorded the
    new ones, and a file of the same fields in another order would match the trained pair weights
    to the wrong fields. Moving the file, or writing the same vectors again, is fine; entries that
    only one of the two records has (written by another version) are not compared.

    Raises:
        ConfigError: naming the file, the vectors' path, the entries that differ (with the two values of each
        short one) and ``advice``.
    """
    differing = changed_field_vectors(saved_plugins, current_plugins)
    if differing:
        saved, current = saved_plugins["llactr"], json.loads(json.dumps(current_plugins["llactr"], default=str))

        def shown(key: str) -> str:
            both = f"{saved[key]!r} -> {current[key]!r}"
            return f"{key} {both}" if len(both) <= 120 else key

        raise ConfigError(
            f"{source}: this run trained with other field vectors than {current_plugins['llactr'].get('vectors')} "
            f"holds now (differing: {', '.join(shown(key) for key in differing)}); its checkpoint holds the vectors "
            f"it trained with. {advice}" + (f" (it read them from {saved['vectors']})" if saved.get("vectors") else "")
        )


def changed_frozen_teacher(saved_plugins: Dict[str, Any], current_plugins: Dict[str, Any]) -> Optional[str]:
    """How the frozen teacher of ``current_plugins`` differs from the one a run recorded in
    ``saved_plugins`` (``elec.frozen_teacher``: the digests of the training checkpoint its export was
    made from), e.g. ``"exported from A (train_state.json sha256 ...) -> exported from B (...) at EXPORT"``;
    None when it is the same trained state (moved, or exported again) or either record has no digests
    (no frozen teacher, a state written by hand)."""
    saved = (saved_plugins.get("elec") or {}).get("frozen_teacher") or {}
    current = (current_plugins.get("elec") or {}).get("frozen_teacher") or {}
    if not saved.get("checkpoint_sha256") or not current.get("checkpoint_sha256"):
        return None
    if saved["checkpoint_sha256"] == current["checkpoint_sha256"]:
        return None

    def described(record: Dict[str, Any]) -> str:
        state = record["checkpoint_sha256"].get(TRAIN_STATE_FILE, "?")
        return f"exported from {record.get('checkpoint')} ({TRAIN_STATE_FILE} sha256 {state[:12]})"

    return f"{described(saved)} -> {described(current)} at {current.get('export')}"


def changed_entity_vectors(saved_plugins: Dict[str, Any], current_plugins: Dict[str, Any],
                           ignored: Sequence[str] = ()) -> List[str]:
    """The entity tables whose export (``elec.entity_vectors``: provenance, key hash and count) now
    differs from the one a run recorded, e.g. ``"item_id (model: 'a' -> 'b')"``; fields that only one
    record has (an export not named, or a run written before the record existed) are not compared, nor the
    entries ``ignored`` (e.g. ``DAY_DEPENDENT_ENTITY_KEYS``), nor ``LATER_ENTITY_KEYS`` the run's record lacks (its
    export was made before exports wrote them: the same vectors exported again now have them)."""
    saved = (saved_plugins.get("elec") or {}).get("entity_vectors") or {}
    current = json.loads(json.dumps((current_plugins.get("elec") or {}).get("entity_vectors") or {}, default=str))

    def compared(record: Dict[str, Any], left_out: Set[str]) -> Dict[str, Any]:
        return {key: value for key, value in record.items() if key not in left_out}

    changes = []
    for field in sorted(set(saved) & set(current)):
        left_out = set(ignored) | (set(LATER_ENTITY_KEYS) - set(saved[field]))
        differing = _provenance_changes(compared(saved[field], left_out), compared(current[field], left_out))
        if differing:
            changes.append(f"{field} ({'; '.join(differing)})")
    return changes


#: entity-export provenance entries exports began to write after runs recorded exports (``vocabulary``: 2026-12-06);
#: a run whose record lacks one is not compared on it (its ``keys_sha256`` and ``num_rows`` still pin the ids)
LATER_ENTITY_KEYS = ("vocabulary",)

#: entity-export provenance entries that follow the day's data, not the LLM that wrote the vectors: a run started
#: from an earlier day's (``train.init_from``) names the day's export, which covers the grown vocabulary's new ids
#: (and may have reused the earlier export's vectors: ``semantics export --reuse``)
DAY_DEPENDENT_ENTITY_KEYS = ("keys_sha256", "num_rows", "vocabulary", REUSED_KEY)


def _provenance_changes(saved: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    """``["key: 'saved' -> 'current'", ...]`` for each entry in which two vector provenances differ; where the base
    model lay is not compared when both record the same files (it moved: its path is only a name)."""
    from recsys_llm.semantics.vector_export import same_model_files

    moved = same_model_files(saved, current)
    keys = sorted(key for key in set(saved) | set(current) if not (moved and key == "model"))
    return [f"{key}: {saved.get(key)!r} -> {current.get(key)!r}" for key in keys if saved.get(key) != current.get(key)]


def check_same_entity_vectors(saved_plugins: Dict[str, Any], current_plugins: Dict[str, Any], source: str) -> None:
    """Raises when an entity-table run's exports (as a resume names them) now hold other vectors
    than the run started with (:func:`changed_entity_vectors`): its checkpoint holds the tables it
    trained with, so going on would train with those while ``plugins.json`` recorded the new ones.

    Raises:
        ConfigError: naming the file, the fields and what differs.
    """
    changes = changed_entity_vectors(saved_plugins, current_plugins)
    if changes:
        raise ConfigError(
            f"{source}: the entity vector exports now hold other vectors than this run started with "
            f"({', '.join(changes)}); its checkpoint holds the tables it trained with. Restore the exports the run "
            "started with (elec.entity_tables), or train with the new vectors in another train.run_dir"
        )


def changed_row_vectors(saved: Optional[Dict[str, Any]], current: Optional[Dict[str, Any]]) -> List[str]:
    """How the provenance of per-row LLM vectors attached to the data (``elec.row_vectors``:
    :func:`~recsys_llm.semantics.vector_reader.attached_vectors_provenance`) differs from ``saved``, e.g.
    ``["weights_sha256: 'a1' -> 'b2'"]``; nothing where either records none (data attached, or a run trained,
    before the record existed). Where the base model lay is not compared when its files were the same."""
    return _provenance_changes(saved, current) if saved and current else []


def split_row_vector_changes(reference: Optional[Dict[str, Any]], schema: DatasetSchema, split: str) -> List[str]:
    """:func:`changed_row_vectors` of the per-row LLM vectors attached to ``split`` of ``schema`` (a split's name, or a
    Parquet file or directory), in ``reference``'s column, against ``reference`` (a run's record of the vectors it
    trained on, or its train split's); nothing where ``reference`` is None."""
    if not reference or not reference.get("column"):
        return []
    from recsys_llm.semantics.vector_reader import attached_vectors_provenance

    column = str(reference["column"])
    return changed_row_vectors(reference, attached_vectors_provenance(resolve_paths(schema, split), column))


def check_same_row_vectors(saved_plugins: Dict[str, Any], current_plugins: Dict[str, Any], source: str,
                           advice: str) -> None:
    """Raises when the data's per-row LLM vectors (``semantics export --attach-dir``) are of another provenance
    than those an ELEC run's network trained on (:func:`changed_row_vectors`): another adapted LLM's vectors,
    attached again into the same directory, would be read as the ones its weights learned.

    Raises:
        ConfigError: naming the file, what differs and ``advice``.
    """
    changes = changed_row_vectors((saved_plugins.get("elec") or {}).get("row_vectors"),
                                  (current_plugins.get("elec") or {}).get("row_vectors"))
    if changes:
        raise ConfigError(
            f"{source}: the data's per-row LLM vectors are not the ones this run's network trained on "
            f"({'; '.join(changes)}); {advice}"
        )


def check_same_frozen_teacher(saved_plugins: Dict[str, Any], current_plugins: Dict[str, Any], source: str) -> None:
    """Raises when a frozen-teacher run's ``elec.teacher_checkpoint`` (as a resume names it) now holds
    the export of another trained teacher than the run started with (:func:`changed_frozen_teacher`).

    The checkpoint restores the teacher the run learned from, so going on would distil from it
    while ``plugins.json`` recorded the new one.

    Raises:
        ConfigError: naming the file, both training checkpoints and the remedy.
    """
    change = changed_frozen_teacher(saved_plugins, current_plugins)
    if change is not None:
        raise ConfigError(
            f"{source}: elec.teacher_checkpoint now holds another trained teacher than this run learned from "
            f"({change}); its checkpoint holds the teacher it learned from. Pass that teacher's export, or distil "
            "from the new teacher in another train.run_dir"
        )


def resumed_frozen_teacher(saved_plugins: Dict[str, Any], current_plugins: Dict[str, Any]) -> Dict[str, Any]:
    """``current_plugins`` with the ``elec.frozen_teacher`` record of ``saved_plugins`` (the run's
    ``plugins.json``), for a resume to write back: its checkpoint holds the teacher the run started
    with, which the export at ``elec.teacher_checkpoint`` now may not show (deleted, moved, or never
    recorded by the version that started the run), so the record of that start stays; a run written
    before the record existed keeps none rather than one of a teacher it may not have learned from."""
    current = current_plugins.get("elec")
    if not isinstance(current, dict) or "frozen_teacher" not in current:
        return current_plugins
    saved = (saved_plugins.get("elec") or {}).get("frozen_teacher")
    elec = {key: value for key, value in current.items() if key != "frozen_teacher"}
    if saved is not None:
        elec["frozen_teacher"] = saved
    return {**current_plugins, "elec": elec}


def _plugins_of(checkpoint: str) -> Optional[str]:
    """The ``plugins.json`` of the run that wrote ``checkpoint`` (``run_dir/{checkpoints,best}/ckpt-N``); None
    without one (a checkpoint outside a run directory, or a run of an earlier version)."""
    run_dir = run_dir_of(checkpoint)
    path = os.path.join(run_dir, PLUGINS_FILE) if run_dir is not None else None
    return path if path is not None and os.path.isfile(path) else None


def trained_row_vectors(checkpoint: str) -> Optional[Dict[str, Any]]:
    """The provenance of the per-row LLM vectors the run that wrote ``checkpoint`` trained on (its ``plugins.json``:
    ``elec.row_vectors``); None where it records none."""
    path = _plugins_of(checkpoint)
    return (read_run_record(path).get("elec") or {}).get("row_vectors") if path is not None else None


LLACTR_PROVENANCE_KEYS = ("model_id", "model_hash", "pooling", "template", "max_length", "vectors")


def trained_llm_provenance(checkpoint: str) -> Optional[Dict[str, Any]]:
    """What LLM the run that wrote ``checkpoint`` took its vectors from, as its ``plugins.json`` records it: LLaCTR's
    field vectors (model, its fingerprint, the file), ELEC's entity exports (per field), row vectors and frozen
    teacher. An artifact keeps it (``config.json``: ``metadata.llm_provenance``), so which model's vectors it serves
    is told from the artifact alone after an LLM upgrade; None for a run without them (or no ``plugins.json``)."""
    path = _plugins_of(checkpoint)
    if path is None:
        return None
    plugins = read_run_record(path)
    found: Dict[str, Any] = {}
    llactr = plugins.get("llactr")
    if isinstance(llactr, dict):
        found["llactr"] = {key: llactr[key] for key in LLACTR_PROVENANCE_KEYS if key in llactr}
    elec = plugins.get("elec")
    if isinstance(elec, dict):
        for key in ("entity_vectors", "row_vectors", "frozen_teacher"):
            if elec.get(key):
                found.setdefault("elec", {})[key] = elec[key]
    return found or None


def check_same_entity_vector_source(checkpoint: str, current_plugins: Dict[str, Any], advice: str) -> None:
    """Raises when the entity exports a run names are of another LLM (or pooling, template, ...) than those the
    run that wrote ``checkpoint`` trained with (:func:`changed_entity_vectors` but for ``DAY_DEPENDENT_ENTITY_KEYS``);
    exports of other ids (a later day's, covering its grown vocabulary) pass. Nothing to check without that run's
    ``plugins.json``.

    Raises:
        ConfigError: naming the file, the fields and what differs, with ``advice``.
    """
    path = _plugins_of(checkpoint)
    if path is None:
        return
    changes = changed_entity_vectors(read_run_record(path), current_plugins, DAY_DEPENDENT_ENTITY_KEYS)
    if changes:
        raise ConfigError(
            f"{path}: that run trained on entity vectors of another source than the exports named now "
            f"({', '.join(changes)}): its weights read the other vectors' space. {advice}")


def check_trained_with_these_vectors(checkpoint: str, current_plugins: Dict[str, Any],
                                     advice: str = "Pass the vector file the run trained with (llactr.vectors_path; "
                                                   "moved is fine)",
                                     row_advice: str = "attach the vectors it trained on (semantics export "
                                                       "--attach-dir with its adapted LLM)") -> None:
    """:func:`check_same_field_vectors` (``advice`` its way out) and :func:`check_same_row_vectors` (``row_advice``)
    against the ``plugins.json`` of the run that wrote ``checkpoint`` (``run_dir/{checkpoints,best}/ckpt-N``);
    nothing to check without one (the config checks then let no vector path change: ``config.MOVABLE_PATH_KEYS``)."""
    path = _plugins_of(checkpoint)
    if path is not None:
        saved = read_run_record(path)
        check_same_field_vectors(saved, current_plugins, path, advice)
        check_same_row_vectors(saved, current_plugins, path, row_advice)


def earlier_throughput(run_dir: str) -> Tuple[Optional[float], Optional[int]]:
    """``(samples_per_second, world_size)`` of the newest earlier job in ``run_dir`` that trained a step: the mean of
    its epochs' figures in ``metrics.jsonl`` (as its ``results.json`` has it, or would have, had it not been killed
    before writing them) and the ranks they were taken on (None in records written before 2026-12-06), else those
    of ``results.json``; ``(None, None)`` when neither records one."""
    jobs = [job for job in _epoch_throughputs(read_metrics(run_dir)) if job]
    if jobs:
        sizes = {size for _, size in jobs[-1] if size is not None}
        return float(np.mean([figure for figure, _ in jobs[-1]])), (sizes.pop() if len(sizes) == 1 else None)
    earlier = finished_results(run_dir)
    return (earlier.get("samples_per_second"), earlier.get("world_size")) if earlier else (None, None)


def _epoch_throughputs(records: List[Dict[str, Any]]) -> List[List[Tuple[float, Optional[int]]]]:
    """Per job (in order, split at its start record): ``(samples_per_second, world_size)`` of its epochs that
    trained."""
    jobs: List[List[Tuple[float, Optional[int]]]] = [[]]
    for record in records:
        if record.get("event") in (STARTED_EVENT, RESUMED_EVENT):
            jobs.append([])
        elif record.get("event") == "epoch" and record.get("samples_per_second") is not None:
            jobs[-1].append((record["samples_per_second"], record.get("world_size")))
    return jobs


def read_metrics(run_dir: str) -> List[Dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl`` that stand (:func:`current_records`); [] without the file.

    A line that is no JSON object (a record cut off by a kill) is skipped.
    """
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.isfile(path):
        return []
    records = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return current_records(records)


def strict_json(value: Any) -> Any:
    """``value`` with every NaN / infinite float (at any depth of dicts and lists) as None: strict
    JSON (``jq``, JavaScript, ``json.loads(..., parse_constant=...)``) has no NaN, which a metric of
    a split with one class only (AUC) or a diverged loss would otherwise write."""
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(item) for item in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def _superseded(record: Dict[str, Any], step: int, redone: Set[Any]) -> bool:
    """Whether a ``resumed`` record at ``global_step`` ``step`` that redoes the events ``redone`` supersedes the
    earlier ``record``."""
    return record.get("global_step", 0) > step or (
        record.get("global_step", 0) == step and record.get("event") in redone)


def _drop_superseded_tail(kept: List[Dict[str, Any]], step: int, redone: Set[Any]) -> None:
    """Drops in place the records of ``kept`` (whose steps never go down) superseded by a resume at ``step``: only
    the last ones can be, so a run resumed 1,000s of times stays linear and the records before are not copied."""
    cut = len(kept)
    while cut and kept[cut - 1].get("global_step", 0) >= step:
        cut -= 1
    tail = kept[cut:]
    del kept[cut:]
    kept.extend(earlier for earlier in tail if not _superseded(earlier, step, redone))


def current_records(records: Iterable[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """``metrics.jsonl``'s records less those a later job superseded.

    A ``started`` record (a job that found no checkpoint) supersedes every record before it: they are
    a killed job's, which left no checkpoint. A ``resumed`` record supersedes the records before it of
    steps after its ``global_step``: the killed job trained them after the checkpoint it resumes from;
    and, at that step, those of the events it lists as ``redone`` (a checkpoint taken on an epoch's
    last step precedes that epoch's ``epoch`` / ``valid`` / ``early_stop`` records, which the resumed
    job writes again). Files written before jobs logged ``started`` keep a killed first job's records.
    """
    kept: List[Dict[str, Any]] = []
    in_order = True  # kept's steps never go down (as jobs write them): a resume drops only records at its end
    for record in records:
        if record.get("event") == STARTED_EVENT:
            kept, in_order = [], True
        elif record.get("event") == RESUMED_EVENT:
            step, redone = record.get("global_step", 0), set(record.get(REDONE_KEY, ()))
            if in_order:
                _drop_superseded_tail(kept, step, redone)
            else:
                kept = [earlier for earlier in kept if not _superseded(earlier, step, redone)]
        if kept and record.get("global_step", 0) < kept[-1].get("global_step", 0):
            in_order = False
        kept.append(record)
    return kept


def finished_results(run_dir: str) -> Optional[Dict[str, Any]]:
    """The ``results.json`` :func:`~recsys_llm.train.runner.run_training` wrote last in ``run_dir``, or None if it
    never finished: as ``run_training`` returned them, so a test metric the file holds as null (strict JSON
    has no NaN: a split of one class has no AUC) is NaN again."""
    path = os.path.join(run_dir, RESULTS_FILE)
    if not os.path.exists(path):
        return None
    results = read_run_record(path)
    if isinstance(results.get("test"), dict):
        results["test"] = {key: math.nan if value is None else value for key, value in results["test"].items()}
    return results


def check_trained_on(schema: DatasetSchema, saved_config: Optional[str], what: str, *,
                     advice: str = "use data prepared like the training data") -> None:
    """Raises ConfigError when the run of ``saved_config`` trained on data of another schema
    (e.g. the same directory prepared again with other sizes), or on other vocabularies (the same source
    prepared afresh instead of ``prepare tabular --like``; runs record them under :data:`VOCABULARIES_KEY`).
    ``advice``: what the message for another schema tells to do."""
    record = _trained_schema_record(saved_config)
    trained_on = record.get(SCHEMA_FINGERPRINT_KEY)
    if trained_on is not None and trained_on != schema.fingerprint():
        changes = schema_change_note(record.get(SCHEMA_CONTENTS_KEY), schema, " (other fields, sizes or descriptions)")
        raise ConfigError(
            f"{what}: trained on data with schema fingerprint {trained_on}, but {schema.root} has "
            f"{schema.fingerprint()}{changes}: {advice}"
        )
    _check_same_vocabularies(schema, saved_config, record, what)


def check_shared_fields(schema: DatasetSchema, saved_config: Optional[str], what: str) -> List[str]:
    """:func:`check_trained_on` for the fields both the run of ``saved_config`` and ``schema`` have (a run that
    takes only their tables, ``train.init_scope=tables``): each as it was (the same settings: cardinality, kind,
    embedding_dim, description, ...) and of the same vocabulary, or one grown from it. Returns their names.

    Raises:
        ConfigError: a shared field whose settings or vocabulary differ, or a shared hashed-text field at another
            position (its hash's salt), naming it; or a run that recorded no
            schema contents (written before runs recorded them) trained on data of another fingerprint, which
            cannot tell its fields.
    """
    record = _trained_schema_record(saved_config)
    contents, trained_on = record.get(SCHEMA_CONTENTS_KEY), record.get(SCHEMA_FINGERPRINT_KEY)
    if not isinstance(contents, dict) or not isinstance(contents.get("fields"), list):
        if trained_on is not None and trained_on != schema.fingerprint():
            raise ConfigError(f"{what}: trained on data with schema fingerprint {trained_on}, but {schema.root} has "
                              f"{schema.fingerprint()}, and its run recorded no schema contents that tell which fields "
                              "both share; use data prepared like its training data")
        return [spec.name for spec in schema.fields]
    before = {field.get("name") for field in contents["fields"] if isinstance(field, dict)}
    shared = [spec.name for spec in schema.fields if spec.name in before]
    changed = [change for change in schema_changes(contents, schema)
               if any(change.startswith(f"{name}: ") for name in shared)]
    changed += moved_hashed_text_fields(  # its hash's salt: the same text would read other rows of its table
        [str(field.get("name")) for field in contents["fields"] if isinstance(field, dict)],
        [spec.name for spec in schema.fields], [name for name in shared if schema.ids.get(name) == "hashed_text"])
    if changed:
        raise ConfigError(f"{what}: field(s) both runs have changed ({'; '.join(changed)}), so their tables would "
                          "read other values or have another shape; expected each shared field as that run had it: "
                          "prepare the data --like its training data (with --schema, a file of its fields plus the new "
                          "ones, to add fields)")
    _check_same_vocabularies(schema, saved_config, record, what, shared)
    return shared


def _check_same_vocabularies(schema: DatasetSchema, saved_config: Optional[str], record: Dict[str, Any], what: str,
                             fields: Optional[List[str]] = None) -> None:
    """Raises ConfigError where a vocabulary of ``schema`` (of ``fields`` alone, where given) means other values
    than the one the run of ``saved_config`` trained on (``record``: its ``plugins.json``)."""
    recorded = record.get(VOCABULARIES_KEY)
    other = schema.changed_vocabularies(recorded) if isinstance(recorded, dict) else []
    reference = _training_data(saved_config) if other else None
    if reference is not None:  # an earlier day's shorter vocabularies may be checked against it
        other = schema.changed_vocabularies(recorded, reference)
    if fields is not None:
        other = [name for name in other if name in fields]
    if other:
        trained_dir = os.path.dirname(schema_json_path(load_config(saved_config).data.schema))
        raise ConfigError(
            f"{what}: the vocabulary of field(s) {other} in {schema.root} is not the one the run trained on, so "
            f"the same values would read other rows of its tables ({schema.other_ids_cause(recorded)}); "
            f"{schema.same_ids_advice(trained_dir)}"
        )


def _training_data(saved_config: Optional[str]) -> Optional[DatasetSchema]:
    """The data the run of ``saved_config`` trained on, where its ``data.schema`` still names a readable schema file;
    None otherwise (moved, deleted or damaged: the checks it would serve refuse as without it)."""
    try:
        return DatasetSchema.load(schema_json_path(load_config(saved_config).data.schema))
    except (OSError, ValueError):  # ConfigError and SchemaError are ValueErrors
        return None


def trained_vocabularies(saved_config: Optional[str]) -> Dict[str, Any]:
    """The vocabularies the run of ``saved_config`` trained on (``plugins.json``; empty where it records none)."""
    recorded = _trained_schema_record(saved_config).get(VOCABULARIES_KEY)
    return recorded if isinstance(recorded, dict) else {}


def _trained_schema_record(saved_config: Optional[str]) -> Dict[str, Any]:
    """The ``plugins.json`` beside a run's ``config.yaml``, whose schema fingerprint and contents
    the checks read (empty for a bare checkpoint; a run written before runs recorded them lacks them)."""
    plugins = os.path.join(os.path.dirname(saved_config), PLUGINS_FILE) if saved_config else None
    if plugins is None or not os.path.isfile(plugins):
        return {}
    return read_run_record(plugins)


# what each record of a run directory is for, in the error for a damaged one
RUN_RECORD_ROLES = {
    PLUGINS_FILE: "it records the schema, data and plug-ins the run trained with, which a resume, evaluate and "
                  "export check against; restore it, or delete it (training writes it again; the checks it serves "
                  "are skipped until then)",
    RESULTS_FILE: "it holds the finished run's results; restore it, or delete it (training the run again writes it)",
}


def read_run_record(path: str) -> Dict[str, Any]:
    """The JSON object of a run directory's record (``plugins.json``, ``results.json``).

    Raises:
        ConfigError: the file is not valid UTF-8 JSON, or holds no JSON object: naming the file,
            the problem and what to do.
    """
    def damaged(problem: str) -> ConfigError:
        role = RUN_RECORD_ROLES.get(os.path.basename(path), "restore it, or delete it")
        return ConfigError(f"{path}: damaged run record, {problem}, not what `recsys-llm train` wrote; {role}")

    try:
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle)
    except (ValueError, RecursionError) as error:  # JSONDecodeError, UnicodeDecodeError; nested past the limit
        raise damaged(f"not valid JSON ({telling_line(error)})") from error
    if not isinstance(record, dict):
        raise damaged(f"holds a JSON {type(record).__name__}, expected an object")
    return record
