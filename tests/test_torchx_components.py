"""torchx components: AppDef construction, torchx's own loading/validation, and one real launch.

The components are loaded the way ``torchx run`` loads them (``torchx.specs.finder``), and
their CLI arguments are parsed by torchx's own parser (``materialize_appdef``), so these
tests break when a component stops being a valid torchx component.
"""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest
import yaml
from torchx.specs import AppDef, macros
from torchx.specs.builders import _create_args_parser, materialize_appdef
from torchx.specs.file_linter import validate
from torchx.specs.finder import get_component

REPO_ROOT = Path(__file__).resolve().parents[1]
COMPONENTS = {
    "train": REPO_ROOT / "torchx_components" / "train.py",
    "trained": REPO_ROOT / "torchx_components" / "trained.py",
    "encode": REPO_ROOT / "torchx_components" / "encode.py",
    "bench": REPO_ROOT / "torchx_components" / "bench.py",
}


def load(name: str):
    """The component function as ``torchx run`` finds it; fails on torchx validation errors."""
    component = get_component(f"{COMPONENTS[name]}:{name}")
    assert not component.validation_errors, component.validation_errors
    return component.fn


def from_cli(name: str, args: List[str]) -> AppDef:
    """The AppDef ``torchx run ... <component> ARGS`` would build."""
    return materialize_appdef(load(name), args)


def command_of(app: AppDef) -> List[str]:
    """The shell command of the single role (``bash -c CMD``), split into words."""
    role = app.roles[0]
    assert role.entrypoint == "bash" and role.args[0] == "-c"
    return shlex.split(role.args[1])


