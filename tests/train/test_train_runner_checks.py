"""The runner's checks of a run's inputs and records that need no training: a mistyped cold-item
column, a damaged ``plugins.json`` / ``results.json`` in a run directory, a run directory that
not every rank sees; and the readers the config asks for."""

import dataclasses
import os
import re
import shutil
import threading
from typing import List

import pyarrow.parquet as pq
import pytest
import torch

from recsys_llm.data.schema import DatasetSchema
from recsys_llm.train.config import ConfigError, load_config
from recsys_llm.train.distributed import DistContext
from recsys_llm.train.run_data import build_readers, check_split_names, metric_subsets
from recsys_llm.train.run_records import check_same_data, check_trained_on, finished_results

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEEPFM_CONFIG = os.path.join(REPO, "configs", "synthetic_deepfm.yaml")


def _config(schema_dir: str, *overrides: str):
    return load_config(DEEPFM_CONFIG, [f"data.schema={schema_dir}", "data.synthetic_rows=0", *overrides])


@pytest.mark.parametrize("prefetch, threads", [(0, 0), (5, 1)])
def test_the_readers_prefetch_as_the_config_says(synthetic_dir: str, synthetic_schema, prefetch: int, threads: int,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """``data.prefetch`` reaches every reader: 0 reads in the training thread, more in one background thread."""
    started: List[str] = []
    start = threading.Thread.start
    monkeypatch.setattr(threading.Thread, "start", lambda thread: (started.append(thread.name), start(thread))[1])
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
    readers = build_readers(_config(synthetic_dir, f"data.prefetch={prefetch}"), synthetic_schema, ctx)
    assert sorted(readers) == ["test", "train", "valid"]
    for name, reader in readers.items():
        started.clear()
        batches = iter(reader)
        next(batches)
        assert started.count("parquet-prefetch") == threads, name
        batches.close()


def test_a_mistyped_cold_item_column_is_refused_naming_the_columns(synthetic_dir: str, synthetic_schema) -> None:
    """Before, ``data.cold_item_column=nope`` silently dropped the cold-item metrics."""
    assert metric_subsets(_config(synthetic_dir), synthetic_schema) == {"cold": "is_cold_item"}
    assert metric_subsets(_config(synthetic_dir, "data.cold_item_column="), synthetic_schema) == {}  # off
    with pytest.raises(ConfigError) as refused:
        metric_subsets(_config(synthetic_dir, "data.cold_item_column=nope"), synthetic_schema)
    message = str(refused.value)
    assert message.startswith("data.cold_item_column='nope': the data has no such extra column")
    assert "extra_columns of" in message and "['is_cold_item']" in message  # what the schema offers
    assert "test.parquet: [" in message and "'item_id'" in message and "'is_cold_item'" in message  # the file's
    assert "data.cold_item_column=''" in message


def test_evaluating_a_run_without_a_test_split_asks_for_the_split(synthetic_dir: str, synthetic_schema,
                                                                  monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """A run trained with ``data.test_split=`` has no default split to evaluate: the '' was read as a Parquet
    path (": no such Parquet file or directory"), naming neither the setting nor ``evaluate --split``."""
    from recsys_llm.train import trained_run

    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
    monkeypatch.setattr(trained_run, "open_trained_run",
                        lambda config, checkpoint: trained_run.TrainedRun(checkpoint, ctx, synthetic_schema))
    monkeypatch.setattr(trained_run, "load_trained_model", lambda config, run: pytest.fail("no split: no model"))
    with pytest.raises(ValueError) as refused:
        trained_run.run_evaluation(_config(synthetic_dir, "data.test_split="), "runs/no_test")
    assert str(refused.value) == (
        "no split to evaluate: data.test_split is '' (the run reports no test split); name a split of the run's data "
        "or a Parquet file or directory, e.g. evaluate --split data/day3/test.parquet (the next day's rows prepared "
        "with `prepare tabular --like` the run's data)")
    # a split name the schema lacks (a typo) is named with the flag before the model loads
    with pytest.raises(ValueError) as refused:
        trained_run.run_evaluation(_config(synthetic_dir), "runs/x", "tset")
    assert str(refused.value) == (f"--split tset: not a split of schema {synthetic_schema.name!r} (splits: "
                                  "test, train, valid) nor a Parquet file or directory")
    # rows without labels (a day to score) are pointed to export and score before the model loads
    rows = str(tmp_path / "to_score.parquet")
    pq.write_table(pq.read_table(synthetic_schema.split_path("test")).drop_columns([synthetic_schema.label]), rows)
    with pytest.raises(ValueError, match=rf"--split {re.escape(rows)}: its rows have no label column "
                                         rf"{synthetic_schema.label!r}.*recsys-llm export --checkpoint runs/x "
                                         r"--output ARTIFACT`\) and run `recsys-llm score"):
        trained_run.run_evaluation(_config(synthetic_dir), "runs/x", rows)


def test_the_default_cold_item_column_may_be_absent(synthetic_dir: str, tmp_path) -> None:
    """Data without cold items (ML-100K, Criteo) has no ``is_cold_item``: no cold metrics, no error."""
    data = str(tmp_path / "data")
    shutil.copytree(synthetic_dir, data)
    schema = DatasetSchema.load(data)
    schema.extra_columns = []
    schema.save(os.path.join(data, "schema.json"))
    schema = DatasetSchema.load(data)
    assert metric_subsets(_config(data), schema) == {}
    # a column the files have but the schema does not list: say how to make it count
    with pytest.raises(ConfigError, match=r"data.cold_item_column='label': .*test.parquet has that column, but the "
                                          r"schema does not list it in extra_columns: add it there"):
        metric_subsets(_config(data, "data.cold_item_column=label"), schema)


def _run_dir(tmp_path, plugins: str) -> str:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("data: {}\n", encoding="utf-8")
    (run_dir / "plugins.json").write_text(plugins, encoding="utf-8")
    return str(run_dir / "config.yaml")


@pytest.mark.parametrize("text, problem", [
    ('{"a":\n}', r"not valid JSON \(JSONDecodeError: Expecting value: line 2 column 1 \(char 6\)\)"),
    ("{\n  ", r"not valid JSON \(JSONDecodeError: Expecting property name enclosed in double quotes: line 2"),
    ("[1, 2]", "holds a JSON list, expected an object"),
    ("[" * 100_000 + "]" * 100_000, r"not valid JSON \(RecursionError"),
])
def test_a_damaged_plugins_json_is_named_with_what_is_wrong(synthetic_schema, tmp_path, text, problem) -> None:
    """Before: ``recsys-llm train: error: Expecting value: line 2 column 1 (char 6)``, no file named."""
    saved_config = _run_dir(tmp_path, text)
    plugins = os.path.join(os.path.dirname(saved_config), "plugins.json")
    with pytest.raises(ConfigError, match=rf"^{plugins}: damaged run record, {problem}.*restore it, or delete it"):
        check_trained_on(synthetic_schema, saved_config, "run")


def test_an_intact_plugins_json_is_still_checked(synthetic_schema, tmp_path) -> None:
    saved_config = _run_dir(tmp_path, '{"schema_fingerprint": "other"}')
    with pytest.raises(ConfigError, match="run: trained on data with schema fingerprint other"):
        check_trained_on(synthetic_schema, saved_config, "run")


def test_a_resume_on_another_days_data_names_both_directories_and_train_init_from(synthetic_schema,
                                                                                     tmp_path) -> None:
    """Day 2's data given to day 1's run directory by mistake: the refusal said the data "in" day 2's directory
    "changed since this run started" (it started on day 1's) and named no way to train day 2 from day 1's run."""
    plugins = str(tmp_path / "runs" / "day1" / "plugins.json")
    record = {"settings": {"data": {"schema": str(tmp_path / "day1")}}, "data_fingerprints": {"train": "a+b"}}
    with pytest.raises(ConfigError, match=rf"^{plugins}: this run started on {tmp_path / 'day1'}, and data.schema now "
                                          rf"names {synthetic_schema.root}, whose split\(s\) \['train'\] hold other "
                                          rf"rows; a resume would train on both\. .*train\.init_from="
                                          rf"{tmp_path / 'runs' / 'day1'} train\.run_dir=NEW_DIR"):
        check_same_data(record, {"train": "c+d"}, synthetic_schema, plugins)
    # the run's own directory prepared again: said as before
    record["settings"]["data"]["schema"] = os.path.join(synthetic_schema.root, "schema.json")
    with pytest.raises(ConfigError, match=r"the data of split\(s\) \['train'\] in .* changed since this run started"):
        check_same_data(record, {"train": "c+d"}, synthetic_schema, plugins)
    check_same_data(record, {"train": "a+b"}, synthetic_schema, plugins)  # the same rows, wherever they are


def test_a_damaged_results_json_is_named(tmp_path) -> None:
    (tmp_path / "results.json").write_bytes(b'{"test": ')
    with pytest.raises(ConfigError, match=rf"^{tmp_path}/results.json: damaged run record, not valid JSON"):
        finished_results(str(tmp_path))
    (tmp_path / "results.json").write_text('{"global_step": 3}', encoding="utf-8")
    assert finished_results(str(tmp_path)) == {"global_step": 3}


def test_a_bad_plugin_value_is_refused_before_the_data_is_made(tmp_path) -> None:
    """``data.synthetic_rows`` generates missing data first; a bad ``elec`` value used to be
    refused only after that (when the task was built). Loading the config names it with the override; a config
    built in Python is refused by the trainer before the data is made."""
    import dataclasses

    from recsys_llm.train.runner import run_training

    data = str(tmp_path / "data")
    base = [f"data.schema={data}", "data.synthetic_rows=2000", f"train.run_dir={tmp_path / 'run'}"]
    with pytest.raises(ConfigError, match=r"^command-line override\(s\) .*elec.vector_dim=0: elec.vector_dim must be an "
                                          "integer >= 1, got 0"):
        load_config(DEEPFM_CONFIG, [*base, "elec.task=gain", "elec.vector_dim=0"])
    with pytest.raises(ConfigError, match="'llactr' and 'elec' sections are both set"):
        load_config(DEEPFM_CONFIG, [*base, "elec.task=gain", "llactr.vectors_path=fields.safetensors"])
    config = load_config(DEEPFM_CONFIG, base)
    with pytest.raises(ValueError, match="elec.vector_dim must be an integer >= 1, got 0"):
        run_training(dataclasses.replace(config, elec={"vector_dim": 0}))
    with pytest.raises(ValueError, match="'llactr' and 'elec' sections are both set"):
        run_training(dataclasses.replace(config, elec={"task": "gain"}, llactr={"vectors_path": "fields.safetensors"}))
    assert not os.path.exists(data) and not os.path.exists(tmp_path / "run")


def test_a_new_offline_student_run_refuses_entity_exports_it_would_not_read(tmp_path) -> None:
    """They were recorded in plugins.json as the run's vectors, unread; the fields alone are fine.
    Only new runs are refused: a run of an earlier version that names them still loads."""
    from recsys_llm.modules.elec import ELECConfig
    from recsys_llm.train.runner import run_training
    from recsys_llm.train.task_builder import check_offline_reads_no_vectors

    data = str(tmp_path / "data")
    offline = ["elec.task=distill", "elec.distill.mode=offline", "elec.vector_source=entity_table"]
    config = load_config(DEEPFM_CONFIG, [f"data.schema={data}", "data.synthetic_rows=2000",
                                         f"train.run_dir={tmp_path / 'run'}", *offline,
                                         "elec.entity_field=item_id", "elec.entity_vectors=vectors/items"])
    with pytest.raises(ConfigError, match=r"'offline' reads the teacher's outputs .* named for \['item_id'\]"):
        run_training(config)
    assert not os.path.exists(data) and not os.path.exists(tmp_path / "run")
    fields_only = ELECConfig.from_dict({"task": "distill", "distill": {"mode": "offline"},
                                        "vector_source": "entity_table", "entity_tables": {"item_id": None}})
    check_offline_reads_no_vectors(fields_only)
    frozen = ELECConfig.from_dict({"task": "distill", "distill": {"mode": "frozen"}, "teacher_checkpoint": "t",
                                   "vector_source": "entity_table", "entity_tables": {"item_id": "vectors/items"}})
    check_offline_reads_no_vectors(frozen)  # a frozen teacher's exports are checked when they are loaded


def test_a_new_run_refuses_elec_settings_it_would_not_read(tmp_path) -> None:
    """A teacher checkpoint beside a joint teacher (trained from scratch) or an offline student, and entity tables
    beside per-row vectors, were silently ignored (and recorded in plugins.json as the run's); a joint teacher with
    no loss weight, and a student with no KD weight, trained without error."""
    from recsys_llm.modules.elec import ELECConfig
    from recsys_llm.train.runner import run_training
    from recsys_llm.train.task_builder import check_elec_settings_are_read

    data = str(tmp_path / "data")
    config = load_config(DEEPFM_CONFIG, [f"data.schema={data}", "data.synthetic_rows=2000",
                                         f"train.run_dir={tmp_path / 'run'}", "elec.task=distill",
                                         "elec.distill.mode=joint", "elec.teacher_checkpoint=runs/gain_state"])
    with pytest.raises(ConfigError, match=r"elec.teacher_checkpoint=runs/gain_state is read only by elec.distill.mode "
                                          r"'frozen', and the mode is 'joint' \(the teacher trains from scratch"):
        run_training(config)
    assert not os.path.exists(data) and not os.path.exists(tmp_path / "run")
    offline = ELECConfig.from_dict({"task": "distill", "distill": {"mode": "offline"}, "teacher_checkpoint": "t"})
    with pytest.raises(ConfigError, match=r"the mode is 'offline' \(the teacher's outputs come from the data\)"):
        check_elec_settings_are_read(offline)
    for task in ("gain", "distill"):
        per_row = ELECConfig.from_dict({"task": task, "entity_field": "item_id", "entity_vectors": "vectors/items"})
        with pytest.raises(ConfigError, match=r"name entity vector tables for \['item_id'\], but elec.vector_source "
                                              r"is 'extras'.* set elec.vector_source=entity_table"):
            check_elec_settings_are_read(per_row)
    for trains_tables in ({"task": "gain"}, {"task": "distill", "distill": {"mode": "joint"}}):
        # failed once sharded (after the data was read) as "export directory '' not found"
        unfilled = ELECConfig.from_dict({**trains_tables, "vector_source": "entity_table", "entity_field": "item_id"})
        with pytest.raises(ConfigError, match=r"elec.entity_tables: fields \['item_id'\] name no export directory"):
            check_elec_settings_are_read(unfilled)
    # a joint teacher that never trains (the student learnt from its random weights), a student without KD
    never_trains = ELECConfig.from_dict({"task": "distill", "distill": {"mode": "joint", "teacher_loss_weight": 0}})
    with pytest.raises(ConfigError, match=r"teacher_loss_weight=0 in mode 'joint': .* keep its random initial weights"):
        check_elec_settings_are_read(never_trains)
    no_kd = ELECConfig.from_dict({"task": "distill", "distill": {"mode": "frozen", "alpha": 0, "beta": 0},
                                  "teacher_checkpoint": "t"})
    with pytest.raises(ConfigError, match=r"alpha=0 and elec.distill.beta=0: no distillation term"):
        check_elec_settings_are_read(no_kd)
    for fine in ({"task": "distill", "distill": {"mode": "frozen"}, "teacher_checkpoint": "t"},
                 {"task": "distill", "distill": {"mode": "frozen", "teacher_loss_weight": 0}, "teacher_checkpoint": "t"},
                 {"task": "distill", "distill": {"mode": "joint", "alpha": 0}},
                 {"task": "gain", "distill": {"alpha": 0, "beta": 0}},
                 {"task": "gain", "teacher_checkpoint": "t"},  # one config file for the teacher and its student
                 {"task": "distill", "distill": {"mode": "frozen"}, "teacher_checkpoint": "t",  # the teacher's tables
                  "vector_source": "entity_table", "entity_field": "item_id"},
                 {"task": "distill", "distill": {"mode": "offline"}, "entity_tables": {"item_id": None}}):
        check_elec_settings_are_read(ELECConfig.from_dict(fine))


def _train_from(working_dir: str, schema_dir: str) -> str:
    """Trains into the relative train.run_dir ``runs/x`` from ``working_dir`` (one per rank: as if each host had its
    own disk); returns the error."""
    from recsys_llm.train.run_records import SHARED_CHECK_WAIT_ENV
    from recsys_llm.train.runner import run_training

    os.environ[SHARED_CHECK_WAIT_ENV] = "1"
    os.makedirs(working_dir, exist_ok=True)
    os.chdir(working_dir)
    try:
        run_training(_config(schema_dir, "train.run_dir=runs/x", "train.epochs=1", "train.max_steps=1"))
    except ConfigError as exc:
        return str(exc)
    return ""


def _per_rank_working_dir(root: str, schema_dir: str) -> str:
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    error = _train_from(os.path.join(root, f"host{rank}"), schema_dir)
    if dist.is_initialized():
        dist.destroy_process_group()
    return error


@pytest.mark.multiprocess
def test_a_run_dir_that_not_every_rank_sees_is_refused_before_any_rank_reads_it(synthetic_dir: str, tmp_path) -> None:
    """A relative train.run_dir from two working directories (or a path inside each host's container): rank 1 would
    decide from its own, empty, directory whether to resume, and write its checkpoint shards where rank 0 never
    reads them."""
    from tests.multiprocess import run_multiprocess

    root = str(tmp_path)
    os.makedirs(os.path.join(root, "host0", "runs", "x"))  # rank 0's host holds an earlier run's directory
    errors = run_multiprocess(_per_rank_working_dir, world_size=2, root=root, schema_dir=synthetic_dir)
    assert errors[0] == errors[1]
    assert errors[0].startswith("runs/x: train.run_dir is not shared by every rank: rank 1 on ")
    assert re.search(r"did not see the file runs/x/\.shared-check-[0-9a-f]{32} that rank 0 \(on ", errors[0])
    assert "put it on a volume every host mounts at the same path" in errors[0]
    assert os.listdir(os.path.join(root, "host0", "runs", "x")) == []  # the check's file is gone again
    assert not os.path.exists(os.path.join(root, "host1", "runs"))  # nothing written on rank 1's side


def _shared_check(run_dir: str) -> List[str]:
    from recsys_llm.train.distributed import barrier, init_distributed
    from recsys_llm.train.run_records import check_run_dir_shared

    init_distributed("cpu")
    check_run_dir_shared(run_dir, wait_s=1)
    barrier()  # rank 0 has removed the file
    return sorted(os.listdir(os.path.dirname(run_dir)))


@pytest.mark.multiprocess
def test_a_shared_run_dir_passes_and_keeps_nothing_of_the_check(tmp_path) -> None:
    """A new run's directory does not exist yet: the file goes into its nearest parent, and is removed."""
    from tests.multiprocess import run_multiprocess

    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "earlier").mkdir()
    assert run_multiprocess(_shared_check, world_size=2, run_dir=str(tmp_path / "runs" / "new")) == [["earlier"]] * 2


def _shared_check_beside(run_dir: str, other: str) -> List[str]:
    """The check with another job's check file in the parent; returns what that file holds afterwards."""
    from recsys_llm.train.distributed import barrier, init_distributed
    from recsys_llm.train.run_records import check_run_dir_shared

    init_distributed("cpu")
    check_run_dir_shared(run_dir, wait_s=1)
    barrier()
    with open(other, encoding="utf-8") as handle:
        return [handle.read(), *sorted(os.listdir(os.path.dirname(run_dir)))]


@pytest.mark.multiprocess
def test_the_check_leaves_alone_the_file_of_another_job_checking_the_same_parent(tmp_path) -> None:
    """Two jobs of a sweep whose new run dirs share a parent check there at once: neither overwrites or removes the
    other's file (with one file name, job B's token made job A's ranks fail, and whichever rank 0 removed the file
    second raised alone, leaving its other ranks in their next collective)."""
    from tests.multiprocess import run_multiprocess

    (tmp_path / "runs").mkdir()
    other = tmp_path / "runs" / ".shared-check"  # as another job's rank 0 wrote it, its ranks still reading it
    other.write_text("token of the other job", encoding="utf-8")
    assert run_multiprocess(_shared_check_beside, world_size=2, run_dir=str(tmp_path / "runs" / "a"),
                            other=str(other)) == [["token of the other job", ".shared-check"]] * 2


def _shared_check_waiting(run_dir: str, wait: str) -> str:
    from recsys_llm.train.distributed import init_distributed
    from recsys_llm.train.run_records import SHARED_CHECK_WAIT_ENV, check_run_dir_shared

    os.environ[SHARED_CHECK_WAIT_ENV] = wait  # here: the ranks are forked from a server started before this test
    init_distributed("cpu")
    try:
        check_run_dir_shared(run_dir)
    except ValueError as exc:
        return str(exc)
    return ""


@pytest.mark.multiprocess
def test_a_wait_that_is_no_number_is_refused_on_every_rank_naming_the_variable(tmp_path) -> None:
    from recsys_llm.train.run_records import SHARED_CHECK_WAIT_ENV
    from tests.multiprocess import run_multiprocess

    errors = run_multiprocess(_shared_check_waiting, world_size=2, run_dir=str(tmp_path / "run"), wait="1m")
    assert errors[0] == errors[1] and errors[0].startswith(
        f"${SHARED_CHECK_WAIT_ENV} (seconds a rank waits for rank 0's check file; got '1m') must be a finite number >= 0")


def test_a_run_dir_holding_only_a_killed_jobs_check_file_is_still_a_new_run_dir(tmp_path) -> None:
    from recsys_llm.train.run_records import SHARED_CHECK_FILE, check_run_dir_is_ours

    (tmp_path / f"{SHARED_CHECK_FILE}-0123abcd").write_text("0123abcd")  # rank 0 was killed mid-check
    check_run_dir_is_ours(str(tmp_path))
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"holds no run of recsys-llm train \(it has notes.txt;"):
        check_run_dir_is_ours(str(tmp_path))


