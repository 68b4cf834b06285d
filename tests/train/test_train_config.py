"""Config loading: YAML sections, typed ``key.sub=value`` overrides, clear errors."""

import dataclasses
import glob
import os
import re
from typing import Any, Dict

import pytest

from recsys_llm.modules.llactr import LLaCTRConfig
from recsys_llm.train.config import (
    ConfigError,
    ExperimentConfig,
    TrainConfig,
    config_differences,
    load_config,
    save_config,
)
from recsys_llm.train.sharding_config import OptimizerConfig, ShardingConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class TestLoadConfig:
    def test_overrides_are_typed_by_the_dataclass(self) -> None:
        config = load_config(
            os.path.join(REPO, "configs", "synthetic_deepfm.yaml"),
            [
                "train.epochs=7",
                "optim.dense_lr=1e-2",
                "model.mlp_layer_sizes=[64, 32]",
                "data.extras=llm_vector",
                "train.resume=false",
                "data.schema=123",
                "sharding.frozen_tables=[t_item_id]",
                "llactr.lambda_fre=0.5",
                "llactr.vectors_path=fields.safetensors",
            ],
        )
        assert config.train.epochs == 7 and isinstance(config.train.epochs, int)
        assert config.optim.dense_lr == pytest.approx(0.01) and isinstance(config.optim.dense_lr, float)
        assert config.model.mlp_layer_sizes == (64, 32)
        assert config.data.extras == ["llm_vector"]
        assert config.train.resume is False
        assert config.data.schema == "123"
        assert config.sharding.frozen_tables == ["t_item_id"]
        assert config.llactr == {"lambda_fre": 0.5, "vectors_path": "fields.safetensors"}  # parsed by the trainer
        # untouched values come from the file
        assert config.model.name == "deepfm" and config.sharding.sharding_types == ["table_wise", "row_wise"]

    @pytest.mark.parametrize(
        "override, message",
        [
            ("train.epoch=3", "train: unknown keys ['epoch']"),
            ("trian.epochs=3", "unknown keys ['trian']"),
            ("train.epochs=three", "train.epochs: expected an integer, got 'three'"),
            # digits int() does not take: a bare ValueError that named no key
            ("train.epochs=--3", "train.epochs: expected an integer, got '--3'"),
            ("train.epochs=\u00b2", "train.epochs: expected an integer, got '\u00b2'"),  # str.isdigit, not int()
            ("optim.dense_lr=[1]", "optim.dense_lr: expected a number"),
            ("train.resume=maybe", "train.resume: expected true/false"),
            # YAML's 0 and 1 are the only integers read as booleans
            ("train.resume=2", "train.resume: expected true/false, got 2"),
            ("optim.sparse=lion", "optim.sparse must be one of"),
            ("sharding.sharding_types=[diagonal]", "sharding.sharding_types: unknown values ['diagonal']"),
            # a table's own lists are checked as the global ones, naming the table's key
            ("sharding.table_constraints.t_user_id.compute_kernels=[fast]",
             "sharding.table_constraints.t_user_id.compute_kernels: unknown values ['fast']"),
            ("model.name=gpt", "unknown model 'gpt'"),
            ("train.epochs", "must look like section.key=value"),
            ("data.batch_size=0", "data.batch_size=0 (must be >= 1)"),
            ("data.eval_batch_size=-1", "data.eval_batch_size=-1 (must be >= 1, or 0 for data.batch_size)"),
            ("data.valid_split=off", "data.valid_split: expected a string, got the boolean False (YAML reads yes, no, "
                                     "on, off, true and false as booleans): quote it, e.g. key='off'"),
            ("data.prefetch=-1", "data.prefetch=-1 (must be >= 0 batches, 0 to read in the training thread)"),
            # checked only once generating, as SyntheticConfig.seed / num_rows: settings no config names
            ("data.synthetic_seed=-1", "data.synthetic_seed=-1 (must be >= 0)"),
            ("data.synthetic_rows=5", "data.synthetic_rows=5 (must be 0 for none, or >= 10 rows to generate)"),
            ("train.device=gpu", "train.device='gpu' (must be one of auto, cpu, cuda)"),
            ("sharding.compute_device=gpu", "sharding.compute_device must be 'auto', 'cpu' or 'cuda', got 'gpu'"),
            ("optim.sparse_lr=-1", "optim.sparse_lr must be a finite number > 0, got -1.0"),
            ("optim.dense_lr=.nan", "optim.dense_lr must be a finite number > 0, got nan"),
            # FBGEMM's float32 rate overflowed in a traceback of its rowwise_adagrad
            ("optim.sparse_lr=1e39", "optim.sparse_lr=1e+39 is beyond float32's range (at most 3.4e38)"),
            ("optim.weight_decay=-0.1", "optim.weight_decay must be a finite number >= 0"),
            ("model.mlp_layer_sizes=[32,-1]", "model.mlp_layer_sizes[1] must be an integer >= 1, got -1"),
            ("model.dropout=1.5", "model.dropout must be a finite number >= 0 and < 1, got 1.5"),
            ("model.mlp_layer_sizes=[]", "model.mlp_layer_sizes is empty; model 'deepfm' builds an MLP from it"),
            ("data.valid_split=train", "data.valid_split='train' is also data.train_split"),
            ("data.test_split=train", "data.test_split='train' is also data.train_split"),
            ("model.embedding_init_scale=.inf", "model.embedding_init_scale must be a finite number > 0 or None"),
        ],
    )
    def test_bad_overrides_name_the_key(self, override: str, message: str) -> None:
        with pytest.raises(ConfigError, match=None) as info:
            load_config(os.path.join(REPO, "configs", "synthetic_deepfm.yaml"), [override])
        assert message in str(info.value)
        # the override is named as the source, not the file
        assert str(info.value).startswith("command-line override(s)") or "section.key=value" in str(info.value)

    def test_an_empty_override_of_a_list_empties_it(self) -> None:
        """``key=`` is how a str setting is turned off (data.valid_split=); for a list it means no
        items, not one item '' (a column '' to read, an unknown sharding type '')."""
        config = load_config(os.path.join(REPO, "configs", "synthetic_deepfm.yaml"),
                             ["data.extras=", "sharding.sharding_types=", "model.finalmlp_context1="])
        assert config.data.extras == []
        assert config.sharding.sharding_types == []
        assert config.model.finalmlp_context1 == ()

    def test_a_string_setting_written_as_a_number_keeps_its_text(self, tmp_path) -> None:
        """YAML 1.1 reads ``2024_01`` as 202401, ``0123`` as the octal 83 and ``1.10`` as 1.1: a string
        setting (a run directory, a split or field name, a path of the free-form llactr section) is
        the text written, in the file, on the command line and in the run's saved config.yaml."""
        path = tmp_path / "numbers.yaml"
        path.write_text("data:\n  valid_split: 1.10\ntrain:\n  run_dir: 2024_01\nllactr:\n  vectors_path: 0123\n",
                        encoding="utf-8")
        config = load_config(str(path), ["data.test_split=010", "sharding.frozen_tables=[1:30]",
                                         "llactr.fields=[07, 2024_02]", "train.epochs=1_000"])
        assert (config.data.valid_split, config.data.test_split, config.train.run_dir) == ("1.10", "010", "2024_01")
        assert config.sharding.frozen_tables == ["1:30"]
        assert config.train.epochs == 1000  # an integer setting takes the number YAML reads
        llactr = LLaCTRConfig.from_dict(config.llactr)
        assert (llactr.vectors_path, llactr.fields) == ("0123", ["07", "2024_02"])
        saved = str(tmp_path / "config.yaml")
        save_config(config, saved)
        assert LLaCTRConfig.from_dict(load_config(saved).llactr) == llactr
        assert load_config(saved).train.run_dir == "2024_01" and config_differences(config, load_config(saved)) == []

    @pytest.mark.parametrize("override, read_as", [
        ("train.epochs=010", "the octal 8"), ("train.seed=0x10", "the hexadecimal 16"),
        ("train.epochs=0b11", "the binary 3"), ("train.max_steps=1:30", "the base-60 90"),
        ("optim.dense_lr=010", "the octal 8"), ("optim.dense_lr=1:30.5", "the base-60 90.5"),
    ])
    def test_a_number_setting_written_other_than_in_decimal_is_refused(self, tmp_path, override: str,
                                                                        read_as: str) -> None:
        """YAML 1.1 reads ``010`` as the octal 8, ``0x10`` as 16 and ``1:30`` as 90: a number setting so
        written (``train.epochs=010`` meaning 10) silently became another number."""
        key, text = override.split("=")
        with pytest.raises(ConfigError, match=f"{key}: {text} is {read_as} to YAML 1.1; write it in decimal"):
            load_config(None, [override])
        path = tmp_path / "config.yaml"
        section, name = key.split(".")
        path.write_text(f"{section}:\n  {name}: {text}\n", encoding="utf-8")
        with pytest.raises(ConfigError, match=f"{path}: {key}: {text} is {read_as}"):
            load_config(str(path))
        assert load_config(None, [f"{key}=10", "train.epochs=1_000"]).train.epochs == 1000  # decimal digits still

    @pytest.mark.parametrize("text, value", [("0", False), ("1", True)])
    def test_a_boolean_override_of_0_or_1_is_read_as_the_coercion_means(self, text: str, value: bool) -> None:
        """YAML reads an unquoted 0 / 1 as an integer: the coercion takes "0" / "1" as booleans, so these too."""
        config = load_config(None, [f"train.resume={text}", f"data.shuffle={text}"])
        assert config.train.resume is value and config.data.shuffle is value

    def test_an_error_in_the_file_names_the_file_even_with_overrides(self, tmp_path) -> None:
        bad = tmp_path / "bad.yaml"
        bad.write_text("train:\n  epoch: 3\n")
        with pytest.raises(ConfigError) as info:
            load_config(str(bad), ["train.seed=1"])
        assert str(info.value).startswith(f"{bad}: train: unknown keys ['epoch']")

    def test_top_level_extension_keys_hold_anchors_that_sections_merge_in(self, tmp_path) -> None:
        """A Docker-Compose-style ``x-common: &common`` beside the sections was refused as an unknown section, so
        anchors shared by sections had nowhere to live."""
        path = tmp_path / "anchors.yaml"
        path.write_text("x-common: &common\n  embedding_dim: 24\nmodel:\n  <<: *common\n  name: deepfm\n"
                        "xcommon: 1\n", encoding="utf-8")
        with pytest.raises(ConfigError, match=r"top level: unknown keys \['xcommon'\]"):  # only the x- prefix
            load_config(str(path))
        path.write_text(path.read_text(encoding="utf-8").replace("xcommon: 1\n", ""), encoding="utf-8")
        config = load_config(str(path))
        assert config.model.embedding_dim == 24 and config.model.name == "deepfm"
        assert "x-common" not in config.to_dict()

    @pytest.mark.parametrize("text, message", [
        # a TypeError of ModelConfig.__init__: "missing 1 required positional argument: 'name'"
        ("model:\n  embedding_dim: 8\n", r"odd\.yaml: model: missing key\(s\) \['name'\]; expected them beside "
                                          r"\['embedding_dim'\]"),
        # sorted() of str and int keys: TypeError "'<' not supported between instances of 'int' and 'str'"
        ("train:\n  1: 2\n  epochs: 1\n  zz: 3\n", r"odd\.yaml: train: unknown keys \[1, 'zz'\]"),
    ])
    def test_a_missing_required_key_or_a_key_yaml_reads_as_no_string_is_named(self, tmp_path, text, message) -> None:
        path = tmp_path / "odd.yaml"
        path.write_text(text, encoding="utf-8")
        with pytest.raises(ConfigError, match=message):
            load_config(str(path))

    def test_missing_file_and_bad_yaml(self, tmp_path) -> None:
        with pytest.raises(ConfigError, match="config file not found$"):
            load_config(str(tmp_path / "absent.yaml"))
        bad = tmp_path / "bad.yaml"
        bad.write_text("train: [unclosed\n")
        with pytest.raises(ConfigError, match="not valid YAML"):
            load_config(str(bad))

    def test_a_missing_config_the_package_ships_is_named_where_it_is_installed(self, tmp_path) -> None:
        """Installed from a wheel, `--config configs/synthetic_deepfm.yaml` (the path of the docs) said only
        'config file not found', though the package holds that config."""
        import re

        from recsys_llm import PACKAGED_CONFIGS

        packaged = os.path.join(PACKAGED_CONFIGS, "synthetic_deepfm.yaml")
        with pytest.raises(ConfigError, match=f"config file not found; the package ships this config as "
                                              f"{re.escape(packaged)}$"):
            load_config(str(tmp_path / "configs" / "synthetic_deepfm.yaml"))
        assert load_config(packaged).model.name == "deepfm"

    def test_a_directory_is_named_as_one_not_as_a_missing_file(self, tmp_path) -> None:
        """``--config runs/x`` (a run directory) said 'config file not found', though the path exists."""
        (tmp_path / "data").mkdir()
        with pytest.raises(ConfigError, match=r"data: a directory; expected a YAML config file$"):
            load_config(str(tmp_path / "data"))
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "config.yaml").write_text("train:\n  epochs: 1\n")
        with pytest.raises(ConfigError, match=r"run: a directory; expected a YAML config file, e\.g\. .*run/config\.yaml"):
            load_config(str(tmp_path / "run"))

    def test_a_dangling_link_says_so(self, tmp_path) -> None:
        """configs/synthetic_deepfm.yaml links to the package's copy: `cp -r configs .` copies a dangling link,
        which was 'config file not found' beside the file `ls` lists."""
        import shutil

        shutil.copytree(os.path.join(REPO, "configs"), tmp_path / "configs", symlinks=True)  # as `cp -r` copies
        with pytest.raises(ConfigError, match=r"configs/synthetic_deepfm\.yaml: a symbolic link to "
                                              r"\.\./recsys_llm/configs/synthetic_deepfm\.yaml, which does not exist "
                                              r"from here; copy config directories with `cp -rL`"):
            load_config(str(tmp_path / "configs" / "synthetic_deepfm.yaml"))
        load_config(os.path.join(REPO, "configs", "synthetic_deepfm.yaml"))

    def test_a_key_written_twice_is_refused_naming_its_path_and_both_lines(self, tmp_path) -> None:
        bad = tmp_path / "twice.yaml"
        bad.write_text("data:\n  batch_size: 512\n  batch_size: 1024\n")  # PyYAML alone trains with 1024
        with pytest.raises(ConfigError) as info:
            load_config(str(bad))
        assert str(info.value).startswith(f"{bad}: not valid YAML: key 'data.batch_size' is written twice, on line 2 "
                                          "and line 3; expected each key once")

    def test_a_file_that_is_not_utf8_is_named(self, tmp_path) -> None:
        bad = tmp_path / "latin1.yaml"
        bad.write_bytes(b"train:\n  epochs: 2\n# caf\xff\n")
        with pytest.raises(ConfigError) as info:
            load_config(str(bad))
        assert str(info.value) == (f"{bad}: byte 0xff at offset 24 is not UTF-8; expected a UTF-8 text file "
                                   "(save the config as UTF-8)")

    def test_round_trip_through_yaml(self, tmp_path) -> None:
        config = load_config(None, ["model.name=dcnv2", "model.cross_layers=2", "elec.task=distill", "elec.distill.alpha=0.3",
                                    "data.schema=x"])
        path = str(tmp_path / "config.yaml")
        save_config(config, path)
        reread = load_config(path)
        assert dataclasses.replace(reread, elec=config.elec) == config  # elec is saved with its defaults filled in
        assert config_differences(config, reread) == []
        assert isinstance(reread, ExperimentConfig)

    def test_saving_fsyncs_before_the_rename_and_a_failed_save_leaves_the_old_file_alone(self, tmp_path,
                                                                                           monkeypatch) -> None:
        """A run's config.yaml is what it resumes, evaluates and exports with: unsynced, a crash after the
        rename could leave it empty (read as the defaults), and a Ctrl-C left config.yaml.tmp beside it."""
        path = str(tmp_path / "config.yaml")
        save_config(load_config(None, ["train.epochs=2"]), path)
        synced = []
        monkeypatch.setattr(os, "fsync", synced.append)
        save_config(load_config(None, ["train.epochs=3"]), path)
        assert synced

        def interrupted(fd: int) -> None:
            raise KeyboardInterrupt()

        monkeypatch.setattr(os, "fsync", interrupted)
        with pytest.raises(KeyboardInterrupt):
            save_config(load_config(None, ["train.epochs=4"]), path)
        monkeypatch.undo()
        assert load_config(path).train.epochs == 3 and os.listdir(tmp_path) == ["config.yaml"]

    @pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml"))))
    def test_repository_configs_parse(self, path: str) -> None:
        config = load_config(path)
        assert config.data.schema and config.train.run_dir