class TestTrainComponent:
    def test_torchx_linter_accepts_every_component(self) -> None:
        for name, path in COMPONENTS.items():
            assert validate(str(path), name) == [], name

    def test_single_host_two_processes(self) -> None:
        app = from_cli("train", ["--config", "configs/x.yaml", "--nproc_per_node", "2", "train.epochs=1", "data.batch_size=64"])
        assert len(app.roles) == 1
        role = app.roles[0]
        assert role.name == "trainer" and role.num_replicas == 1 and role.min_replicas == 1
        words = command_of(app)
        assert words[0] == "torchrun"
        assert words[words.index("--nnodes") + 1] == "1" and words[words.index("--nproc_per_node") + 1] == "2"
        assert words[words.index("--rdzv_endpoint") + 1] == "localhost:0"  # single host: free port
        tail = words[words.index("-m"):]
        assert tail == ["-m", "recsys_llm.cli", "train", "--config", "configs/x.yaml", "train.epochs=1", "data.batch_size=64"]
        assert role.resource.cpu == 4 and role.resource.gpu == 0 and role.resource.memMB == 16384  # 2 and 8192 each
        assert app.name == "train"

    def test_multi_host_gpu_resources_env_retries(self) -> None:
        app = from_cli("train", [
            "--config", "c.yaml", "--nnodes", "4", "--nproc_per_node", "8", "--gpu", "8", "--cpu", "64",
            "--memMB", "480000", "--env", "NCCL_DEBUG=INFO,OMP_NUM_THREADS=4", "--max_retries", "3",
            "--image", "registry.example.com/recsys:cuda", "--mounts", "type=bind,src=/data,dst=/data,readonly",
            "--job_name", "ctr/dlrm-big",
        ])
        role = app.roles[0]
        assert role.num_replicas == 4 and role.max_retries == 3 and role.image == "registry.example.com/recsys:cuda"
        assert (role.resource.cpu, role.resource.gpu, role.resource.memMB) == (64, 8, 480000)
        assert role.env["NCCL_DEBUG"] == "INFO" and role.env["OMP_NUM_THREADS"] == "4"
        assert role.env["TORCHX_TRACKING_EXPERIMENT_NAME"] == "ctr" and app.name == "dlrm-big"
        assert role.port_map == {"c10d": 29500}
        assert len(role.mounts) == 1 and role.mounts[0].dst_path == "/data" and role.mounts[0].read_only
        words = command_of(app)
        assert words[words.index("--nnodes") + 1] == "4" and words[words.index("--nproc_per_node") + 1] == "8"
        # multi-host rendezvous on rank 0's host: the scheduler fills the rank0_env macro
        values = macros.Values(img_root="", app_id="app-1", replica_id="2", rank0_env="TORCHX_RANK0_HOST")
        assert "${TORCHX_RANK0_HOST:=localhost}:29500" in values.apply(role).args[1]

    def test_asking_for_gpus_makes_a_host_without_a_usable_one_an_error(self) -> None:
        """--gpu 2 on a host whose torch sees no GPU (a CPU build in the image) trained on the CPU, without a word."""
        for component, first in (("train", ["--config", "c.yaml"]), ("trained", ["--job", "evaluate",
                                                                                  "--checkpoint", "runs/x"])):
            with_gpus = command_of(from_cli(component, [*first, "--gpu", "2", "train.epochs=1"]))
            assert with_gpus[-1] == "train.device=cuda", (component, with_gpus)
            chosen = command_of(from_cli(component, [*first, "--gpu", "2", "train.device=cpu"]))
            assert chosen.count("train.device=cpu") == 1 and "train.device=cuda" not in chosen
            assert "train.device=cuda" not in command_of(from_cli(component, [*first, "train.epochs=1"]))
        # teacher-outputs' --splits takes every word after it: the override goes after a `--`
        words = command_of(from_cli("trained", ["--job", "teacher-outputs", "--checkpoint", "runs/x", "--gpu", "2",
                                                "--", "--output-dir", "t", "--splits", "train", "valid"]))
        assert words[-5:] == ["--splits", "train", "valid", "--", "train.device=cuda"], words
        from recsys_llm.cli import build_parser

        parsed, unknown = build_parser().parse_known_args(words[words.index("teacher-outputs"):])
        assert parsed.splits == ["train", "valid"] and parsed.overrides == ["train.device=cuda"] and not unknown

    def test_named_resource_takes_precedence(self) -> None:
        app = from_cli("train", ["--config", "c.yaml", "--named_resource", "aws_p4d.24xlarge", "--cpu", "1"])
        assert app.roles[0].resource.gpu == 8 and app.roles[0].resource.cpu == 96

    def test_env_is_not_mutated(self) -> None:
        env = {"A": "1"}
        load("train")("c.yaml", env=env)
        assert env == {"A": "1"}

    def test_static_rendezvous_passes_node_rank(self) -> None:
        words = command_of(from_cli("train", ["--config", "c.yaml", "--nnodes", "2", "--rdzv_backend", "static"]))
        assert words[words.index("--rdzv_backend") + 1] == "static" and "--node_rank" in words

    def test_static_rendezvous_on_one_host_is_refused(self) -> None:
        """On one host torchx starts torchrun with ``--rdzv_endpoint localhost:0``; the static rendezvous gave the
        workers MASTER_PORT=0 and local_cwd workers (one or two) waited to connect to it until the collective
        timeout."""
        for name, args in (("train", ["--config", "c.yaml"]), ("trained", ["--job", "evaluate", "--checkpoint", "r"]),
                           ("encode", ["--job", "export"])):
            for workers in ("1", "2"):
                with pytest.raises(ValueError, match=r"rdzv_backend=static on one host \(nnodes=1\): .*MASTER_PORT=0.*"
                                                     r"use rdzv_backend=c10d on one host"):
                    from_cli(name, [*args, "--nproc_per_node", workers, "--rdzv_backend", "static"])
            assert from_cli(name, [*args, "--nproc_per_node", "2"])  # c10d, the default

    def test_bad_arguments_raise_clear_errors(self) -> None:
        train = load("train")
        with pytest.raises(ValueError, match="key=value"):
            train("c.yaml", "epochs")
        with pytest.raises(ValueError, match="nproc_per_node"):
            train("c.yaml", nproc_per_node=-1)
        for name, args in (("train", ("c.yaml",)), ("trained", ("evaluate", "runs/r")),
                           ("bench", ("train_throughput",))):
            with pytest.raises(ValueError, match=r"gpu=1 per host for nproc_per_node=2 workers: each worker needs a "
                                                 r"GPU of its own; pass --gpu 2, or --nproc_per_node 1"):
                load(name)(*args, nproc_per_node=2, gpu=1)
        with pytest.raises(ValueError, match=r"gpu=1 per host for nproc_per_node=2 workers"):
            load("encode")("export", nproc_per_node=2, gpu=1)

    def test_component_options_after_the_job_arguments_are_refused(self) -> None:
        """torchx hands the job every argument after the first positional one: ``... train.epochs=1 --gpu=8`` ran on
        no GPU with ``--gpu=8`` as a config override, and ``trained ... -- --output o --nproc_per_node 2`` ran one
        worker whose job then failed on the cluster with an unrecognized argument."""
        cases = [
            ("train", ["--config", "c.yaml", "train.epochs=1", "--gpu=8"]),
            ("train", ["--config", "c.yaml", "train.epochs=1", "--nproc_per_node", "2"]),
            ("trained", ["--job", "export", "--checkpoint", "runs/r", "--", "--output", "o", "--nproc_per_node", "2"]),
            ("encode", ["--job", "export", "--", "--schema", "s.json", "--image=registry.example.com/x:1"]),
            ("bench", ["--name", "train_throughput", "--", "--quick", "--gpu", "1"]),
        ]
        for name, args in cases:
            with pytest.raises(ValueError, match="never reach the component.*put the component's options before"):
                from_cli(name, args)
        # the jobs' own options still pass, --checkpoint and --config of trained's jobs included
        assert from_cli("trained", ["--job", "export", "--checkpoint", "r", "--", "--config", "c.yaml", "--output", "o"])

    def test_no_job_option_is_named_like_a_component_option(self) -> None:
        """The check above must never refuse a real argument of a job: no sub-command the components run has an
        option with a component parameter's name (trained's jobs take --checkpoint and --config, as it passes them)."""
        import argparse
        import inspect

        from recsys_llm.cli import build_parser

        def options(parser: argparse.ArgumentParser) -> set:
            found = {o for action in parser._actions for o in action.option_strings}
            for action in parser._actions:
                if isinstance(action, argparse._SubParsersAction):
                    for sub in action.choices.values():
                        found |= options(sub)
            return found

        job_options = options(build_parser())
        for name in COMPONENTS:
            own = {f"--{p}" for p in inspect.signature(load(name)).parameters}
            allowed = {"--checkpoint", "--config"} if name == "trained" else set()
            assert not (job_options & own) - allowed - ({"--config"} if name == "train" else set()), name

    def test_named_resource_with_fewer_gpus_than_workers_is_refused(self) -> None:
        """A named resource's GPUs count, not --gpu (which it overrides): aws_g5.xlarge has one."""
        for name, args in (("train", ("c.yaml",)), ("trained", ("evaluate", "runs/r")),
                           ("bench", ("train_throughput",)), ("encode", ("export",))):
            with pytest.raises(ValueError, match=r"named_resource=aws_g5.xlarge has 1 GPU\(s\) per host for "
                                                 r"nproc_per_node=2 workers"):
                load(name)(*args, nproc_per_node=2, named_resource="aws_g5.xlarge")
            if name != "bench":  # one worker (test_multi_worker_runs_are_refused)
                assert load(name)(*args, nproc_per_node=8, named_resource="aws_p4d.24xlarge").roles[0].resource.gpu == 8

    def test_several_workers_share_the_hosts_cpus(self) -> None:
        """torchrun gives every worker of several OMP_NUM_THREADS=1: 64 CPUs for 8 workers ran 8 threads."""
        for name, args in (("train", ("c.yaml",)), ("trained", ("evaluate", "runs/r")), ("encode", ("export",))):
            assert load(name)(*args, nproc_per_node=8, cpu=64).roles[0].env["OMP_NUM_THREADS"] == "8", name
            assert load(name)(*args, nproc_per_node=3, cpu=2).roles[0].env["OMP_NUM_THREADS"] == "1", name
            chosen = load(name)(*args, nproc_per_node=8, cpu=64, env={"OMP_NUM_THREADS": "2"})
            assert chosen.roles[0].env["OMP_NUM_THREADS"] == "2", name
            assert "OMP_NUM_THREADS" not in load(name)(*args, cpu=64).roles[0].env, name  # torchrun leaves one alone
        big = load("train")("c.yaml", nproc_per_node=8, named_resource="aws_p4d.24xlarge").roles[0]
        assert big.env["OMP_NUM_THREADS"] == str(big.resource.cpu // 8)

    def test_the_default_cpus_and_memory_are_per_worker(self) -> None:
        """``--gpu 8`` without ``--cpu`` / ``--memMB`` asked 2 CPUs and 8192 MB for the host's 8 CUDA workers
        (a cluster then starves or OOM-kills them); the defaults are now each worker's share."""
        def resources(app: AppDef) -> tuple:
            return app.roles[0].resource.cpu, app.roles[0].resource.memMB

        for name, args, (cpu, memMB) in (("train", ("c.yaml",), (2, 8192)), ("trained", ("export", "runs/r"), (2, 8192)),
                                         ("encode", ("export",), (4, 16384))):
            assert resources(load(name)(*args)) == (cpu, memMB), name  # one worker: as before
            assert resources(load(name)(*args, gpu=8)) == (8 * cpu, 8 * memMB), name
            assert load(name)(*args, gpu=8).roles[0].env["OMP_NUM_THREADS"] == str(cpu), name
            assert resources(load(name)(*args, gpu=8, cpu=64, memMB=480000)) == (64, 480000), name  # as asked
        assert resources(load("encode")("tune", gpu=1)) == (4, 16384)  # one process
        assert resources(from_cli("train", ["--config", "c.yaml", "--gpu", "8"])) == (16, 65536)

    def test_help_lists_documented_parameters(self) -> None:
        for name in COMPONENTS:
            text = _create_args_parser(load(name)).format_help()
            for parameter in ("--nnodes", "--nproc_per_node", "--gpu", "--memMB", "--image", "--env"):
                assert parameter in text, (name, parameter)
            assert "(required)" in text and "number of hosts" in text


class TestTrainedComponent:
    def test_teacher_outputs_over_ranks(self) -> None:
        app = from_cli("trained", ["--job", "teacher-outputs", "--config", "c.yaml", "--checkpoint", "runs/gain",
                                   "--nproc_per_node", "2", "--", "--output-dir", "data/t", "elec.task=gain"])
        assert app.roles[0].name == "teacher" and app.name == "teacher-outputs"
        words = command_of(app)
        assert words[words.index("-m"):] == [
            "-m", "recsys_llm.cli", "teacher-outputs", "--checkpoint", "runs/gain", "--config", "c.yaml",
            "--output-dir", "data/t", "elec.task=gain",
        ]
        assert words[words.index("--nproc_per_node") + 1] == "2"
        # without --config the job reads the run's own config.yaml
        words = command_of(from_cli("trained", ["--job", "export", "--checkpoint", "runs/s", "--", "--output", "o"]))
        assert words[words.index("-m"):] == ["-m", "recsys_llm.cli", "export", "--checkpoint", "runs/s", "--output", "o"]

    def test_jobs_are_sub_commands_that_load_a_checkpoint(self) -> None:
        from recsys_llm.cli import build_parser

        namespace = {}
        exec(COMPONENTS["trained"].read_text(), namespace)  # the way torchx loads it
        required = {"evaluate": [], "export": ["--output", "o"], "teacher-outputs": ["--output-dir", "d"]}
        assert set(namespace["TRAINED_JOBS"]) == set(required)
        for job, job_args in required.items():  # each takes the component's --checkpoint and optional --config
            args = build_parser().parse_args([job, "--checkpoint", "k", "--config", "c.yaml", *job_args])
            assert args.config == "c.yaml" and args.checkpoint == "k", job
            assert build_parser().parse_args([job, "--checkpoint", "k", *job_args]).config is None, job
        with pytest.raises(ValueError, match="must be one of"):
            load("trained")("train", "k")


class TestEncodeComponent:
    def test_export_over_ranks(self) -> None:
        app = from_cli("encode", ["--job", "export", "--nproc_per_node", "2", "--gpu", "2", "--",
                                  "--schema", "data/s/schema.json", "--output", "v"])
        role = app.roles[0]
        assert role.name == "semantics" and role.resource.gpu == 2
        words = command_of(app)
        assert words[words.index("-m"):] == [
            "-m", "recsys_llm.cli", "semantics", "export", "--device", "cuda", "--schema", "data/s/schema.json",
            "--output", "v",
        ]
        assert words[words.index("--nproc_per_node") + 1] == "2"
        assert app.name == "semantics-export"

    def test_jobs_are_the_semantics_sub_commands(self) -> None:
        """The component accepts exactly the sub-commands ``recsys-llm semantics`` has."""
        import argparse

        from recsys_llm.cli import build_parser

        def sub_commands(parser: argparse.ArgumentParser) -> dict:
            actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
            return dict(actions[0].choices) if actions else {}

        semantics = sub_commands(build_parser())["semantics"]
        namespace = {}
        exec(COMPONENTS["encode"].read_text(), namespace)  # the way torchx loads it
        assert set(namespace["SEMANTICS_JOBS"]) == set(sub_commands(semantics))

    def test_unknown_job_is_rejected(self) -> None:
        with pytest.raises(ValueError, match="must be one of"):
            load("encode")("distill")

    def test_single_process_jobs_refuse_extra_workers(self) -> None:
        for job in ("tune", "encode", "adapt"):
            with pytest.raises(ValueError, match="runs as one process"):
                load("encode")(job, nproc_per_node=2)
            with pytest.raises(ValueError, match="runs as one process"):
                load("encode")(job, nnodes=2)
            assert load("encode")(job).roles[0].name == "semantics"

    def test_single_process_jobs_refuse_idle_gpus(self) -> None:
        for job in ("tune", "encode", "adapt"):
            with pytest.raises(ValueError, match="gpu=8 would hold 7 more idle"):
                load("encode")(job, gpu=8)
            assert load("encode")(job, gpu=1).roles[0].resource.gpu == 1
            with pytest.raises(ValueError, match="gpu=2 would hold 1 more idle"):  # the smallest idle GPU too
                load("encode")(job, gpu=2)
        assert load("encode")("export", gpu=8).roles[0].resource.gpu == 8


class TestBenchComponent:
    def test_script_and_result_paths(self) -> None:
        app = from_cli("bench", ["--name", "train_throughput", "--results_dir", "out/", "--", "--quick"])
        words = command_of(app)
        script_at = words.index("benchmarks/train_throughput.py")
        assert words[script_at + 1:] == ["--json", "out/train_throughput.json", "--plot", "out/train_throughput.png", "--quick"]
        assert app.roles[0].name == "bench"
        root = command_of(from_cli("bench", ["--name", "elec", "--results_dir", "/", "--", "--quick"]))
        assert "/elec.json" in root and "/elec.png" in root  # not ./elec.json

    def test_results_go_beside_the_committed_figures_by_default(self) -> None:
        """The default was benchmarks/results: a run (local_cwd, Slurm: in the checkout) wrote over the committed
        JSONs the README quotes (a GPU run over the CPU figures), and tests/test_docs.py failed."""
        words = command_of(from_cli("bench", ["--name", "llactr", "--", "--quick"]))
        assert "benchmarks/results/torchx/llactr.json" in words and "benchmarks/results/torchx/llactr.png" in words
        assert "benchmarks/results/torchx/" in (REPO_ROOT / ".gitignore").read_text().split()  # nor committed
        assert "benchmarks/results/torchx" in (REPO_ROOT / ".dockerignore").read_text().split()  # nor in images

    def test_multi_worker_runs_are_refused(self) -> None:
        """Every benchmark compares single-rank runs (scaling starts its own ranks): ``--nproc_per_node 2`` scheduled
        two workers that each stopped with "train_throughput compares single-rank runs; run it without torchrun"."""
        for args in (["--nproc_per_node", "2"], ["--nnodes", "2"]):
            with pytest.raises(ValueError, match=r"the benchmarks run as one process .* use nnodes=1 nproc_per_node=1, "
                                                 r"got (1x2|2x1)"):
                from_cli("bench", ["--name", "train_throughput", *args])

    def test_name_must_be_a_script_name(self) -> None:
        with pytest.raises(ValueError, match="without .py"):
            load("bench")("../etc/passwd")

    def test_name_must_be_a_benchmark(self) -> None:
        """Only a benchmark takes ``--json``/``--plot``: ``--name run_all`` failed on the cluster with ``run_all.py:
        error: unrecognized arguments: --json ...``, and ``--name common`` ran a module without a ``main`` and
        SUCCEEDED having written nothing."""
        from benchmarks import run_all

        namespace = {}
        exec(COMPONENTS["bench"].read_text(), namespace)  # the way torchx loads it
        assert list(namespace["BENCHMARKS"]) == run_all.discover()
        for name in ("run_all", "common", "peer_deepctr", "train_throughputt"):
            with pytest.raises(ValueError, match=rf"name {name!r} is no benchmark: expected one of \['elec', .*"
                                                 r"benchmarks/run_all.py"):
                from_cli("bench", ["--name", name, "--", "--quick"])


def test_multi_host_replicas_find_rank_0_on_kubernetes() -> None:
    """On kubernetes, replicas 1.. reach rank 0 through ``${VC_<ROLE>_0_HOSTS}``: torchx upper-cases the role name as
    it is (``kubernetes_scheduler.app_to_resource``), Volcano exports the host of task ``<role>-0`` under that name
    with every ``-`` turned into ``_``. A role name with a ``-`` is no shell variable: bash expanded
    ``${VC_TEACHER-OUTPUTS_0_HOSTS:=localhost}:29500`` to ``OUTPUTS_0_HOSTS:=localhost:29500``."""
    from torchx.util.strings import normalize_str

    apps = [load("train")("c.yaml", nnodes=2), load("encode")("export", nnodes=2)]  # bench runs on one host
    apps += [load("trained")(job, "runs/r", nnodes=2) for job in ("evaluate", "export", "teacher-outputs")]
    for app in apps:
        role = app.roles[0]
        torchx_env = f"VC_{normalize_str(role.name)}_0_HOSTS".upper()
        volcano_env = "VC_" + normalize_str(f"{role.name}-0").replace("-", "_").upper() + "_HOSTS"
        command = macros.Values(img_root="", app_id="a", replica_id="1", rank0_env=torchx_env).apply(role).args[1]
        endpoint = shlex.split(command)[shlex.split(command).index("--rdzv_endpoint") + 1]
        shell = subprocess.run(["bash", "-c", f"echo {endpoint}"], env={volcano_env: "rank0-host"},
                               capture_output=True, text=True, check=True)
        assert shell.stdout.strip() == "rank0-host:29500", (role.name, endpoint, shell.stdout)


def test_launch_docs_torchxconfig_is_read_as_written(tmp_path: Path) -> None:
    """The ``.torchxconfig`` shown in docs/launch.md, copied as is, gives torchx the values it names (torchx's
    configparser takes no inline comments: ``scheduler = local_cwd  # default -s`` named no scheduler), and so does
    the repository's own file."""
    import re

    from torchx.runner.config import get_config, load

    block = re.search(r"## `.torchxconfig`\n\n```ini\n(.*?)```", (REPO_ROOT / "docs" / "launch.md").read_text(), re.S)
    for text in (block.group(1), (REPO_ROOT / ".torchxconfig").read_text()):
        path = tmp_path / ".torchxconfig"
        path.write_text(text)
        config: dict = {}
        with open(path) as file:
            load("local_cwd", file, config)
        assert config == {"log_dir": "runs/torchx_logs"}
        assert get_config("cli", "run", "scheduler", dirs=[str(tmp_path)]) == "local_cwd"
        for scheduler, expected in (("kubernetes", {"queue": "default", "namespace": "default"}),
                                    ("slurm", {"partition": "gpu", "time": "12:00:00"})):
            config = {}
            with open(path) as file:
                load(scheduler, file, config)
            assert config == expected, scheduler


def test_kubernetes_training_examples_keep_the_run_dir_on_a_mounted_volume() -> None:
    """Every rank writes its checkpoint shards into train.run_dir and a retried pod is a fresh container: the
    documented kubernetes training commands put the run directory on one of their ``--mounts`` (the configs'
    ``runs/...`` is inside the container, a different directory on each host)."""
    examples = []
    for doc in (REPO_ROOT / "README.md", REPO_ROOT / "docs" / "launch.md"):
        for command in doc.read_text().replace("\\\n", " ").splitlines():
            if "torchx run -s kubernetes" in command and "train.py:train" in command:
                examples.append((doc.name, shlex.split(command.split("#")[0])))
    assert examples
    for doc, words in examples:
        mounts = words[words.index("--mounts") + 1].split(",") if "--mounts" in words else []
        destinations = [item.split("=", 1)[1].rstrip("/") + "/" for item in mounts if item.startswith("dst=")]
        run_dirs = [word.split("=", 1)[1] for word in words if word.startswith("train.run_dir=")]
        assert run_dirs and any(run_dirs[-1].startswith(dst) for dst in destinations), (doc, " ".join(words))


def test_local_examples_make_what_the_later_ones_read() -> None:
    """The local_cwd commands of docs/launch.md run in order: the LLM that ``encode --job export`` reads
    (``--llm``), the run that ``trained`` reads (``--checkpoint``) and the artifact that ``score`` reads
    (``--artifact``) come from an earlier command."""
    docs = (REPO_ROOT / "docs" / "launch.md").read_text().replace("\\\n", " ")
    written, checked = set(), 0
    for line in docs.splitlines():
        if "torchx run -s local_cwd" not in line or "--help" in line:
            continue
        words = shlex.split(line.split("#")[0])
        for flag in ("--llm", "--checkpoint", "--artifact"):
            if flag in words:
                checked += 1
                assert words[words.index(flag) + 1] in written, (flag, line)
        written.update(words[i + 1] for i, word in enumerate(words[:-1]) if word in ("--output-dir", "--output"))
        written.update(word.split("=", 1)[1] for word in words if word.startswith("train.run_dir="))
    assert checked >= 4


def tiny_config(tmp_path: Path) -> Path:
    """Generates a tiny synthetic data set and a config training a small DeepFM on it."""
    from recsys_llm.data.synthetic import generate_synthetic

    data_dir = tmp_path / "data"
    generate_synthetic(str(data_dir), 4000, seed=0, rows_per_group=500)
    config = {
        "data": {"schema": str(data_dir / "schema.json"), "batch_size": 128, "eval_batch_size": 512},
        "model": {"name": "deepfm", "embedding_dim": 8, "mlp_layer_sizes": [16, 8]},
        "sharding": {"sharding_types": ["table_wise", "row_wise"]},
        "train": {"epochs": 1, "run_dir": str(tmp_path / "run"), "progress": False, "patience": 0},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.multiprocess
def test_train_end_to_end_local_cwd_two_processes(tmp_path: Path) -> None:
    """``torchx run -s local_cwd torchx_components/train.py:train --nproc_per_node 2``: 2 gloo ranks; then
    ``trained.py:trained --job evaluate`` on the run."""
    config = tiny_config(tmp_path)
    bin_dir = Path(sys.executable).parent  # the workers start torchrun from PATH
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONPATH=str(REPO_ROOT))
    command = [
        str(bin_dir / "torchx"), "run", "-s", "local_cwd", "-cfg", f"log_dir={tmp_path / 'torchx_logs'}",
        "torchx_components/train.py:train", "--config", str(config), "--nproc_per_node", "2",
        "--env", "OMP_NUM_THREADS=1", "train.seed=1",
    ]
    process = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in (tmp_path / "torchx_logs").rglob("*.log"))
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:] + logs

    run_dir = tmp_path / "run"
    for name in ("config.yaml", "sharding_plan.json", "metrics.jsonl", "results.json"):
        assert (run_dir / name).is_file(), f"{name} missing in {sorted(p.name for p in run_dir.iterdir())}"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["world_size"] == 2 and results["global_step"] > 0
    assert 0.0 <= results["test"]["auc"] <= 1.0
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["seed"] == 1  # the override arrived
    plan = json.loads((run_dir / "sharding_plan.json").read_text())
    ranks = {rank for table in plan.values() for rank in table["ranks"]}
    assert ranks == {0, 1}, plan  # tables sharded over both torchx-launched ranks

    # the trained run, evaluated by the `trained` component on 2 ranks (the checkpoint's shards re-cut)
    log_dir = tmp_path / "torchx_logs_evaluate"
    command = [
        str(bin_dir / "torchx"), "run", "-s", "local_cwd", "-cfg", f"log_dir={log_dir}",
        "torchx_components/trained.py:trained", "--job", "evaluate",  # the run's own config.yaml
        "--checkpoint", str(run_dir), "--nproc_per_node", "2", "--env", "OMP_NUM_THREADS=1", "--", "train.seed=1",
    ]
    process = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    logs = "\n".join(p.read_text(errors="replace") for p in log_dir.rglob("*.log"))
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:] + logs[-3000:]
    assert '"num_samples": 400.0' in logs, logs[-3000:]  # every test row, scored on 2 ranks


