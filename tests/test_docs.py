"""The documentation keeps up with the code: every config key is in docs/usage.md."""

import dataclasses
import importlib
import os
import re
from typing import Iterator

from recsys_llm.modules.elec import ELECConfig
from recsys_llm.modules.llactr import LLaCTRConfig
from recsys_llm.modules.teacher_student import TeacherStudentConfig
from recsys_llm.train.config import ExperimentConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _keys(cls: type, prefix: str) -> Iterator[str]:
    for field in dataclasses.fields(cls):
        if dataclasses.is_dataclass(field.type):
            yield from _keys(field.type, f"{prefix}{field.name}.")
        elif field.name not in ("llactr", "elec"):
            yield f"{prefix}{field.name}"


def test_every_config_key_has_a_row_in_the_usage_guide() -> None:
    with open(os.path.join(REPO, "docs", "usage.md"), encoding="utf-8") as handle:
        guide = handle.read()
    keys = [*_keys(ExperimentConfig, ""), *_keys(LLaCTRConfig, "llactr."), *_keys(ELECConfig, "elec."),
            *_keys(TeacherStudentConfig, "elec.distill.")]
    assert len(keys) > 60
    missing = [key for key in keys if f"| `{key}` |" not in guide]
    assert not missing, f"docs/usage.md section 7 lacks {missing}"


def test_every_override_the_docs_name_is_a_config_key() -> None:
    """A ``section.key=value`` override shown in the README, docs/, a config, the package's docstrings, the
    examples or the torchx components names a key the config has (one inside a mapping such as
    ``elec.entity_tables.<field>`` extends a key): a misspelt one is refused when the run starts."""
    import glob

    keys = {*_keys(ExperimentConfig, ""), *_keys(LLaCTRConfig, "llactr."), *_keys(ELECConfig, "elec."),
            *_keys(TeacherStudentConfig, "elec.distill.")}
    patterns = ["README.md", "docs/*.md", "configs/*.yaml", "recsys_llm/**/*.py", "examples/*.py",
                "torchx_components/*.py", "experiments/*.py", "benchmarks/*.py"]
    files = sorted({path for pattern in patterns for path in glob.glob(os.path.join(REPO, pattern), recursive=True)})
    override = re.compile(r"(?<![\w./-])((?:data|model|optim|sharding|train|llactr|elec)\.[a-z_]+(?:\.[a-z_]+)*)=(?!=)")
    unknown = []
    for path in files:
        with open(path, encoding="utf-8") as handle:
            for key in override.findall(handle.read()):
                parts = key.split(".")
                if not any(".".join(parts[:n]) in keys for n in range(2, len(parts) + 1)):
                    unknown.append(f"{os.path.relpath(path, REPO)}: {key}")
    assert len(files) > 50
    assert not unknown, f"overrides of keys the config does not have: {unknown}"


def _read(*parts: str) -> str:
    with open(os.path.join(REPO, *parts), encoding="utf-8") as handle:
        return handle.read()


def test_links_inside_the_repository_point_to_files_that_exist() -> None:
    """Relative Markdown links of README.md and docs/ that stay inside the repository resolve."""
    import re

    pages = [("README.md",)] + [("docs", name) for name in sorted(os.listdir(os.path.join(REPO, "docs")))
                                if name.endswith(".md")]
    broken = []
    for page in pages:
        base = os.path.dirname(os.path.join(REPO, *page))
        for target in re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", _read(*page)):
            if "://" in target or target.startswith("mailto:"):
                continue
            path = os.path.normpath(os.path.join(base, target))
            if path.startswith(REPO + os.sep) and not os.path.exists(path):
                broken.append(f"{'/'.join(page)}: {target}")
    assert not broken, broken


def test_the_method_notes_the_design_cites_are_in_the_repository() -> None:
    design = _read("docs", "design.md")
    methods = _read("docs", "methods.md")
    assert "[`methods.md`](methods.md) §1" in design and "[`methods.md`](methods.md) §2" in design
    assert "`METHODS.md`" not in design
    assert "\n## 1. LLaCTR" in methods and "\n## 2. ELEC" in methods