def test_config_differences_name_every_changed_setting() -> None:
    from recsys_llm.train.config import RESUME_FREE_KEYS, config_differences

    common = ["model.name=fm", "llactr.vectors_path=v"]
    saved = load_config(None, common + ["model.embedding_dim=16", "train.run_dir=a"])
    current = load_config(None, common + ["model.embedding_dim=8", "train.run_dir=b", "llactr.lambda_fie=0.5"])
    assert config_differences(saved, current, RESUME_FREE_KEYS) == [
        "llactr.lambda_fie: 0.1 -> 0.5",
        "model.embedding_dim: 16 -> 8",
    ]
    assert config_differences(saved, saved) == []
    # what only shows or plans the run (windowed training metrics, the planner's pooling factors) may change
    shown = load_config(None, common + ["model.embedding_dim=16", "train.run_dir=a", "train.metrics_window=4096",
                                        "train.metrics_every=7", "sharding.measure_pooling=false"])
    assert config_differences(saved, shown, RESUME_FREE_KEYS) == []
    # a plug-in key set to its default is the same setting as one left out
    explicit = load_config(None, ["model.name=fm", "elec.task=distill", "elec.distill.mode=joint"])
    assert config_differences(load_config(None, ["model.name=fm", "elec.task=distill"]), explicit) == []