def test_launch_docs_show_every_component_argument() -> None:
    """docs/launch.md carries the generated ``--help`` of each component, kept in sync."""
    import inspect

    docs = (REPO_ROOT / "docs" / "launch.md").read_text()
    for name in COMPONENTS:
        assert f"torchx run -s local_cwd torchx_components/{name}.py:{name} --help" in docs
        for parameter in inspect.signature(load(name)).parameters.values():
            if parameter.kind != inspect.Parameter.VAR_POSITIONAL:
                assert f"--{parameter.name} " in docs, (name, parameter.name)
    for scheduler in ("-s local_cwd", "-s kubernetes", "-s slurm"):
        assert scheduler in docs


def test_image_workspace_leaves_out_the_local_environment_and_runs(tmp_path: Path) -> None:
    """``torchx run -s kubernetes`` without ``--workspace ""`` builds ``FROM --image`` + ``COPY . .`` of the checkout,
    filtered by its ``.dockerignore``: without one the laptop's ``.venv`` (a CPU torch) landed on the image's CUDA
    ``.venv``, and its ``data/``, ``runs/`` (checkpoints) and ``.git`` went into every image."""
    import io
    import tarfile

    from torchx.workspace.docker_workspace import _copy_to_tarfile

    kept = ["recsys_llm/cli/__init__.py", "configs/a.yaml", "torchx_components/train.py", "tests/data/test_x.py",
            "results/ml100k.json", "benchmarks/results/train_throughput.json", ".torchxconfig"]
    left_out = [".venv/bin/torchrun", ".venv/lib/python3.11/site-packages/torch/__init__.py", ".git/HEAD",
                ".venv-peers/lib/python3.11/site-packages/torch/__init__.py",  # scripts/peer_venv.sh's (make bench)
                "runs/deepfm/checkpoints/step_1/rank_0.pt", "data/synthetic/schema.json", "out/x", "logs/x",
                "exports/x/model.pt", "results/runs/r/metrics.jsonl", "results/ml100k/runs/r/metrics.jsonl",
                "recsys_llm/__pycache__/cli.cpython-311.pyc", "recsys_llm.egg-info/PKG-INFO",
                ".pytest_cache/README.md", "benchmarks/results/a.json.tmp"]
    for name in kept + left_out:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    (tmp_path / ".dockerignore").write_text((REPO_ROOT / ".dockerignore").read_text())
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        _copy_to_tarfile(str(tmp_path), tar)
        names = set(tar.getnames())
    assert names == set(kept) | {".dockerignore"}, sorted(names)