def test_the_method_notes_are_the_verbatim_copy_their_header_says() -> None:
    """docs/methods.md says it is ``../shared/METHODS.md`` copied verbatim under its one-paragraph header: a note
    of the project's own choices added there reads as the team's notes; it belongs in docs/design.md."""
    import pytest

    notes = os.path.join(REPO, "..", "shared", "METHODS.md")
    if not os.path.exists(notes):
        pytest.skip(f"the method notes are not at {os.path.abspath(notes)} (outside the repository)")
    header, copy = _read("docs", "methods.md").split("\n\n", 1)
    assert "copied verbatim from `../shared/METHODS.md`" in header
    with open(notes, encoding="utf-8") as handle:
        assert copy == handle.read(), "docs/methods.md below its header differs from ../shared/METHODS.md"


def test_the_guides_recipe_for_torchrecs_deepfm_gives_its_logits_and_shards_once() -> None:
    """docs/usage.md §5's ``DeepFMBackbone``: logits whose sigmoid is torchrec's own output (its OverArch ends in a
    Sigmoid, and CTRTask's BCE, the metrics and FIE take logits), and one path per EBC for the planner."""
    import re

    import torch
    from torchrec.models.deepfm import SimpleDeepFMNN
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from recsys_llm.models.base import CTRBackbone
    from recsys_llm.train.planner_inputs import find_tables
    from recsys_llm.models.task import CTRTask

    blocks = [b for b in re.findall(r"```python\n(.*?)```", _read("docs", "usage.md"), re.S) if "DeepFMBackbone" in b]
    assert len(blocks) == 1
    scope = {"CTRBackbone": CTRBackbone, "SimpleDeepFMNN": SimpleDeepFMNN}
    exec(blocks[0], scope)
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name="t_user", embedding_dim=8, num_embeddings=10, feature_names=["user_id", "friend_id"]),
        EmbeddingBagConfig(name="t_item", embedding_dim=8, num_embeddings=10, feature_names=["item_id"]),
    ])
    deepfm = SimpleDeepFMNN(2, ebc, hidden_layer_size=8, deep_fm_dimension=4)
    backbone = scope["DeepFMBackbone"](deepfm, 2)
    dense = torch.randn(3, 2)
    kjt = KeyedJaggedTensor.from_lengths_sync(["user_id", "friend_id", "item_id"], torch.arange(9),
                                              torch.ones(9, dtype=torch.int32))
    output = backbone(dense, kjt)
    torch.testing.assert_close(torch.sigmoid(output.logits), deepfm(dense, kjt).squeeze(-1))
    assert output.representation.shape == (3, backbone.representation_dim)
    assert set(find_tables(CTRTask(backbone))) == {"t_user", "t_item"}  # not refused: one path per EBC


def test_the_names_the_usage_guide_imports_from_a_module_are_there() -> None:
    """Names a bullet of the guide says come "from `recsys_llm.x`" are there: a notebook imports them so."""
    with open(os.path.join(REPO, "docs", "usage.md"), encoding="utf-8") as handle:
        text = handle.read()
    checked = 0
    for bullet in re.split(r"\n\* ", text):
        names = []
        for match in re.finditer(r"`([^`]+)`", bullet):
            token = match.group(1)
            if token.startswith("recsys_llm") and re.search(r"\bfrom\s+$", bullet[: match.start()]):
                module = importlib.import_module(token)
                missing = [name for name in names if not hasattr(module, name)]
                assert not missing, f"docs/usage.md: {missing} cannot be imported from {token}"
                checked += len(names)
                names = []
            elif re.fullmatch(r"[A-Za-z_]\w*", token):
                names.append(token)
    assert checked >= 9  # the distillation losses, sharding, the pipeline and serving


def test_the_llactr_lambda_picks_in_the_results_page_are_those_of_its_results_json() -> None:
    """The results page's sentences on which lambdas validation picked must say what the table's JSON records
    (they are about the table made with the reduced SSFT budget, kept beside the headline one)."""
    import json

    with open(os.path.join(REPO, "results", "llactr_ml100k_reduced_ssft", "llactr_ml100k.json"),
              encoding="utf-8") as handle:
        choices = json.load(handle)["choices"]
    with open(os.path.join(REPO, "docs", "results.md"), encoding="utf-8") as handle:
        readme = " ".join(handle.read().split())
    both_at_top = sorted(b for b, c in choices.items() if c["+both"]["lambda_fre"] == 0.5)
    fre_at_top = sorted(b for b, c in choices.items() if c["+FRE"]["lambda_fre"] == 0.5)
    assert both_at_top == fre_at_top == ["deepfm", "fm", "fwfm"]
    assert "for +both on the same three backbones" in readme and "five of the six" not in readme
    # and it cites that JSON: the headline's results/llactr_ml100k.json picks lambda_FRE 0.5 for +both on DCNv2 too
    assert "three backbones (`results/llactr_ml100k_reduced_ssft/llactr_ml100k.json`, `choices`)" in readme
    assert choices["dlrm"]["+FIE"]["lambda_fie"] == 0.01 and choices["deepfm"]["+FIE"]["lambda_fie"] == 0.5
    assert "now picks lambda_FIE 0.01 for DLRM, and still 0.5 for DeepFM" in readme