def test_evaluate_and_export_refuse_a_config_of_another_model(tmp_path) -> None:
    from recsys_llm.train.checkpoint import run_config_of
    from recsys_llm.train.config import check_same_model, save_config

    trained = load_config(None, ["model.name=deepfm", "llactr.vectors_path=v.safetensors", "train.run_dir=r"])
    (tmp_path / "best" / "ckpt-00000010").mkdir(parents=True)
    save_config(trained, str(tmp_path / "config.yaml"))
    saved = run_config_of(str(tmp_path / "best" / "ckpt-00000010"))
    assert saved == str(tmp_path / "config.yaml")
    check_same_model(load_config(saved, ["data.eval_batch_size=7", "train.epochs=9"]), saved)  # not model settings
    # the vectors moved: the checkpoint holds them, the run is evaluated and exported with the new path,
    # when its plugins.json records the vectors to compare the new file with
    moved = load_config(saved, ["llactr.vectors_path=moved/v.safetensors"])
    with pytest.raises(ConfigError, match=r"llactr.vectors_path: '\S*v.safetensors' -> '\S*moved/v.safetensors'"):
        check_same_model(moved, saved)
    (tmp_path / "plugins.json").write_text('{"llactr": {"vectors": "v.safetensors"}}', encoding="utf-8")
    check_same_model(moved, saved)
    without_llactr = load_config(None, ["model.name=deepfm"])
    with pytest.raises(ConfigError, match=r"other model settings \(.*vectors_path: '\S*v.safetensors' -> '<unset>'"):
        check_same_model(without_llactr, saved)
    default_advice = r"16 -> 4\); pass its own config \(--config \S*config.yaml\) or the same overrides$"
    with pytest.raises(ConfigError, match=default_advice):  # evaluate / export
        check_same_model(load_config(saved, ["model.embedding_dim=4"]), saved)
    with pytest.raises(ConfigError, match=r"16 -> 4\); do this instead$"):  # a new run's own advice replaces it
        check_same_model(load_config(saved, ["model.embedding_dim=4"]), saved, advice="do this instead")
    unrelated = run_config_of(str(tmp_path / "other_run" / "checkpoints" / "ckpt-1"))
    check_same_model(without_llactr, unrelated)  # no run config there: nothing to compare


def test_evaluate_and_export_refuse_another_lambda_fie_but_not_other_loss_weights(tmp_path) -> None:
    # lambda_fie scales FIE's logit term (and the weights export folds into the backbone): another value
    # evaluates or serves another model than the one trained; FRE's weight and reduction only shape the loss
    from recsys_llm.train.config import check_same_model, save_config

    save_config(load_config(None, ["model.name=fm", "llactr.vectors_path=v.safetensors"]), str(tmp_path / "config.yaml"))
    saved = str(tmp_path / "config.yaml")
    check_same_model(load_config(saved, ["llactr.lambda_fre=0.5", "llactr.fre_field_reduction=mean"]), saved)
    with pytest.raises(ConfigError, match=r"llactr.lambda_fie: 0.1 -> 5"):
        check_same_model(load_config(saved, ["llactr.lambda_fie=5"]), saved)
    # dropout shapes no prediction, but 0 and > 0 build MLPs with other state-dict keys
    with pytest.raises(ConfigError, match=r"model.dropout: 0.0 -> 0.1"):
        check_same_model(load_config(saved, ["model.dropout=0.1"]), saved)
    # the representation-KD kind compares the same tensors (its projection exists for both kinds)
    distilled = ["model.name=fm", "elec.task=distill", "elec.vector_dim=8"]
    save_config(load_config(None, distilled + ["elec.distill.repr_kd=mse"]), str(tmp_path / "config.yaml"))
    check_same_model(load_config(None, distilled + ["elec.distill.repr_kd=cosine"]), saved)