def test_launch_docs_image_puts_the_projects_environment_on_path() -> None:
    """Each pod runs ``bash -c 'torchrun ... -m recsys_llm.cli ...'`` in the image's working directory: the image of
    docs/launch.md has the checkout as that directory and the ``.venv`` that scripts/install.sh makes there (the
    checkout's ``.venv``) first on ``PATH``, so the pod's ``torchrun`` is the project's."""
    import re

    block = re.search(r"```dockerfile\n(.*?)```", (REPO_ROOT / "docs" / "launch.md").read_text(), re.S)
    assert block, "docs/launch.md shows no Dockerfile for the cluster image"
    lines = [line.split() for line in block.group(1).splitlines() if line and not line.startswith("#")]
    workdir = next(words[1] for words in lines if words[0] == "WORKDIR")
    steps = [" ".join(words) for words in lines]
    assert steps.index("COPY . .") < next(i for i, step in enumerate(steps) if "scripts/install.sh" in step)
    install = (REPO_ROOT / "scripts" / "install.sh").read_text()
    assert 'cd "$(dirname "$0")/.."' in install and "VENV=${VENV:-.venv}" in install  # the checkout's .venv
    path = next(words[1] for words in lines if words[0] == "ENV" and words[1].startswith("PATH="))
    assert path.split("=", 1)[1].split(":")[0] == f"{workdir}/.venv/bin", path