def test_the_usage_guide_says_what_the_epoch_of_each_metrics_record_counts() -> None:
    """``epoch`` / ``train`` records give the epoch's 0-based index and ``valid`` records the epochs finished
    (the validation after epoch 0 says 1, tests/train/test_train_runner.py): the guide said neither."""
    with open(os.path.join(REPO, "docs", "usage.md"), encoding="utf-8") as handle:
        text = " ".join(handle.read().split())
    assert ("A record's `epoch` is the 0-based index of the epoch in `train` and `epoch` records" in text
            and "but the number of epochs finished in `valid`, `started` and `resumed` records" in text
            and "the validation after epoch 0 has `epoch` 1" in text)


def test_the_readme_says_which_standard_deviation_the_tables_give() -> None:
    from experiments.common import mean_std

    assert mean_std([1.0, 2.0, 3.0])["std"] == 1.0  # n - 1: the population std would be 0.816
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as handle:
        assert "n - 1 in the denominator" in " ".join(handle.read().split())


# The CPU throughput table of README.md and docs/results.md: figure label (its start) -> the JSON
# under benchmarks/results/ and the top-level key the quoted value is read from.
THROUGHPUT_FIGURES = {
    "project pipeline vs hand-written TorchRec loop": ("train_throughput", "ratio_vs_torchrec_loop"),
    "from Parquet vs from memory": ("train_throughput", "ratio_parquet_vs_memory"),
    "training with FRE + FIE vs plain backbone": ("llactr", "train_ratio_vs_backbone"),
    "serving with FIE vs plain backbone": ("llactr", "serve_ratio_vs_backbone"),
    "LLM cost, instance level vs field level": ("llactr", "llm_cost_ratio_instance_vs_field"),
    "exported student vs plain backbone": ("elec", "student_serve_ratio_vs_backbone"),
    "student vs gain network computing the LLM vector": ("elec", "student_speedup_vs_gain_online_llm"),
    "joint KD training vs plain backbone": ("elec", "kd_train_ratio_vs_backbone"),
    "exported gain network with user + item vectors": ("elec", "gain_entity_tables_serve_ratio_vs_backbone"),
    "DeepFM training speed vs DeepCTR-Torch": ("peers", "train_speedup_vs_deepctr_torch"),
}


def test_the_throughput_tables_quote_the_committed_benchmark_jsons() -> None:
    """Each figure of the throughput table (README and results page) is its JSON's value, rounded as quoted."""
    import json

    for page in ("README.md", os.path.join("docs", "results.md")):
        with open(os.path.join(REPO, page), encoding="utf-8") as handle:
            rows = [line.split("|")[1:-1] for line in handle if line.startswith("| ")]
        checked = set()
        for cells in rows:
            if len(cells) != 4:
                continue
            label, quoted = cells[1].strip(), cells[2].strip()
            match = [key for key in THROUGHPUT_FIGURES if label.startswith(key)]
            if not match or match[0] in checked:
                continue
            name, key = THROUGHPUT_FIGURES[match[0]]
            with open(os.path.join(REPO, "benchmarks", "results", f"{name}.json"), encoding="utf-8") as handle:
                value = json.load(handle)[key]
            number = re.match(r"[-+]?\d+(?:\.(\d+))?", quoted)
            assert number, (page, label, quoted)
            decimals = len(number.group(1) or "")
            assert float(number.group(0)) == round(value, decimals), (
                f"{page}: '{label}' quotes {quoted}, benchmarks/results/{name}.json has {key}={value:.4g}")
            checked.add(match[0])
        assert checked == set(THROUGHPUT_FIGURES), (page, sorted(set(THROUGHPUT_FIGURES) - checked))