def test_resume_allows_budget_and_path_spellings_but_not_model_changes(tmp_path, monkeypatch) -> None:
    from recsys_llm.train.config import check_resumable

    data = tmp_path / "data"
    data.mkdir()
    (data / "schema.json").write_text("{}", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    trained = load_config(None, ["model.name=fm", "data.schema=data/schema.json", "train.epochs=2",
                                 "data.batch_size=64"])
    save_config(trained, str(tmp_path / "config.yaml"))
    resumed = load_config(None, ["model.name=fm", f"data.schema={data}", "train.epochs=5", "data.batch_size=128",
                                 "train.keep_checkpoints=0"])
    check_resumable(resumed, str(tmp_path / "config.yaml"))  # same data dir, a larger budget and batch
    # LLaCTR's vector file may be found elsewhere (plugins.json compares what it holds), not be dropped
    with_vectors = ["model.name=fm", "data.schema=data/schema.json", "llactr.vectors_path=v.safetensors"]
    save_config(load_config(None, with_vectors), str(tmp_path / "config.yaml"))
    moved = load_config(None, with_vectors + ["llactr.vectors_path=moved/v.safetensors"])
    with pytest.raises(ConfigError, match="llactr.vectors_path"):  # no plugins.json to compare the file with
        check_resumable(moved, str(tmp_path / "config.yaml"))
    (tmp_path / "plugins.json").write_text('{"llactr": {"vectors": "v.safetensors"}}', encoding="utf-8")
    check_resumable(moved, str(tmp_path / "config.yaml"))
    with pytest.raises(ConfigError, match=r"llactr.vectors_path: '\S*v.safetensors' -> '<unset>'"):
        check_resumable(load_config(None, with_vectors[:2]), str(tmp_path / "config.yaml"))
    save_config(trained, str(tmp_path / "config.yaml"))
    with pytest.raises(ConfigError, match=r"other settings \(model.name: 'fm' -> 'fwfm'\)"):
        check_resumable(load_config(None, ["model.name=fwfm", f"data.schema={data}"]), str(tmp_path / "config.yaml"))


def test_a_run_from_before_fre_field_reduction_resumes_only_with_the_mean_it_trained_with() -> None:
    from recsys_llm.train.config import check_plugin_history

    def plugins(**settings: Any) -> Dict[str, Any]:
        return {"llactr": {"config": {"use_fre": True, "lambda_fre": 0.1, **settings}}}

    older = plugins()  # written before the key existed: FRE averaged over fields
    with pytest.raises(ConfigError, match=r"runs/a/plugins.json: this run was trained before "
                                          r"llactr.fre_field_reduction existed, i.e. with "
                                          r"llactr.fre_field_reduction=mean; resuming it with 'sum'"):
        check_plugin_history(older, plugins(fre_field_reduction="sum"), "runs/a/plugins.json")
    check_plugin_history(older, plugins(fre_field_reduction="mean"), "runs/a/plugins.json")
    check_plugin_history(plugins(fre_field_reduction="sum"), plugins(fre_field_reduction="sum"), "p")  # recorded
    without_fre = {"llactr": {"config": {"use_fre": False}}}
    check_plugin_history(without_fre, plugins(fre_field_reduction="sum"), "p")  # the reduction never mattered
    check_plugin_history({}, plugins(fre_field_reduction="sum"), "p")  # no llactr section saved


def test_a_missing_schema_generates_synthetic_data_only_where_nothing_else_lives(tmp_path, capsys, monkeypatch) -> None:
    """A mistyped or unmounted data.schema with data.synthetic_rows set is reported, and never
    generated over a directory that holds other files."""
    import torch

    from recsys_llm.data.schema import SchemaError
    from recsys_llm.train.distributed import DistContext
    from recsys_llm.train.run_data import load_or_generate_schema

    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
    other = tmp_path / "mounted"
    other.mkdir()
    (other / "clicks.csv").write_text("a,b\n", encoding="utf-8")
    config = load_config(None, [f"data.schema={other}/schema.json", "data.synthetic_rows=300"])
    with pytest.raises(FileExistsError, match=r"mounted: not empty and not an earlier prepared data set"):
        load_or_generate_schema(config, ctx)
    assert sorted(os.listdir(other)) == ["clicks.csv"]
    split = other / "train.parquet"  # a split given for the data: named as data, not as a directory
    split.write_bytes(b"PAR1 rows")
    with pytest.raises(SchemaError, match=r"train\.parquet: a Parquet data file, not a schema"):
        load_or_generate_schema(load_config(None, [f"data.schema={split}", "data.synthetic_rows=300"]), ctx)
    split.unlink()
    fresh = tmp_path / "fresh"
    schema = load_or_generate_schema(load_config(None, [f"data.schema={fresh}", "data.synthetic_rows=300"]), ctx)
    assert schema.root == str(fresh) and os.path.isfile(fresh / "train.parquet")
    assert f"{fresh}/schema.json not found: generating 300 rows" in capsys.readouterr().err
    # a job on a trained run whose config names its data relative to another working directory
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"the relative path 'data/ml' is read from the working directory "
                                                r".*: run from there, or pass data.schema=ABSOLUTE_PATH"):
        load_or_generate_schema(load_config(None, ["data.schema=data/ml"]), ctx, generate=False)


def test_a_file_mistake_left_after_an_override_fixed_another_is_reported_with_both(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  batch_size: 0\noptim:\n  dense_lr: -1\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(bad), ["data.batch_size=64"])
    assert str(info.value).startswith(f"{bad} with command-line override(s) data.batch_size=64: optim.dense_lr")
    assert "dense_lr" in str(info.value)


def test_run_dir_must_name_a_directory(tmp_path) -> None:
    from recsys_llm.train.config import TrainConfig

    with pytest.raises(ValueError, match="run_dir='' \\(must name a directory\\)"):
        TrainConfig(run_dir="")
    a_file = tmp_path / "README.md"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="is a file, must be a directory"):
        TrainConfig(run_dir=str(a_file))


def test_cuda_on_a_machine_without_a_gpu_is_named() -> None:
    import torch

    from recsys_llm.train.distributed import select_device

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="device 'cuda' \\(train.device\\) requested, but torch .* sees no GPU"):
        select_device(0, "cuda")


@pytest.mark.parametrize(
    "local_rank, local_world_size, visible, under_torchrun, expected",
    [
        (0, 1, 1, True, 0),  # a single-GPU host, one rank
        (1, 2, 1, False, 0),  # a launcher (e.g. SLURM) that gave each rank its own GPU
        (1, 2, 2, True, 1),  # local rank r takes GPU r
        (0, 1, 4, False, 0),
        (3, 1, 4, False, 3),  # a launcher that sets LOCAL_RANK only
    ],
)
def test_gpu_index_of_a_rank(local_rank, local_world_size, visible, under_torchrun, expected) -> None:
    from recsys_llm.train.distributed import gpu_index

    assert gpu_index(local_rank, local_world_size, visible, under_torchrun) == expected


@pytest.mark.parametrize("local_rank", [0, 1])
def test_torchrun_ranks_that_would_share_a_gpu_are_named(local_rank: int) -> None:
    from recsys_llm.train.distributed import gpu_index

    # torchrun's two local ranks see the same one GPU (CUDA_VISIBLE_DEVICES=0 or a 1-GPU host)
    with pytest.raises(ValueError, match=f"local rank {local_rank} of 2 on this host, but 1 GPU\\(s\\) are visible"):
        gpu_index(local_rank, 2, 1, True)
    with pytest.raises(ValueError, match="at most 2 processes per host"):
        gpu_index(local_rank, 3, 2, True)
    with pytest.raises(ValueError, match="local rank 2 of 3"):
        gpu_index(2, 3, 2, False)  # a rank without a GPU, whatever the launcher