def test_kubernetes_examples_name_where_the_workspace_image_goes() -> None:
    """Without ``--workspace ""`` torchx builds the checkout into an image and pushes it to ``-cfg image_repo``:
    a documented kubernetes command without either built the image and then stopped with ``KeyError: 'must specify
    the image repository via image_repo config ...'``."""
    commands = []
    for doc in (REPO_ROOT / "README.md", REPO_ROOT / "docs" / "launch.md"):
        for line in doc.read_text().replace("\\\n", " ").splitlines():
            if "torchx run" in line and "-s kubernetes" in line:
                commands.append((doc.name, shlex.split(line.split("#")[0].strip().strip("`"))))
    assert len(commands) >= 3
    for doc, words in commands:
        cfg = dict(item.split("=", 1) for item in words[words.index("-cfg") + 1].split(",")) if "-cfg" in words else {}
        no_workspace = "--workspace" in words and words[words.index("--workspace") + 1] == ""
        assert no_workspace or cfg.get("image_repo"), (doc, " ".join(words))


def test_slurm_job_dir_copy_leaves_out_the_local_environment(tmp_path: Path) -> None:
    """``-s slurm -cfg job_dir=DIR`` runs the job in a copy of the checkout, filtered by its ``.torchxignore``:
    without one the local ``.venv`` (gigabytes; the job runs the activated environment, not the copy) was copied
    for every job. data/ and runs/ are copied, so relative paths read the same data there."""
    from torchx.workspace.dir_workspace import _copy_to_dir

    workspace, job_dir = tmp_path / "checkout", tmp_path / "job"
    kept = ["recsys_llm/cli/__init__.py", "configs/a.yaml", "benchmarks/train_throughput.py",
            "data/synthetic/schema.json", "runs/deepfm/config.yaml", "results/elec_row/elec_ml100k.json"]
    left_out = [".venv/bin/torchrun", ".venv/lib/python3.11/site-packages/torch/__init__.py", ".git/HEAD",
                ".venv-peers/lib/python3.11/site-packages/torch/__init__.py",  # scripts/peer_venv.sh's (make bench)
                "recsys_llm/__pycache__/cli.cpython-311.pyc", "recsys_llm.egg-info/PKG-INFO", ".pytest_cache/x",
                "results/runs/r/metrics.jsonl", "results/llactr/amd_epyc/runs/r/ckpt/x"]  # experiments' runs
    for name in kept + left_out:
        (workspace / name).parent.mkdir(parents=True, exist_ok=True)
        (workspace / name).write_text("x")
    (workspace / ".torchxignore").write_text((REPO_ROOT / ".torchxignore").read_text())
    _copy_to_dir(str(workspace), str(job_dir))
    copied = {str(path.relative_to(job_dir)) for path in job_dir.rglob("*") if path.is_file()}
    assert copied == set(kept) | {".torchxignore"}, sorted(copied)