def test_a_split_without_the_teacher_outputs_of_an_offline_student_is_named_with_the_command_that_writes_them(
        synthetic_dir: str, tmp_path) -> None:
    """`teacher-outputs --splits train` (a plausible choice) left valid without them: training failed on the valid
    reader with 'missing extra column(s) ... asked for by the reader (extras)', which said neither why nor what to run."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = str(tmp_path / "data")
    shutil.copytree(synthetic_dir, data)
    train = os.path.join(data, "train.parquet")
    table = pq.read_table(train)
    pq.write_table(table.append_column("teacher_logits", pa.array([0.0] * table.num_rows, pa.float32())), train)
    config = _config(data, "elec.task=distill", "elec.distill.mode=offline", "elec.distill.beta=0")
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
    with pytest.raises(ConfigError, match=re.escape(os.path.join(data, "valid.parquet")) + r" \(split 'valid'\): no "
                                          r"column\(s\) \['teacher_logits'\]; offline distillation reads the teacher's "
                                          r"outputs in every split .*`recsys-llm teacher-outputs"):
        build_readers(config, DatasetSchema.load(os.path.join(data, "schema.json")), ctx)


def test_a_new_run_refuses_expected_provenance_where_no_entity_export_is_read() -> None:
    """elec.expected_provenance is checked on entity exports only: beside per-row vectors (the data's column) or an
    offline student (no LLM vector) it was silently ignored, and plugins.json recorded it as if the vectors had it."""
    from recsys_llm.modules.elec import ELECConfig
    from recsys_llm.train.task_builder import check_elec_settings_are_read

    for raw, why in (({"task": "gain"}, r"elec.vector_source is 'extras'"),
                     ({"task": "distill", "distill": {"mode": "joint"}}, r"elec.vector_source is 'extras'"),
                     ({"task": "distill", "distill": {"mode": "offline"}, "vector_source": "entity_table",
                       "entity_tables": {"item_id": None}}, r"elec.distill.mode is 'offline'")):
        config = ELECConfig.from_dict({**raw, "expected_provenance": {"model": "minilm"}})
        with pytest.raises(ConfigError, match=rf"elec.expected_provenance=\{{'model': 'minilm'\}} is checked on entity "
                                              rf"vector exports only, and none is read \({why}"):
            check_elec_settings_are_read(config)
    check_elec_settings_are_read(ELECConfig.from_dict({"task": "gain", "vector_source": "entity_table",
                                                       "entity_tables": {"item_id": "vectors/items"},
                                                       "expected_provenance": {"model": "minilm"}}))


def test_a_run_record_of_an_older_version_compares_the_footers_only(synthetic_schema) -> None:
    """Records written before splits were also fingerprinted by their bytes hold the footers' hash alone."""
    from recsys_llm.train.run_records import DATA_FINGERPRINTS_KEY, changed_splits

    current = {"train": "aaaa+bbbb", "valid": "cccc+dddd"}
    older = {DATA_FINGERPRINTS_KEY: {"train": "aaaa", "valid": "cccc"}}
    assert changed_splits(older, current) == []
    assert changed_splits({DATA_FINGERPRINTS_KEY: {"train": "aaaa+eeee", "valid": "xxxx"}}, current) == ["train", "valid"]


def test_a_finished_run_on_a_schema_changed_since_names_what_changed(synthetic_schema, tmp_path) -> None:
    import json

    from recsys_llm.train.config import DataConfig, ExperimentConfig
    from recsys_llm.train.run_records import PLUGINS_FILE, SCHEMA_CONTENTS_KEY, SCHEMA_FINGERPRINT_KEY, data_differences

    recorded = synthetic_schema.fingerprinted()
    first = recorded["fields"][0]
    recorded["fields"][0] = {**first, "cardinality": first["cardinality"] - 1}
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / PLUGINS_FILE).write_text(json.dumps({SCHEMA_FINGERPRINT_KEY: "0123456789abcdef",
                                                    SCHEMA_CONTENTS_KEY: recorded}))
    (line,) = data_differences(ExperimentConfig(data=DataConfig(schema=synthetic_schema.root)), str(run_dir))
    assert line.startswith(f"the schema of {synthetic_schema.root}: fingerprint 0123456789abcdef -> ")
    assert f"({first['name']}: cardinality {first['cardinality'] - 1} -> {first['cardinality']})" in line