def test_a_config_file_generates_synthetic_data_only_where_its_own_data_schema_points() -> None:
    """An override that points data.schema elsewhere (e.g. at Criteo) leaves the file's synthetic_rows
    behind: a mistyped path is then 'schema not found', not 200k rows of synthetic data trained on."""
    path = os.path.join(REPO, "configs", "synthetic_deepfm.yaml")
    assert load_config(path).data.synthetic_rows == 200_000
    assert load_config(path, ["data.schema=data/critoe/schema.json"]).data.synthetic_rows == 0
    moved = load_config(path, ["data.schema=/tmp/elsewhere", "data.synthetic_rows=500"])  # asked for there
    assert moved.data.synthetic_rows == 500
    whole = load_config(path, ["data={schema: /tmp/elsewhere, synthetic_rows: 500}"])  # the section at once
    assert whole.data.synthetic_rows == 500
    assert load_config(path, ["train.epochs=1"]).data.synthetic_rows == 200_000
    # asked for with the file's own value (the demo's --data-dir), or the same file spelled otherwise
    assert load_config(path, ["data.schema=/tmp/x", "data.synthetic_rows=200000"]).data.synthetic_rows == 200_000
    for same in ("data/synthetic", "data/synthetic/", "./data/synthetic/schema.json",
                 os.path.join(os.getcwd(), "data", "synthetic", "schema.json")):
        assert load_config(path, [f"data.schema={same}"]).data.synthetic_rows == 200_000, same


def test_a_home_relative_path_setting_is_expanded(tmp_path, monkeypatch) -> None:
    """``train.run_dir=~/runs/x`` reaches the program unexpanded (no shell variable name); it must
    mean the home directory, not a directory named ``~`` under the working directory."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = tmp_path / "c.yaml"
    path.write_text("elec:\n  entity_tables: {item_id: ~/vectors/items}\n")
    config = load_config(str(path), ["train.run_dir=~/runs/x", "data.schema=~/data/schema.json"])
    assert config.train.run_dir == str(tmp_path / "home" / "runs" / "x")
    assert config.data.schema == str(tmp_path / "home" / "data" / "schema.json")
    assert config.elec["entity_tables"] == {"item_id": str(tmp_path / "home" / "vectors" / "items")}


def test_a_plugin_section_mistake_is_named_with_the_config_file_before_any_work(tmp_path) -> None:
    """`llactr: {vectors_pth: ...}` said only that vectors_path is required, and every llactr / elec mistake came
    without the file's name, after the process group was set up."""
    path = tmp_path / "c.yaml"
    path.write_text("llactr: {vectors_pth: x.safetensors}\n")
    with pytest.raises(ConfigError) as typo:
        load_config(str(path))
    assert str(typo.value).startswith(f"{path}: llactr: unknown keys ['vectors_pth']; allowed: ["), typo.value
    path.write_text("elec: {task: gain, distill: {alpah: 1}}\n")
    with pytest.raises(ConfigError, match=rf"^{path}: elec.distill: unknown keys \['alpah'\]"):
        load_config(str(path))
    path.write_text("llactr: {lambda_fre: 0.1}\n")
    with pytest.raises(ConfigError, match=rf"^{path}: llactr: 'vectors_path' \(path of the field-vector file\) is required"):
        load_config(str(path))


def test_an_override_error_names_the_overrides_it_is_about() -> None:
    """It listed every override, the demo's own data.schema / data.synthetic_rows before the one the user typed."""
    config = os.path.join(REPO, "configs", "synthetic_deepfm.yaml")
    with pytest.raises(ConfigError) as error:
        load_config(config, ["data.schema=x", "data.synthetic_rows=2000", "train.epochs=abc"])
    assert str(error.value) == "command-line override(s) train.epochs=abc: train.epochs: expected an integer, got 'abc'"
    with pytest.raises(ConfigError, match=r"^command-line override\(s\) data.bogus=1 data.schema=x: data: unknown keys"):
        load_config(config, ["data.bogus=1", "data.schema=x", "train.epochs=2"])


def test_a_section_left_empty_is_a_section_left_out(tmp_path) -> None:
    """`model:` alone (YAML's null) was 'model: missing key(s) ['name']; expected them beside []', though a config
    without a model section trains DeepFM."""
    path = tmp_path / "c.yaml"
    path.write_text("data: {schema: x}\nmodel:\nllactr:\ntrain:\n")
    config = load_config(str(path))
    assert config.model.name == "deepfm" and config.llactr == {} and config.train.epochs == TrainConfig().epochs


def test_an_override_that_would_turn_elec_on_without_a_task_is_refused() -> None:
    """`elec.distill.alpha=0.5` on a config without ELEC made a distillation run, whose first complaint was a missing
    llm_vector column of the data."""
    config = os.path.join(REPO, "configs", "synthetic_deepfm.yaml")
    with pytest.raises(ConfigError, match=r"^command-line override\(s\) elec.distill.alpha=0.5: .* has no elec section, "
                                          r"so they would turn ELEC on with its default task"):
        load_config(config, ["train.epochs=1", "elec.distill.alpha=0.5"])
    assert load_config(config, ["elec.task=distill", "elec.distill.alpha=0.5"]).elec["distill"] == {"alpha": 0.5}


def test_a_mapping_override_without_yaml_s_space_after_the_colon_is_named() -> None:
    """`elec.entity_tables={user_id:runs/u}` is the key 'user_id:runs/u' to YAML: the error named a field
    'user_id:runs/u' with no export directory."""
    config = os.path.join(REPO, "configs", "synthetic_deepfm.yaml")
    with pytest.raises(ConfigError, match=r"YAML reads \{a:b\} as the key 'a:b' with no value; write a space after each "
                                          r"colon \(\{a: b\}\), or one override per key \(elec.entity_tables.a=b\)"):
        load_config(config, ["elec.task=gain", "elec.entity_tables={user_id:runs/u,item_id:runs/i}"])


def test_a_run_saved_before_embedding_dtype_and_proposer_patience_resumes_and_may_change_the_patience(tmp_path) -> None:
    """A run directory written before ``model.embedding_dtype`` and ``sharding.proposer_patience`` existed has neither
    in its config.yaml: it resumes under their defaults (float32 tables, as it trained); the patience, which changes
    only how long the planner searches, may change on a resume; the tables' dtype may not."""
    import yaml

    from recsys_llm.train.config import check_resumable, save_config

    path = str(tmp_path / "config.yaml")
    save_config(load_config(None, ["model.name=fm", "train.run_dir=r"]), path)
    with open(path, encoding="utf-8") as handle:
        raw = yaml.safe_load(handle)
    del raw["model"]["embedding_dtype"], raw["sharding"]["proposer_patience"]  # as runs of that time saved it
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(raw, handle)
    check_resumable(load_config(None, ["model.name=fm", "train.run_dir=r"]), path)
    check_resumable(load_config(None, ["model.name=fm", "train.run_dir=r", "sharding.proposer_patience=0"]), path)
    with pytest.raises(ConfigError, match=r"model\.embedding_dtype: 'fp32' -> 'fp16'"):
        check_resumable(load_config(None, ["model.name=fm", "train.run_dir=r", "model.embedding_dtype=fp16"]), path)


def test_a_run_saved_before_fused_params_resumes_and_may_change_its_cache_and_bounds_checks(tmp_path) -> None:
    """``sharding.fused_params``: a run saved without it resumes under its defaults (FBGEMM's own settings); the UVM
    cache size and the bounds checks change how the kernels run, not what trains, and may change on a resume; the
    rounding of FP16 updates may not."""
    import yaml

    from recsys_llm.train.config import check_resumable, save_config

    path = str(tmp_path / "config.yaml")
    save_config(load_config(None, ["model.name=fm", "train.run_dir=r"]), path)
    with open(path, encoding="utf-8") as handle:
        raw = yaml.safe_load(handle)
    del raw["sharding"]["fused_params"]  # as runs saved it before the setting
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(raw, handle)
    check_resumable(load_config(None, ["model.name=fm", "train.run_dir=r"]), path)
    check_resumable(load_config(None, ["model.name=fm", "train.run_dir=r",
                                       "sharding.fused_params.cache_load_factor=0.1",
                                       "sharding.fused_params.bounds_check_mode=none"]), path)
    with pytest.raises(ConfigError, match=r"sharding\.fused_params\.stochastic_rounding: None -> False"):
        check_resumable(load_config(None, ["model.name=fm", "train.run_dir=r",
                                           "sharding.fused_params.stochastic_rounding=false"]), path)