def test_cluster_examples_size_the_host_for_its_gpus() -> None:
    """A documented cluster command that asks for several GPUs per host also asks for the CPUs and memory of such a
    host: the README's took the component defaults, 2 CPUs and 8192 MB for 8 CUDA workers."""
    commands = []
    for doc in (REPO_ROOT / "README.md", REPO_ROOT / "docs" / "launch.md"):
        for line in doc.read_text().replace("\\\n", " ").splitlines():
            if "torchx run" in line and ("-s kubernetes" in line or "-s slurm" in line):
                commands.append((doc.name, shlex.split(line.split("#")[0].strip().strip("`"))))
    assert commands
    for doc, words in commands:
        if "--gpu" in words and int(words[words.index("--gpu") + 1]) > 1 and "--named_resource" not in words:
            assert "--cpu" in words and "--memMB" in words, (doc, " ".join(words))


def test_the_default_is_a_worker_per_gpu_of_the_host() -> None:
    """``--gpu 8`` (or an 8-GPU named resource) without ``--nproc_per_node`` ran one worker, which left
    seven GPUs idle; on a CPU host the default stays one worker (export of row vectors alike)."""
    def workers(app: AppDef) -> str:
        words = " ".join(app.roles[0].args).split()
        return words[words.index("--nproc_per_node") + 1]

    for name, args in (("train", ("c.yaml",)), ("trained", ("export", "runs/r")), ("encode", ("export",))):
        assert workers(load(name)(*args, gpu=8)) == "8", name
        assert workers(load(name)(*args, named_resource="aws_p4d.24xlarge")) == "8", name
        assert workers(load(name)(*args)) == "1", name
        assert workers(load(name)(*args, gpu=8, nproc_per_node=2)) == "2", name  # fewer, when asked
    for job in ("tune", "encode", "adapt"):  # one process whatever the host has
        assert workers(load("encode")(job, named_resource="aws_p4d.24xlarge")) == "1", job