def test_the_llm_cost_with_a_tuning_sample_is_that_of_the_committed_llactr_json() -> None:
    """The results page quotes the instance-level cost ratio with the CTR-LLM tuned on a sample beside the
    headline's, and says which side of the goal it is on: both must be those of benchmarks/results/llactr.json
    (the page said 24, 'still above the goal', after the JSON was rerun at 18.4)."""
    import json

    with open(os.path.join(REPO, "benchmarks", "results", "llactr.json"), encoding="utf-8") as handle:
        details = json.load(handle)["details"]
    value = details["instance_with_tuning_sample"]["llm_cost_ratio_instance_vs_field"]
    goal = details["goals"]["llm_cost_ratio_instance_vs_field"]
    text = " ".join(_read(os.path.join("docs", "results.md")).split())
    quoted = re.search(r"the ratio is (\d+) \(`details\.instance_with_tuning_sample`[^)]*\), (?:still )?(above|below) the goal", text)
    assert quoted, "docs/results.md: the sentence on the ratio with a tuning sample is gone or reworded"
    assert int(quoted.group(1)) == round(value), (
        f"docs/results.md quotes {quoted.group(1)}, benchmarks/results/llactr.json has "
        f"details.instance_with_tuning_sample.llm_cost_ratio_instance_vs_field={value:.4g}")
    assert quoted.group(2) == ("above" if value >= goal else "below"), (quoted.group(0), value, goal)


def test_the_readme_names_what_its_two_set_up_commands_need() -> None:
    # it said "only Python 3": a slim image (python:3.12-slim) has no make, and `make demo` stopped on
    # "make: command not found" with no word on what else does the set-up
    readme = " ".join(_read("README.md").split())
    setup = readme[readme.index("make test"):readme.index("## What is in it")]
    assert "only Python" not in setup
    assert "GNU make" in setup and "bash" in setup and "python3-venv" in setup
    makefile = _read("Makefile")
    assert "bash scripts/install.sh" in makefile and "$(PY) -m pytest -q tests" in makefile
    assert "`bash scripts/install.sh` does the set-up" in setup and "`.venv/bin/python -m pytest -q tests`" in setup


def _usage_block(marker: str) -> str:
    """The one Python block of docs/usage.md that holds ``marker``."""
    blocks = [b for b in re.findall(r"```python\n(.*?)```", _read("docs", "usage.md"), re.S) if marker in b]
    assert len(blocks) == 1, f"docs/usage.md: {len(blocks)} Python blocks hold {marker!r}"
    return blocks[0]


def test_the_guides_raw_criteo_recipe_gives_the_prepared_rows(tmp_path, monkeypatch) -> None:
    """docs/usage.md §1's recipe for a serving process that receives raw Criteo lines (empty and negative
    cells, one hash size per field) gives the dense features and ids ``prepare criteo`` wrote for them."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from recsys_llm.data.criteo import DENSE_NAMES, SPARSE_NAMES, CriteoConfig, prepare_criteo

    rng = np.random.default_rng(0)
    lines = [[str(int(rng.random() < 0.3))]
             + ["" if rng.random() < 0.2 else str(int(rng.integers(-2, 1000))) for _ in DENSE_NAMES]
             + ["" if rng.random() < 0.2 else f"{int(rng.integers(0, 2 ** 32)):08x}" for _ in SPARSE_NAMES]
             for _ in range(100)]
    (tmp_path / "day_0").write_text("".join("\t".join(line) + "\n" for line in lines))
    sizes = tuple(int(size) for size in rng.integers(2, 5000, len(SPARSE_NAMES)))
    prepare_criteo(str(tmp_path / "day_0"), str(tmp_path / "data" / "criteo"), CriteoConfig(hash_size=sizes))
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(_usage_block("from recsys_llm.data.criteo import SPARSE_NAMES"), scope)
    prepared = pq.read_table(tmp_path / "data" / "criteo" / "train.parquet").slice(0, 3)
    assert prepared["row_id"].to_pylist() == [0, 1, 2]  # the recipe's first three lines
    expected_dense = torch.tensor(np.stack([prepared[name].to_numpy() for name in DENSE_NAMES], axis=1))
    assert scope["dense"].dtype == torch.float32
    assert torch.equal(scope["dense"], expected_dense)
    ids = scope["kjt"].to_dict()
    assert {name: ids[name].values().tolist() for name in SPARSE_NAMES} == {
        name: prepared[name].to_pylist() for name in SPARSE_NAMES}


def test_the_guides_serving_recipe_gives_the_students_probabilities(tmp_path, monkeypatch) -> None:
    """docs/usage.md §4's "Serving the exported student", as written (``exports/student`` beside
    ``data/synthetic``): the exported student's probabilities for 8 test rows."""
    import torch

    from recsys_llm.data.parquet import ParquetBatchReader
    from recsys_llm.data.schema import DatasetSchema
    from recsys_llm.data.synthetic import generate_synthetic
    from recsys_llm.models.registry import SMOKE_CONFIGS
    from recsys_llm.modules.elec import build_student
    from recsys_llm.serving import export_task

    data = str(tmp_path / "data" / "synthetic")
    generate_synthetic(data, 2_000, seed=0, rows_per_group=512)
    schema = DatasetSchema.load(data)
    torch.manual_seed(0)
    student = build_student(schema, SMOKE_CONFIGS["deepfm"], device=torch.device("cpu")).eval()
    example = next(iter(ParquetBatchReader(schema, "train", 4)))
    export_task(student, str(tmp_path / "exports" / "student"), example.dense_features, example.sparse_features,
                schema=schema)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(_usage_block("ServedModel.load(\"exports/"), scope)
    batch = next(iter(ParquetBatchReader(schema, "test", 8)))
    with torch.no_grad():
        expected = torch.sigmoid(student.predict(batch).logits)
    assert scope["probabilities"].shape == (8,)
    torch.testing.assert_close(scope["probabilities"], expected)