def test_a_tables_own_cache_and_bounds_checks_may_change_on_a_resume_its_rounding_may_not(tmp_path) -> None:
    """``sharding.table_constraints.<table>.fused_params`` resumes as the global ``sharding.fused_params`` does:
    a table's cache size and bounds checks may be set, changed or dropped on a resume, its rounding of FP16
    updates may not, nor the table's other constraints; the saved config reads back as the same settings."""
    from recsys_llm.train.config import check_resumable, save_config
    from recsys_llm.train.sharding_config import FusedParamsConfig

    own = "sharding.table_constraints.t_item_id.fused_params"
    run = ["model.name=fm", "train.run_dir=r", f"{own}.cache_load_factor=0.1", f"{own}.stochastic_rounding=false"]
    path = str(tmp_path / "config.yaml")
    saved = load_config(None, run)
    save_config(saved, path)
    assert load_config(path).sharding.table_constraints == saved.sharding.table_constraints == {
        "t_item_id": {"fused_params": FusedParamsConfig(cache_load_factor=0.1, stochastic_rounding=False)}}
    check_resumable(load_config(None, run), path)
    check_resumable(load_config(None, [*run, f"{own}.cache_load_factor=0.05", f"{own}.bounds_check_mode=fatal",
                                       "sharding.table_constraints.t_user_id.fused_params.cache_load_factor=0.3",
                                       "sharding.table_constraints.t_user_id.fused_params.bounds_check_mode=none"]),
                    path)
    with pytest.raises(ConfigError, match=rf"{own}\.stochastic_rounding: False -> True"):
        check_resumable(load_config(None, [*run, f"{own}.stochastic_rounding=true"]), path)
    with pytest.raises(ConfigError, match=r"sharding\.table_constraints\.t_user_id\.fused_params\.stochastic_rounding: "
                                          r"'<unset>' -> False"):
        check_resumable(load_config(None, [*run, "sharding.table_constraints.t_user_id.fused_params."
                                                 "stochastic_rounding=false"]), path)
    with pytest.raises(ConfigError, match=r"sharding\.table_constraints\.t_item_id\.sharding_types: '<unset>' -> "):
        check_resumable(load_config(None, [*run, "sharding.table_constraints.t_item_id.sharding_types=[table_wise]"]),
                        path)


def test_a_star_part_of_an_ignored_section_stands_for_any_one_table() -> None:
    """``config_differences``' ``ignore`` takes a section with a ``*`` part (``sharding.table_constraints.*.fused_params``):
    every setting inside it, of every table, is left out, and nothing beside it (a table's other constraints)."""
    own = "sharding.table_constraints.{}.fused_params.{}"
    saved = load_config(None, ["model.name=fm", own.format("t_item_id", "stochastic_rounding=false")])
    current = load_config(None, ["model.name=fm", own.format("t_item_id", "stochastic_rounding=true"),
                                 own.format("t_user_id", "cache_load_factor=0.3"),
                                 "sharding.table_constraints.t_user_id.sharding_types=[table_wise]"])
    assert config_differences(saved, current, ["sharding.table_constraints.*.fused_params"]) == [
        "sharding.table_constraints.t_user_id.sharding_types: '<unset>' -> ['table_wise']"]
    assert config_differences(saved, current, ["sharding.table_constraints.*"]) == []
    assert config_differences(saved, current, ["sharding.table_constraints.*.fused_params.stochastic_rounding"]) == [
        "sharding.table_constraints.t_user_id.fused_params.cache_load_factor: '<unset>' -> 0.3",
        "sharding.table_constraints.t_user_id.sharding_types: '<unset>' -> ['table_wise']"]
    # a ``*`` stands for exactly one part (not several: a table's settings are not the global ones), and a part
    # matches a whole part of the key, not its beginning
    everything = config_differences(saved, current)
    assert len(everything) == 3
    assert config_differences(saved, current, ["sharding.*.cache_load_factor", "sharding.table_constraints.*.fused",
                                               "sharding.table_constraints.t_user_id.sharding"]) == everything


def test_a_new_table_block_differs_only_by_what_it_sets() -> None:
    """A table's fused_params block that only one config has lists the settings it sets, not the ones it leaves
    unset (``bounds_check_mode`` ``''``, ``stochastic_rounding`` ``None``); set to a value, each one is listed."""
    own = "sharding.table_constraints.t_user_id.fused_params."
    saved = load_config(None, ["model.name=fm"])
    assert config_differences(saved, load_config(None, ["model.name=fm", f"{own}cache_load_factor=0.1"])) == [
        f"{own}cache_load_factor: '<unset>' -> 0.1"]
    assert config_differences(load_config(None, ["model.name=fm", f"{own}bounds_check_mode=fatal"]), saved) == [
        f"{own}bounds_check_mode: 'fatal' -> '<unset>'"]


def test_a_table_setting_that_repeats_the_global_one_is_no_difference() -> None:
    """A table's fused_params set as the global ones are change nothing, so a resume that adds them is no other
    run; a table setting that differs from the global one still counts."""
    own = "sharding.table_constraints.t_user_id.fused_params."
    saved = load_config(None, ["model.name=fm", "sharding.fused_params.stochastic_rounding=false"])
    same = load_config(None, ["model.name=fm", "sharding.fused_params.stochastic_rounding=false",
                              f"{own}stochastic_rounding=false"])
    assert config_differences(saved, same) == []
    other = load_config(None, ["model.name=fm", "sharding.fused_params.stochastic_rounding=false",
                               f"{own}stochastic_rounding=true"])
    assert config_differences(saved, other) == [f"{own}stochastic_rounding: '<unset>' -> True"]


def test_a_table_block_is_compared_setting_by_setting_with_the_global_one_of_the_same_name() -> None:
    """Under a global bounds_check_mode of ``fatal``, a table repeating it is no difference and a new table block
    setting only its cache lists only that: the table's unset bounds_check_mode (``''``) and stochastic_rounding
    (None) leave the global ones in force, whatever they are."""
    own = "sharding.table_constraints.t_user_id.fused_params."
    fatal = ["model.name=fm", "sharding.fused_params.bounds_check_mode=fatal"]
    saved = load_config(None, fatal)
    assert config_differences(saved, load_config(None, fatal + [f"{own}bounds_check_mode=fatal"])) == []
    assert config_differences(saved, load_config(None, fatal + [f"{own}cache_load_factor=0.1"])) == [
        f"{own}cache_load_factor: '<unset>' -> 0.1"]