@pytest.mark.parametrize("name, first", [("train", ["--config", "c.yaml"]), ("trained", ["--job", "evaluate",
                         "--checkpoint", "runs/x"]), ("encode", ["--job", "encode"]), ("bench", ["--name", "llactr"])])
def test_negative_resources_and_unknown_rendezvous_backends_are_refused(name: str, first: List[str]) -> None:
    """--cpu=-3 --memMB=-5 --max_retries=-1 gave a Volcano job with no resource request and maxRetry -1, and an
    unknown --rdzv_backend failed inside torchrun on the cluster."""
    with pytest.raises(ValueError, match=r"cpu=-3, memMB=-5: expected >= 0"):
        from_cli(name, [*first, "--cpu", "-3", "--memMB", "-5"])
    if name == "bench":  # one process, no rendezvous
        return
    with pytest.raises(ValueError, match=r"gpu=-1, max_retries=-1: expected >= 0"):
        from_cli(name, [*first, "--gpu", "-1", "--max_retries", "-1"])
    with pytest.raises(ValueError, match=r"rdzv_backend='etcdx': expected one of"):
        from_cli(name, [*first, "--rdzv_backend", "etcdx"])


def test_rendezvous_retries_env_mounts_and_job_name_reach_the_role() -> None:
    """Every option a component takes is handed on to dist.ddp: a dropped one fell back to torchx's default
    without a word (port 29500, no retries, no mounts, the default job name)."""
    mount = ["type=bind,src=/data,dst=/data"]
    cases = [("train", ["--config", "c.yaml"], "trainer"),
             ("trained", ["--job", "evaluate", "--checkpoint", "r"], "evaluate"),
             ("encode", ["--job", "export"], "semantics")]
    for name, first, role_name in cases:
        app = from_cli(name, [*first, "--nnodes", "2", "--rdzv_backend", "static", "--rdzv_port", "29611",
                              "--max_retries", "2", "--env", "A=1", "--mounts", *mount, "--job_name", "exp/run-7"])
        role = app.roles[0]
        words = command_of(app)
        assert words[words.index("--rdzv_backend") + 1] == "static", name
        values = macros.Values(img_root="", app_id="a", replica_id="1", rank0_env="RANK0")
        assert "${RANK0:=localhost}:29611" in values.apply(role).args[1], name
        assert role.port_map == {"c10d": 29611}, name
        assert (role.name, role.max_retries, role.env["A"], app.name) == (role_name, 2, "1", "run-7"), name
        assert role.env["TORCHX_TRACKING_EXPERIMENT_NAME"] == "exp", name
        assert [m.dst_path for m in role.mounts] == ["/data"], name
    app = from_cli("bench", ["--name", "llactr", "--env", "A=1", "--mounts", *mount, "--job_name", "exp/b", "--",
                             "--quick"])
    role = app.roles[0]
    assert (role.env["A"], app.name, [m.dst_path for m in role.mounts]) == ("1", "b", ["/data"])


def test_an_override_without_a_key_is_refused() -> None:
    with pytest.raises(ValueError, match=r"config overrides must look like key=value, got \['=1'\]"):
        from_cli("train", ["--config", "c.yaml", "train.epochs=1", "=1"])


def test_a_named_resource_without_gpus_runs_its_workers_on_the_cpu() -> None:
    """aws_m5.2xlarge (8 CPUs, no GPU): two CPU workers are fine, each with half the CPUs, and no CUDA device."""
    for name, args in (("train", ("c.yaml",)), ("trained", ("evaluate", "runs/r")), ("encode", ("export",))):
        role = load(name)(*args, nproc_per_node=2, named_resource="aws_m5.2xlarge").roles[0]
        words = shlex.split(role.args[1])
        assert role.resource.gpu == 0 and role.env["OMP_NUM_THREADS"] == "4", name
        assert words[words.index("--nproc_per_node") + 1] == "2" and "train.device=cuda" not in words, name
    assert load("bench")("llactr", named_resource="aws_m5.2xlarge").roles[0].resource.gpu == 0


def test_a_named_resources_gpus_ask_for_cuda_in_every_job() -> None:
    """The named resource sets the host's GPUs, whatever --gpu says: its jobs need CUDA as --gpu's do."""
    for name, args in (("train", ("c.yaml",)), ("trained", ("evaluate", "runs/r"))):
        words = command_of(load(name)(*args, named_resource="aws_p4d.24xlarge"))
        assert words[-1] == "train.device=cuda", name


def test_the_cuda_override_after_splits_and_a_separator_adds_no_second_separator() -> None:
    words = command_of(load("trained")("teacher-outputs", "runs/r", "--splits", "train", "--", "elec.task=gain", gpu=2))
    assert words[words.index("teacher-outputs"):] == ["teacher-outputs", "--checkpoint", "runs/r", "--splits", "train",
                                                      "--", "elec.task=gain", "train.device=cuda"]


def test_a_negative_gpu_count_of_a_benchmark_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^gpu=-1: expected >= 0$"):
        from_cli("bench", ["--name", "llactr", "--gpu", "-1"])


@pytest.mark.parametrize("name, first", [("train", ["--config", "c.yaml"]), ("trained", ["--job", "evaluate",
                         "--checkpoint", "runs/x"]), ("encode", ["--job", "export"])])