def test_the_guides_raw_tabular_recipe_gives_the_prepared_ids(tmp_path, monkeypatch) -> None:
    """docs/usage.md §1's example for a serving process that receives raw values of ``prepare tabular`` fields (its
    own schema example): integer ids, a vocabulary, strings hashed with the field's position among all fields (a
    dense field before it counts), and a hashed field whose values are all integers, folded rather than hashed; the
    prepared schema records each way."""
    import csv

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from recsys_llm.data.hashing import hash_strings
    from recsys_llm.data.tabular import prepare_tabular
    from tests.small_artifact import export_small_deepfm

    schema_yaml = [b for b in re.findall(r"```yaml\n(.*?)```", _read("docs", "usage.md"), re.S) if "shop-clicks" in b]
    assert len(schema_yaml) == 1
    (tmp_path / "shop.yaml").write_text(schema_yaml[0])
    rng = np.random.default_rng(0)

    def prepare(queries: list) -> dict:
        rows = [{"event_id": 1000 + i, "user": f" {rng.integers(0, 100)}", "city": ["Paris", " Lyon", "Nice ", ""][i % 4],
                 "categories": "toys|books", "price": 1.5, "query": queries[i], "clicked": i % 2}
                for i in range(len(queries))]
        with open(tmp_path / "clicks.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        prepare_tabular(str(tmp_path / "clicks.csv"), str(tmp_path / "shop.yaml"), str(tmp_path / "data" / "shop"))
        prepared = pa.concat_tables(pq.read_table(tmp_path / "data" / "shop" / f"{split}.parquet")
                                    for split in ("train", "valid", "test"))
        by_key = {row["event_id"]: row for row in rows}
        return {name: ([by_key[key][name] for key in prepared["event_id"].to_pylist()], prepared[name].to_pylist())
                for name in ("user", "city", "query")}

    monkeypatch.chdir(tmp_path)
    texts = prepare([["red shoes", "", " 42", "blue hat"][i % 4] for i in range(200)])
    scope: dict = {}
    exec(_usage_block("raw_value_ids(schema, "), scope)
    schema, raw_value_ids = scope["schema"], scope["raw_value_ids"]
    assert schema.ids["query"] == "hashed_text" and schema.ids["city"] == "vocabulary"
    for name, (raw, prepared) in texts.items():
        assert raw_value_ids(schema, name, raw)[0].tolist() == prepared, name
    assert all((id_ > 0) == (value != "") for value, id_ in zip(*texts["query"]))  # hashed: in [1, cardinality)

    # the guide's whole request of raw values runs on an artifact of that data (tests/data/test_tabular_like.py
    # compares such requests with the same rows prepared)
    export_small_deepfm(schema, "runs/shop_served", batch_size=16, steps=2)
    exec(_usage_block("served.raw_request("), scope)
    probabilities = scope["probabilities"]
    assert probabilities.shape == (2,) and bool(((probabilities > 0) & (probabilities < 1)).all())

    numbers = prepare([str(int(rng.integers(0, 10**6))) for _ in range(200)])  # every value an integer: folded
    schema = scope["DatasetSchema"].load("data/shop/schema.json")
    assert schema.ids["query"] == "integer"
    raw, prepared = numbers["query"]
    assert raw_value_ids(schema, "query", raw)[0].tolist() == prepared == [int(value) % 1000 for value in raw]
    assert hash_strings(pa.array(raw), 1000, salt=4).tolist() != prepared  # the same data prepared as text differs



def test_the_gpu_tables_cpu_column_names_the_cpu_of_each_json() -> None:
    """docs/results.md's "On a GPU" table sets the H200 figures beside those of benchmarks/results/<name>.json,
    which came from two machines (elec's from an Intel Xeon, llactr's and train_throughput's from an AMD EPYC):
    each row's CPU cell names the CPU its JSON records (``machine.cpu_model``) and quotes its value."""
    import json

    figures = {"project pipeline / hand-written TorchRec loop": ("train_throughput", "ratio_vs_torchrec_loop"),
               "training with FRE + FIE / plain backbone": ("llactr", "train_ratio_vs_backbone"),
               "serving / plain backbone": ("llactr", "serve_ratio_vs_backbone"),
               "instance-level / field-level LLM cost": ("llactr", "llm_cost_ratio_instance_vs_field"),
               "student serving / plain backbone": ("elec", "student_serve_ratio_vs_backbone"),
               "student / gain network with an online LLM": ("elec", "student_speedup_vs_gain_online_llm"),
               "joint KD training / plain backbone": ("elec", "kd_train_ratio_vs_backbone")}
    page = _read("docs", "results.md")
    section = page[page.index("\n## On a GPU"):]
    rows = [line.split("|")[1:-1] for line in section.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in rows[0]]
    assert header[:3] == ["benchmark", "figure", "H200"] and "2-core CPU" in header[3], header
    checked = set()
    for cells in rows[1:]:
        name, label, cpu = cells[0].strip(), cells[1].strip(), cells[3].strip()
        if label not in figures:
            continue
        assert figures[label][0] == name, (label, name)
        with open(os.path.join(REPO, "benchmarks", "results", f"{name}.json"), encoding="utf-8") as handle:
            record = json.load(handle)
        model = record["machine"]["cpu_model"]
        named = "AMD EPYC" if model.startswith("AMD EPYC") else "Intel Xeon" if "Xeon" in model else model
        others = {"AMD EPYC", "Intel Xeon"} - {named}
        assert named in cpu and not any(other in cpu for other in others), (label, cpu, model)
        number = re.match(r"[-+]?\d+(?:\.(\d+))?", cpu)
        assert number and float(number.group(0)) == round(record[figures[label][1]], len(number.group(1) or "")), (
            label, cpu)
        checked.add(label)
    assert checked == set(figures), sorted(set(figures) - checked)


def _documented_commands() -> Iterator["tuple[str, str, list]"]:
    """(where, command, its words after the program) of each ``recsys-llm ...`` (or ``torchrun`` / ``python`` /
    ``torchx run ... -m recsys_llm.cli [--] ...``) line in a fenced code block of the README and the guides,
    ``\\`` continuations joined; optional parts written ``[--flag value]`` count as given."""
    import shlex

    for name in ("README.md", "docs/usage.md", "docs/launch.md", "docs/design.md", "docs/results.md",
                 "benchmarks/README.md"):
        with open(os.path.join(REPO, name), encoding="utf-8") as handle:
            lines = handle.read().splitlines()
        in_block, i = False, 0
        while i < len(lines):
            line, number = lines[i], i + 1
            if line.strip().startswith("```"):
                in_block = not in_block
            elif in_block:
                while line.rstrip().endswith("\\") and i + 1 < len(lines):
                    i += 1
                    line = line.rstrip()[:-1] + " " + lines[i].strip()
                words = []
                program = (line.split() or [""])[0]
                if program in ("recsys-llm", "torchrun", "torchx") or program.endswith("python"):
                    words = [word.strip("[]") for word in shlex.split(line, comments=True) if word not in ("[", "]")]
                if words[:1] == ["recsys-llm"]:
                    yield f"{name}:{number}", line.strip(), words[1:]
                elif "recsys_llm.cli" in words:  # torchrun / python / torchx (its arguments after --) -m recsys_llm.cli
                    after = words[words.index("recsys_llm.cli") + 1:]
                    yield f"{name}:{number}", line.strip(), after[1:] if after[:1] == ["--"] else after
            i += 1


def test_every_command_line_of_the_guides_parses() -> None:
    """A flag renamed or removed fails here, not in the shell of a reader who copied the line."""
    import argparse
    import contextlib
    import io

    from recsys_llm.cli import build_parser

    def exact_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        parser.allow_abbrev = False  # the guides spell each flag out: a flag renamed to a longer one fails too
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    exact_flags(sub)
        return parser

    refused = []
    commands = list(_documented_commands())
    for where, command, words in commands:
        errors = io.StringIO()
        try:
            with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
                exact_flags(build_parser()).parse_args(words)
        except SystemExit as ended:
            if ended.code:
                refused.append(f"{where}: {command}\n    {errors.getvalue().strip().splitlines()[-1]}")
    assert not refused, "\n".join(refused)
    assert len(commands) >= 50  # the README's workflows and the guides' recipes


# The accuracy tables of README.md and docs/results.md whose first column is the backbone, in page order, and
# the committed JSON each one quotes (a new table fails the count below until it is named here).
ACCURACY_TABLES = {
    "README.md": ["results/llactr_ml100k.json", "results/llactr_synthetic.json",
                  "results/elec_all_seeds/first_seed_pick/elec_ml100k.json", "results/elec_synthetic.json"],
    "docs/results.md": ["results/ml100k_backbones.json", "results/llactr_ml100k.json",
                        "results/llactr_ml100k_random_vectors.json",
                        "results/llactr_ml100k_reduced_ssft/llactr_ml100k.json",
                        "results/elec_all_seeds/first_seed_pick/elec_ml100k.json",
                        "results/elec_user_item/elec_ml100k.json", "results/llactr_synthetic.json",
                        "results/elec_synthetic.json"],
}
# column header -> the variant's key in the JSON's table
ACCURACY_COLUMNS = {"gain network": "gain", "swapped pairs": "student (frozen, swapped pairs)",
                    "student (swapped pairs)": "student (frozen, swapped pairs)",
                    "catalogue pairs": "student (frozen, catalogue pairs)",
                    "student (catalogue pairs)": "student (frozen, catalogue pairs)"}


def test_the_accuracy_tables_quote_the_committed_result_jsons() -> None:
    """Every cell of the accuracy tables (mean ± std, relative gain and its sign, LogLoss, cold-item AUC and its
    gain; the backbone table's AUC and LogLoss with their std) is its JSON's value, rounded as quoted."""
    import json

    cell = re.compile(r"(?P<auc>\d\.\d+) ± (?P<std>\d\.\d+)(?: \((?P<gain>[+-]\d+\.\d+)%\))? / (?P<logloss>\d\.\d+)"
                      r"(?:; cold (?P<cold>\d\.\d+)(?: \((?P<cold_gain>[+-]\d+\.\d+)%\))?)?")

    def same(quoted: str, value: float, where: str) -> None:
        decimals = len(quoted.split(".")[1])
        rounded = round(value, decimals)
        assert float(quoted) == rounded and ((value < 0) == quoted.startswith("-") or rounded == 0), (
            f"{where}: quotes {quoted}, the JSON has {value!r}")

    checked = 0
    for page, sources in ACCURACY_TABLES.items():
        lines = _read(*page.split("/")).splitlines()
        tables = [i for i, line in enumerate(lines) if line.startswith("| backbone |")]
        assert len(tables) == len(sources), (page, [i + 1 for i in tables])
        for start, source in zip(tables, sources):
            with open(os.path.join(REPO, source), encoding="utf-8") as handle:
                table = json.load(handle)["table"]
            header = [c.strip() for c in lines[start].strip("|").split("|")]
            for number, line in enumerate(lines[start + 2:], start + 3):
                if not line.startswith("|"):
                    break
                cells = [c.strip() for c in line.strip("|").split("|")]
                backbone = cells[0]
                for column, text in zip(header[1:], cells[1:]):
                    where = f"{page}:{number} {backbone} / {column} vs {source}"
                    if header[1:] == ["auc", "logloss"]:  # the backbone table: mean ± std of each metric
                        mean, std = text.split(" ± ")
                        same(mean, table[backbone][column]["mean"], where)
                        same(std, table[backbone][column]["std"], where)
                        checked += 1
                        continue
                    row, plain = table[backbone][ACCURACY_COLUMNS.get(column, column)], table[backbone]["plain"]
                    found = cell.fullmatch(text)
                    assert found, f"{where}: unparsed cell {text!r}"
                    same(found["auc"], row["auc"]["mean"], where)
                    same(found["std"], row["auc"]["std"], where)
                    same(found["logloss"], row["logloss"]["mean"], where)
                    if found["gain"] is not None:
                        same(found["gain"], 100 * (row["auc"]["mean"] / plain["auc"]["mean"] - 1), where)
                    if found["cold"] is not None:
                        same(found["cold"], row["cold/auc"]["mean"], where)
                    if found["cold_gain"] is not None:
                        same(found["cold_gain"], 100 * (row["cold/auc"]["mean"] / plain["cold/auc"]["mean"] - 1),
                             where)
                    checked += 1
    assert checked >= 200, checked


def test_every_experiment_command_of_the_docs_parses(monkeypatch) -> None:
    """The tables' commands (`python -m experiments.<name> ...` in the README, the guides and the experiments'
    docstrings) are accepted by their script's options: test_every_command_line_of_the_guides_parses reads only
    `recsys-llm` lines of code blocks, and these are inline in the prose."""
    import argparse
    import contextlib
    import glob
    import io
    import shlex

    class Parsed(Exception):
        pass

    parse_args = argparse.ArgumentParser.parse_args

    def parse_only(parser, args=None, namespace=None):
        parser.allow_abbrev = False  # the docs spell each flag out
        raise Parsed(parse_args(parser, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    pages = ["README.md", "docs/results.md", "docs/usage.md", "docs/design.md", "benchmarks/README.md"] + sorted(
        os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "experiments", "*.py")))
    refused, checked = [], 0
    for page in pages:
        text = " ".join(_read(*page.split("/")).split())
        for found in re.finditer(r"`python -m experiments\.(\w+)((?: [^`\"\[\]]*)?)`", text):
            words = shlex.split(found.group(2))
            if "..." in words or any(w.isupper() for w in words):  # a template (`... --out DIR`), not a command
                continue
            module = importlib.import_module(f"experiments.{found.group(1)}")
            errors = io.StringIO()
            monkeypatch.setattr("sys.argv", [found.group(1)] + words)
            try:
                with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
                    module.main(words) if module.main.__code__.co_argcount else module.main()
                refused.append(f"{page}: {found.group(0)} ran without parsing its options")
            except Parsed:
                checked += 1
            except SystemExit:
                refused.append(f"{page}: {found.group(0)}\n    {errors.getvalue().strip().splitlines()[-1:]}")
    assert not refused, "\n".join(refused)
    assert checked >= 20, checked


def test_the_design_states_the_ctr_llm_optimiser_defaults() -> None:
    """docs/design.md (ELEC item 7) names the CTR-adapted LLM's optimiser settings, which the ELEC paper leaves
    open: they must be those that ``tune_ctr_llm`` uses (CTRLLMConfig's defaults, AdamW's own weight decay)."""
    import inspect

    import torch

    from recsys_llm.semantics import ctr_llm
    from recsys_llm.semantics.ctr_llm import CTRLLMConfig

    design = _read("docs", "design.md")
    config = CTRLLMConfig(model_path="unused")
    assert (config.learning_rate, config.head_learning_rate) == (1e-4, 1e-3)
    assert (config.batch_size, config.epochs) == (16, 1)
    assert "1e-4 for the LLM's tuned" in design and "1e-3 for the transformation MLP" in design
    assert "16 rows a step, 1 epoch" in design
    # the weight decay is AdamW's default: tune_ctr_llm passes none
    assert torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]).defaults["weight_decay"] == 0.01
    assert "weight_decay" not in inspect.getsource(ctr_llm.tune_ctr_llm)
    assert "default weight decay of 0.01 on both groups" in design