class TestTypedValues:
    """What :func:`recsys_llm.typed_config.coerce_value` takes for a setting's declared type, and how a refusal
    names the key, through :func:`load_config` (its own tests: none beside these)."""

    @pytest.mark.parametrize("text, value", [("yes", True), ("no", False), ("True", True), ("FALSE", False),
                                             ("1", True), ("0", False)])
    def test_a_quoted_boolean_setting_reads_each_spelling_as_it_says(self, text: str, value: bool) -> None:
        """Protects the text spellings a bool setting takes (a quoted 'no' is False, not True)."""
        config = load_config(None, [f"train.resume='{text}'", f"data.shuffle='{text}'"])
        assert config.train.resume is value and config.data.shuffle is value

    @pytest.mark.parametrize("text", ["on", "off", "y", "maybe"])
    def test_a_quoted_boolean_setting_refuses_other_text(self, text: str) -> None:
        """Protects against a bool setting guessing at text outside its six spellings (a quoted 'on' read as False)."""
        with pytest.raises(ConfigError, match=f"train.resume: expected true/false, got '{text}'"):
            load_config(None, [f"train.resume='{text}'"])

    @pytest.mark.parametrize("override, message", [
        ("train.epochs=true", "train.epochs: expected an integer, got True"),
        ("optim.dense_lr=yes", "optim.dense_lr: expected a number, got True"),
    ])
    def test_a_number_setting_refuses_a_boolean(self, override: str, message: str) -> None:
        """Protects against ``train.epochs=true`` training 1 epoch, ``optim.dense_lr=yes`` a rate of 1.0."""
        with pytest.raises(ConfigError, match=message):
            load_config(None, [override])

    def test_a_literal_setting_takes_its_choices_and_names_them_when_refusing(self) -> None:
        """Protects the ``Literal`` check: train.pipelined_eval takes auto or a boolean spelling, and names its
        choices otherwise (not only TrainConfig's own later check)."""
        assert load_config(None, ["train.pipelined_eval=auto"]).train.pipelined_eval == "auto"
        assert load_config(None, ["train.pipelined_eval=no"]).train.pipelined_eval is False
        assert load_config(None, ["train.pipelined_eval='1'"]).train.pipelined_eval is True
        with pytest.raises(ConfigError, match=r"train\.pipelined_eval: expected auto, true or false, got 'maybe'"):
            load_config(None, ["train.pipelined_eval=maybe"])

    @pytest.mark.parametrize("override, message", [
        ("sharding.frozen_tables=[a, [b]]", r"sharding\.frozen_tables\[1\]: expected a string, got \['b'\]"),
        ("sharding.table_constraints.t_item_id=3",
         r"sharding\.table_constraints\.t_item_id: expected a mapping, got 3"),
    ])
    def test_an_item_of_a_list_or_mapping_setting_is_named_by_its_index_or_key(self, override: str,
                                                                                message: str) -> None:
        """Protects the error's key path inside a list (``[1]``) and a mapping (``.t_item_id``)."""
        with pytest.raises(ConfigError, match=message):
            load_config(None, [override])


@pytest.mark.parametrize("override, message", [
    ("train..epochs=3", "empty key component"), ("=3", "empty key component"),
    ("train.epochs.x=1", r"train\.epochs is not a section"),
])
def test_an_override_of_no_key_or_inside_a_value_is_named(override: str, message: str) -> None:
    """Protects apply_overrides' own refusals: an empty part of the key, and a key inside a value that is no
    section (``train.epochs.x=1``, or ``llactr=5`` then ``llactr.x=1``, which would silently drop the 5)."""
    with pytest.raises(ConfigError, match=rf"override '{re.escape(override)}': {message}"):
        load_config(None, ["train.epochs=3", override])
    with pytest.raises(ConfigError, match=r"override 'llactr\.x=1': llactr is not a section"):
        load_config(None, ["llactr=5", "llactr.x=1"])


def test_a_config_file_whose_top_level_is_no_mapping_is_named(tmp_path) -> None:
    """Protects the top-level check: a YAML list or scalar is a ConfigError naming the file, not an AttributeError."""
    for text in ("- data\n- train\n", "just text\n"):
        path = tmp_path / "list.yaml"
        path.write_text(text, encoding="utf-8")
        with pytest.raises(ConfigError, match=f"{re.escape(str(path))}: top level must be a mapping of sections"):
            load_config(str(path))


RESUME_FREE_OVERRIDES = {
    "train.run_dir": "elsewhere", "train.resume": "false", "train.device": "cpu", "train.progress": "false",
    "train.keep_checkpoints": "5", "train.epochs": "9", "train.max_steps": "100", "train.patience": "0",
    "train.eval_every": "2", "train.checkpoint_every": "10", "train.reshard_mid_epoch": "true",
    "train.flush_denormal": "false", "train.metrics_window": "4096", "train.metrics_every": "3",
    "train.pipelined_eval": "true", "train.init_from": "runs/day1", "train.init_optimizer": "false",
    "train.init_scope": "tables",
    "sharding.proposer_patience": "0", "sharding.storage_reservation": "0.3",
    "sharding.plan_file": "plan.json", "sharding.measure_pooling": "false",
    "sharding.fused_params.cache_load_factor": "0.5", "sharding.fused_params.bounds_check_mode": "fatal",
    "data.batch_size": "7", "data.eval_batch_size": "3", "data.validate": "false", "data.prefetch": "0",
    "data.synthetic_rows": "100", "data.valid_split": "", "data.test_split": "",
}


@pytest.mark.parametrize("key", sorted(RESUME_FREE_OVERRIDES))
def test_each_resume_free_setting_may_change_on_a_resume(key: str) -> None:
    """Protects every entry of RESUME_FREE_KEYS: a resume changing that setting alone (train.pipelined_eval,
    data.test_split, ...) is no difference to refuse."""
    from recsys_llm.train.config import RESUME_FREE_KEYS

    assert set(RESUME_FREE_OVERRIDES) == {free for free in RESUME_FREE_KEYS if "*" not in free}
    saved, current = load_config(None), load_config(None, [f"{key}={RESUME_FREE_OVERRIDES[key]}"])
    assert config_differences(saved, current) != []  # the override changes the setting
    assert config_differences(saved, current, RESUME_FREE_KEYS) == []


@pytest.mark.parametrize("build, message", [
    (lambda: ShardingConfig(proposer_patience=2.5), r"sharding\.proposer_patience must be an integer >= 0, got 2\.5"),
    (lambda: ShardingConfig(storage_reservation=1.0), r"sharding\.storage_reservation must be a finite number >= 0 "
                                                      r"and < 1, got 1\.0"),
    (lambda: ShardingConfig(compute_kernels=["table_wise"]), r"sharding\.compute_kernels: unknown values "
                                                             r"\['table_wise'\]; allowed: \['dense'"),
    (lambda: ShardingConfig(sharding_types=["fused"]), r"sharding\.sharding_types: unknown values \['fused'\]"),
    (lambda: OptimizerConfig(dense="row_wise_adagrad"), r"optim\.dense must be one of \['adagrad', 'adam', 'sgd'\], "
                                                        r"got 'row_wise_adagrad'"),
])
def test_sharding_and_optimizer_settings_are_checked_against_their_own_bounds_and_names(build, message) -> None:
    """Protects the bounds and vocabularies of ShardingConfig / OptimizerConfig as a config built in Python meets
    them: an integer patience, a reservation below the whole memory, a kernel list of kernels (not sharding types),
    a dense optimizer torch has (row-wise Adagrad is a table optimizer only)."""
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize("name", ["resume", "progress", "reshard_mid_epoch", "flush_denormal", "init_optimizer"])
def test_train_switches_built_in_python_are_bools(name):
    """TrainConfig(resume="false") resumed ("false" is truthy); a config file's value is converted, Python's was not."""
    from recsys_llm.train.config import TrainConfig

    with pytest.raises(ValueError, match=rf"train\.{name}: expected true or false, got 'false'"):
        TrainConfig(**{name: "false"})


def test_train_init_scope_is_all_or_tables():
    """train.init_scope names what train.init_from takes; any other value is refused where the config is built."""
    from recsys_llm.train.config import TrainConfig

    assert TrainConfig().init_scope == "all" and TrainConfig(init_scope="tables").init_scope == "tables"
    with pytest.raises(ValueError, match=r"train\.init_scope='dense' \(must be one of all, tables\)"):
        TrainConfig(init_scope="dense")