def test_rendezvous_backends_and_ports_the_job_cannot_reach_are_refused(name: str, first: List[str]) -> None:
    """dist.ddp points torchrun at rank 0's host:rdzv_port whatever the backend: --rdzv_backend etcd (no etcd server
    there, no python-etcd in the image) and --rdzv_port 0 / 70000 on several hosts were accepted and failed in torchrun
    on the cluster."""
    for backend in ("etcd", "etcd-v2"):
        with pytest.raises(ValueError, match=rf"rdzv_backend='{backend}': expected one of \('c10d', 'static'\)"):
            from_cli(name, [*first, "--nnodes", "2", "--rdzv_backend", backend])
    for port in ("0", "70000"):
        with pytest.raises(ValueError, match=rf"rdzv_port={port}: expected a TCP port in 1..65535"):
            from_cli(name, [*first, "--nnodes", "2", "--rdzv_port", port])
    from_cli(name, [*first, "--rdzv_port", "0"])  # one host: ddp ignores the port (it takes any free one)


def test_gpus_ask_for_cuda_in_the_llm_jobs_and_benchmarks() -> None:
    """--gpu 1 with a CPU torch in the image ran SSFT / the vector export / a benchmark on the CPUs (their --device
    defaults to CUDA only when one is visible), the GPUs idle, as train.device=cuda prevents for train and trained."""
    for job in ("tune", "encode", "adapt", "export"):
        words = command_of(load("encode")(job, "--schema", "s.json", gpu=1))
        assert words[words.index(job):words.index(job) + 3] == [job, "--device", "cuda"], job
        words = command_of(load("encode")(job, "--device=cuda:0", gpu=1))  # the job's own choice stays the only one
        assert words.count("--device") + words.count("--device=cuda:0") == 1, job
        assert "--device" not in command_of(load("encode")(job)), job  # no GPU asked for: the job's default
    words = command_of(load("encode")("export", named_resource="aws_p4d.24xlarge"))
    assert "--device" in words and words[words.index("--device") + 1] == "cuda"
    words = command_of(load("bench")("llactr", "--quick", gpu=1))
    assert words[-3:] == ["--device", "cuda", "--quick"]
    assert command_of(load("bench")("llactr", "--device", "cpu", gpu=1)).count("--device") == 1
    assert "--device" not in command_of(load("bench")("llactr", "--quick"))


def test_edge_values_of_the_launch_arguments_are_taken_or_refused_as_documented() -> None:
    """nnodes=0 is refused like nproc_per_node=0; 65535 is a TCP port; a named resource with as many GPUs as the
    benchmark's one worker runs it on that GPU; the benchmark host's memory defaults to 16 GiB."""
    for name, args in (("train", ("c.yaml",)), ("trained", ("evaluate", "runs/r")), ("encode", ("export",)),
                       ("bench", ("train_throughput",))):
        with pytest.raises(ValueError, match="nnodes and nproc_per_node must be >= 1, got nnodes=0"):
            load(name)(*args, nnodes=0)
    words = command_of(load("train")("c.yaml", nnodes=2, rdzv_port=65535))
    assert words[words.index("--rdzv_endpoint") + 1].endswith(":65535")
    words = command_of(load("bench")("elec", named_resource="aws_p3.2xlarge"))  # 1 GPU for the 1 worker
    assert words[words.index("benchmarks/elec.py") + 5:] == ["--device", "cuda"]
    assert load("bench")("elec").roles[0].resource.memMB == 16384


def test_a_component_option_given_with_an_equals_sign_among_the_job_arguments_is_refused() -> None:
    for name, args in (("bench", ["--name", "elec", "--", "--quick", "--cpu=4"]),
                       ("trained", ["--job", "export", "--checkpoint", "r", "--", "--output", "o", "--gpu=1"]),
                       ("encode", ["--job", "export", "--", "--schema", "s.json", "--nnodes=2"])):
        with pytest.raises(ValueError, match="never reach the component"):
            from_cli(name, args)


def test_an_empty_config_or_checkpoint_is_refused_before_the_job_is_scheduled() -> None:
    """Every worker stopped at its start with ``--config ''`` (``--checkpoint ''``), after the scheduler had run it."""
    with pytest.raises(ValueError, match=r"config='': expected the path of the training config file \(YAML\)"):
        from_cli("train", ["--config", "", "train.epochs=1"])
    with pytest.raises(ValueError, match=r"config=' ': expected the path"):
        load("train")(" ")
    with pytest.raises(ValueError, match=r"checkpoint='': expected a checkpoint directory or a run directory"):
        from_cli("trained", ["--job", "export", "--checkpoint", "", "--", "--output", "runs/served"])
    with pytest.raises(ValueError, match=r"checkpoint=' ': expected a checkpoint directory"):
        from_cli("trained", ["--job", "export", "--checkpoint", " ", "--", "--output", "runs/served"])


def test_an_empty_job_name_is_each_components_default() -> None:
    assert from_cli("train", ["--config", "c.yaml", "--job_name", ""]).name == from_cli("train", ["--config",
                                                                                               "c.yaml"]).name
    assert load("train")("c.yaml", job_name="").name == "train"  # torchx keeps the {run} part as the app's name


@pytest.mark.parametrize("name, first", [("train", ["--config", "c.yaml"]), ("trained", ["--job", "evaluate",
                         "--checkpoint", "runs/x"]), ("encode", ["--job", "export"])])
def test_static_rendezvous_node_rank_is_expanded_on_aws_batch(name: str, first: List[str], tmp_path: Path) -> None:
    """AWS Batch fills ${replica_id} with ``$AWS_BATCH_JOB_NODE_INDEX``, which dist.ddp's single quotes kept from
    bash: every node's torchrun got that text as --node_rank and stopped at once (invalid int value)."""
    app = from_cli(name, [*first, "--nnodes", "2", "--rdzv_backend", "static"])
    fake = tmp_path / "torchrun"  # prints the node rank torchrun would get
    fake.write_text('#!/bin/bash\nwhile [ $# -gt 0 ]; do [ "$1" = --node_rank ] && echo "$2"; shift; done\n')
    fake.chmod(0o755)
    env = {"PATH": f"{tmp_path}:{os.environ['PATH']}", "AWS_BATCH_JOB_NODE_INDEX": "1"}
    for replica_id, expected in (("$AWS_BATCH_JOB_NODE_INDEX", "1"), ("0", "0"), ("1", "1")):  # aws_batch, the others
        role = macros.Values(img_root="", app_id="a", replica_id=replica_id, rank0_env="RANK0").apply(app.roles[0])
        done = subprocess.run([role.entrypoint, *role.args], env=env, capture_output=True, text=True, check=True)
        assert done.stdout.strip() == expected, (name, replica_id, done.stdout)