def _resume_after_a_plan_record_of_other_column_shards(schema_dir: str, run_dir: str) -> str:
    """Trains 2 steps, then records in sharding_plan.json that ``t_user_id`` was saved in two column shards, as a
    run on another world size or device is, and resumes; returns the refusal."""
    import json

    from recsys_llm.train.runner import run_training

    overrides = [f"train.run_dir={run_dir}", "train.epochs=1", "train.progress=false", "data.validate=false"]
    run_training(_config(schema_dir, *overrides, "train.max_steps=2"))
    record_path = os.path.join(run_dir, "sharding_plan.json")
    with open(record_path, encoding="utf-8") as handle:
        record = json.load(handle)
    width = record["t_user_id"]["shards"][0]["sizes"][1]
    record["t_user_id"]["sharding_type"] = "column_wise"
    record["t_user_id"]["shards"] = [{"rank": 0, "offsets": [0, 0], "sizes": [1, width // 2]},
                                     {"rank": 0, "offsets": [0, width // 2], "sizes": [1, width - width // 2]}]
    with open(record_path, "w", encoding="utf-8") as handle:
        json.dump(record, handle)
    try:
        run_training(_config(schema_dir, *overrides, "train.max_steps=4"))
    except ConfigError as error:
        return str(error)
    return ""


@pytest.mark.multiprocess
def test_a_resume_under_a_plan_that_splits_columns_otherwise_is_refused_before_loading(synthetic_dir: str,
                                                                                      tmp_path) -> None:
    from tests.multiprocess import run_multiprocess

    refusal, = run_multiprocess(_resume_after_a_plan_record_of_other_column_shards, world_size=1,
                                schema_dir=synthetic_dir, run_dir=str(tmp_path / "run"))
    assert "'t_user_id' 2 (column_wise) -> 1 (table_wise) column shards" in refusal, refusal
    assert refusal.startswith(str(tmp_path / "run" / "sharding_plan.json"))


def _resume_into_unwritable(schema_dir: str, run_dir: str, refused: str) -> str:
    """Trains 2 steps, then resumes with ``run_dir/refused`` refused to this user (root writes anywhere but on a
    read-only mount, so the refusal is stood in for); returns the error."""
    from recsys_llm.train.runner import run_training

    overrides = [f"train.run_dir={run_dir}", "train.epochs=1", "train.progress=false", "data.validate=false"]
    run_training(_config(schema_dir, *overrides, "train.max_steps=2"))
    refused = os.path.join(run_dir, refused)
    access = os.access
    # refused for writing only (a file of another user's, written under umask 022, still exists and reads)
    os.access = lambda path, mode: not (os.path.abspath(path) == os.path.abspath(refused) and mode & os.W_OK) \
        and access(path, mode)
    try:
        run_training(_config(schema_dir, *overrides, "train.max_steps=4"))
    except PermissionError as error:
        return str(error)
    finally:
        os.access = access
    return ""


@pytest.mark.multiprocess
@pytest.mark.parametrize("refused", ["checkpoints", "metrics.jsonl"])
def test_a_resume_into_files_it_cannot_write_is_refused_before_training(synthetic_dir: str, tmp_path,
                                                                        refused: str) -> None:
    """It trained until its first save, then failed on 'checkpoints/ckpt-00000027.tmp: Permission denied'; another
    user's run (directories made group-writable, files written under umask 022) built the model and loaded the
    checkpoint, then failed appending to metrics.jsonl."""
    from tests.multiprocess import run_multiprocess

    refusal, = run_multiprocess(_resume_into_unwritable, world_size=1, schema_dir=synthetic_dir,
                                run_dir=str(tmp_path / "run"), refused=refused)
    assert refusal.startswith(f"{tmp_path / 'run' / refused}: not writable here (permissions, or a read-only "
                              "mount), so the resumed run would fail when it first writes there"), refusal
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text(encoding="utf-8")
    assert metrics.count('"event": "resumed"') == 0  # refused before the run's records changed


def test_a_split_files_stats_move_with_its_mtime_and_with_a_file_put_in_its_place(synthetic_dir: str, tmp_path) -> None:
    """The first look for a change between epochs: a file rewritten to the same size, or copied back over itself
    (same size and mtime, another inode), must not pass for the file the run started with."""
    from types import SimpleNamespace

    from recsys_llm.train.run_records import split_file_stats

    data = str(tmp_path / "data")
    shutil.copytree(synthetic_dir, data)
    schema = DatasetSchema.load(data)
    config = SimpleNamespace(data=SimpleNamespace(train_split="train", valid_split=None, test_split=None))
    path = schema.split_path("train")
    first = split_file_stats(config, schema)
    assert split_file_stats(config, schema) == first
    status = os.stat(path)
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns + 10**9))
    assert split_file_stats(config, schema) != first
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))
    shutil.copy2(path, path + ".copy")
    os.replace(path + ".copy", path)  # same bytes, size and mtime: another inode
    assert os.stat(path).st_mtime_ns == status.st_mtime_ns and split_file_stats(config, schema) != first


def _train_on_one_training_row(root: str) -> str:
    from recsys_llm.train.runner import run_training

    try:
        run_training(_config(os.path.join(root, "data"), "train.progress=false",
                             f"train.run_dir={os.path.join(root, 'run')}"))
    except ValueError as error:
        return str(error)
    return "no error"


@pytest.mark.multiprocess
def test_a_training_split_that_gives_a_rank_no_batch_is_refused_before_the_run_directory(tmp_path) -> None:
    """One training row on two ranks: rank 1 has no row, and the ranks train in step (equal batch counts)."""
    import pyarrow.parquet as pq

    from recsys_llm.data.synthetic import generate_synthetic
    from tests.multiprocess import run_multiprocess

    generate_synthetic(str(tmp_path / "data"), 400, seed=0)  # here: the ranks would each write it, over each other
    train = str(tmp_path / "data" / "train.parquet")
    pq.write_table(pq.read_table(train).slice(0, 1), train)
    errors = run_multiprocess(_train_on_one_training_row, world_size=2, root=str(tmp_path))
    assert errors == ["training split 'train' has 1 row(s) for 2 ranks: a rank gets none to train on; run at most "
                      "1 rank(s), or train on more rows"] * 2
    assert not os.path.exists(tmp_path / "run")


def test_a_days_data_without_valid_and_test_splits_names_both_settings_at_once(synthetic_dir: str,
                                                                              synthetic_schema) -> None:
    """A day prepared ``--like`` holds one split: the valid and the test split are named in one refusal (before,
    clearing ``data.valid_split`` only led to a second refusal for ``data.test_split``)."""
    day = dataclasses.replace(synthetic_schema, splits={"train": synthetic_schema.splits["train"]})
    with pytest.raises(ConfigError) as refused:
        check_split_names(_config(synthetic_dir), day)
    assert str(refused.value) == (
        f"data.valid_split='valid' and data.test_split='test': {day.root} has no such split (it has ['train']); "
        "set data.valid_split='' data.test_split='' to train without a valid or a test split")
    with pytest.raises(ConfigError, match=r"^data\.test_split='test': .*set data\.test_split='' to train without a "
                                          r"test split$"):
        check_split_names(_config(synthetic_dir, "data.valid_split="), day)
    check_split_names(_config(synthetic_dir, "data.valid_split=", "data.test_split="), day)


def _config_check(schema_dir: str, root: str, rank_one: List[str]) -> List[str]:
    """Rank 1 adds the overrides ``rank_one`` (another copy of the config file on its host); what the check raises
    naming at most 5 (the default), 1 and 2 keys per rank ("passed" where it raises nothing)."""
    from recsys_llm.train.distributed import init_distributed
    from recsys_llm.train.run_records import check_same_config_on_every_rank

    ctx = init_distributed("cpu")
    config = _config(schema_dir, f"train.run_dir={root}/run", *(rank_one if ctx.rank == 1 else []))
    raised = []
    for most in (5, 1, 2):
        try:
            check_same_config_on_every_rank(config, shown=most)
            raised.append("passed")
        except ConfigError as exc:
            raised.append(str(exc))
    return raised


@pytest.mark.multiprocess
def test_ranks_started_with_different_settings_are_refused_on_every_rank_naming_the_keys(synthetic_dir: str,
                                                                                         tmp_path) -> None:
    """A config file that differed on one host failed in torchrec's sharding ("Shard tensor size does not match with
    metadata.shard_lengths"), and a setting that keeps the shapes trained each rank's dense replica otherwise.
    The same settings written otherwise (the data directory's schema.json for the directory) pass."""
    from tests.multiprocess import run_multiprocess

    schema_json = os.path.join(synthetic_dir, "schema.json")
    same = run_multiprocess(_config_check, world_size=2, schema_dir=synthetic_dir, root=str(tmp_path),
                            rank_one=[f"data.schema={schema_json}"])
    assert same == [["passed"] * 3] * 2
    raised = run_multiprocess(_config_check, world_size=2, schema_dir=synthetic_dir, root=str(tmp_path),
                              rank_one=["model.embedding_dim=8", "optim.dense_lr=0.01"])
    assert raised[0] == raised[1]
    prefix, suffix = ("the ranks were started with different settings (rank 0's -> theirs): rank 1: ",
                      ". Every rank must run the same --config and overrides: the same config file on every host")
    assert raised[0] == [prefix + "model.embedding_dim: 16 -> 8; optim.dense_lr: 0.001 -> 0.01" + suffix,
                         prefix + "model.embedding_dim: 16 -> 8 (and 1 more)" + suffix,  # at most 1 named
                         prefix + "model.embedding_dim: 16 -> 8; optim.dense_lr: 0.001 -> 0.01" + suffix]