def test_sharding_switches_and_frozen_tables_built_in_python():
    """ShardingConfig(measure_pooling="false") measured; frozen_tables="t_item" was kept as a string of letters."""
    from recsys_llm.train.sharding_config import ShardingConfig

    for name in ("exact_dense_reduction", "measure_pooling"):
        with pytest.raises(ValueError, match=rf"sharding\.{name}: expected true or false"):
            ShardingConfig(**{name: "false"})
    with pytest.raises(ValueError, match=r"sharding\.frozen_tables: expected a list of names, got the string"):
        ShardingConfig(frozen_tables="t_item_id")


def test_data_and_train_configs_refuse_non_string_and_non_integer_settings():
    import pathlib
    import numpy as np
    from recsys_llm.train.config import DataConfig, TrainConfig

    with pytest.raises(ValueError, match=r"data.train_split: expected a string, got 1"):
        DataConfig(train_split=1)
    with pytest.raises(ValueError, match=r"data.batch_size must be an integer, got nan"):
        DataConfig(batch_size=float("nan"))
    for name, value in (("epochs", True), ("patience", 2.5), ("seed", float("nan"))):
        with pytest.raises(ValueError, match=rf"train.{name} must be an integer, got {value}"):
            TrainConfig(**{name: value})
    assert TrainConfig(run_dir=pathlib.Path("runs/x"), epochs=np.int64(2)).run_dir == "runs/x"


def test_a_mapping_override_is_merged_into_the_section_it_names(tmp_path) -> None:
    """``train={epochs: 4}`` replaced the file's whole train section: its run_dir (and every other key) went back to
    the defaults silently. Keys given twice take the later value; ``train=null`` resets the section."""
    path = tmp_path / "c.yaml"
    path.write_text("train: {run_dir: runs/mine, epochs: 2, progress: false}\n"
                    "sharding: {table_constraints: {t_user_id: {sharding_types: [row_wise]}}}\n")
    config = load_config(str(path), ["train={epochs: 4, seed: 9}"])
    assert (config.train.run_dir, config.train.epochs, config.train.seed, config.train.progress) == \
        ("runs/mine", 4, 9, False)
    config = load_config(str(path), ["sharding={table_constraints: {t_item_id: {sharding_types: [table_wise]}}}"])
    assert set(config.sharding.table_constraints) == {"t_user_id", "t_item_id"}
    assert load_config(str(path), ["train.epochs=3", "train.epochs=5"]).train.epochs == 5
    assert load_config(str(path), ["train=null"]).train.run_dir == load_config(None).train.run_dir


def test_an_empty_mapping_override_empties_what_is_there(tmp_path) -> None:
    """Merged, ``sharding.table_constraints={}`` (or ``llactr={}``) changed nothing, silently: the file's
    constraints and its llactr section stayed, as they had been cleared before overrides merged."""
    path = tmp_path / "c.yaml"
    path.write_text("sharding: {table_constraints: {t_user_id: {sharding_types: [row_wise]}}}\n"
                    "llactr: {vectors_path: v.safetensors}\n")
    assert load_config(str(path), ["sharding.table_constraints={}"]).sharding.table_constraints == {}
    assert load_config(str(path), ["sharding={table_constraints: {}}"]).sharding.table_constraints == {}
    assert load_config(str(path), ["llactr={}"]).llactr == {}
    assert load_config(str(path), ["llactr={}", "llactr.vectors_path=w.safetensors"]).llactr == \
        {"vectors_path": "w.safetensors"}


@pytest.mark.parametrize("text,hint", [
    ("data: {epochs: 3}\n", "('epochs' is a key of train: train.epochs)"),
    ("epochs: 3\n", "('epochs' is a key of train: train.epochs)"),
    ("train: {batch_size: 64}\n", "('batch_size' is a key of data: data.batch_size)"),
])
def test_a_key_in_another_section_is_named_with_its_own_section(tmp_path, text: str, hint: str) -> None:
    """``data: {epochs: 3}`` was refused listing data's keys only, not where ``epochs`` belongs."""
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(hint) + "$"):
        load_config(str(path))
    with pytest.raises(ConfigError) as refused:  # a key no section has: the list of allowed keys alone
        load_config(None, ["train.epochz=3"])
    assert str(refused.value).endswith("'seed']")


@pytest.mark.parametrize("text", [
    "data: {bogus: 1}\nmodel: {epochs: 3}\n",  # refused for data's key: model's misplaced one is not named beside it
    "model: {name: deepfm, embedding_dim: many}\ndata: {epochs: 3}\n",
])
def test_a_misplaced_key_of_another_section_is_not_named_beside_an_error(tmp_path, text: str) -> None:
    """The hint named the first misplaced key of the whole file: ``data: unknown keys ['bogus'] ... ('epochs' is a
    key of train: train.epochs)`` read as if data held ``epochs``."""
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as refused:
        load_config(str(path))
    assert "is a key of" not in str(refused.value)


@pytest.mark.parametrize("override,expected", [
    ("train.max_steps=1e3", "got '1e3'; write it in digits: 1000 (YAML 1.1 reads an exponent without a '.' as text)"),
    ("train.max_steps=1000.0", "got 1000.0; write it in digits: 1000"),
    ("train.max_steps=1.5", "got 1.5"),
    ("train.max_steps='1000.0'", "got '1000.0'; write it in digits: 1000"),  # quoted: no exponent to blame
    ("train.max_steps=true", "got True"),
    ("train.max_steps=.inf", "got inf"),
    ("train.max_steps=.nan", "got nan"),
])
def test_a_whole_number_written_otherwise_for_an_integer_setting_says_how_to_write_it(override: str,
                                                                                      expected: str) -> None:
    """``train.max_steps=1e3`` was refused as "expected an integer, got '1e3'" with no word that YAML 1.1 reads it
    as text."""
    with pytest.raises(ConfigError) as refused:
        load_config(None, [override])
    assert str(refused.value).endswith(f"train.max_steps: expected an integer, {expected}")


def test_an_override_of_one_entity_export_key_moves_both_a_run_config_records(tmp_path) -> None:
    """A run's config.yaml records its entity export in elec.entity_vectors and elec.entity_tables[field]: an
    override of one (`evaluate --checkpoint RUN elec.entity_vectors=NEW`) was refused as naming two directories,
    hiding what the job then says of the run's own settings. The other key follows; two overrides that differ are
    still refused."""
    from recsys_llm.modules.elec import ELECConfig

    elec = {"task": "gain", "vector_source": "entity_table", "entity_field": "item_id", "entity_vectors": "runs/old",
            "entity_tables": {"item_id": "runs/old"}}
    path = tmp_path / "config.yaml"
    save_config(ExperimentConfig(elec=elec), str(path))
    for override in ("elec.entity_vectors=runs/new", "elec.entity_tables.item_id=runs/new"):
        parsed = ELECConfig.from_dict(load_config(str(path), [override]).elec, "elec")
        assert parsed.entity_vectors == "runs/new" and parsed.entity_tables == {"item_id": "runs/new"}
    with pytest.raises(ConfigError, match="name two vector directories"):
        load_config(str(path), ["elec.entity_vectors=runs/a", "elec.entity_tables.item_id=runs/b"])
    emptied = load_config(str(path), ["elec.entity_tables={}"]).elec  # no KeyError: left to ELECConfig
    assert emptied["entity_tables"] == {} and emptied["entity_vectors"] == "runs/old"
