"""A dense program captured under CPU bfloat16 autocast (``export_task(..., mixed_precision="bf16")``,
``recsys-llm export --mixed-precision bf16``)."""

import json
import os

import pytest
import torch

from recsys_llm.models.registry import SMOKE_CONFIGS
from recsys_llm.modules.elec import build_student
from recsys_llm.serving import ServedModel, export_task
from recsys_llm.typed_config import ConfigError
from tests.small_artifact import write_config_as_exported
from tests.test_serving import CPU, SCHEMA, _trained_pair, make_batch
from tests.test_serving_quantized import _gain_network

# served bf16-program logits vs the float32 program's, on these tests' small models (logits up to about 2): bfloat16
# keeps 8 bits of mantissa, so each matmul's inputs are rounded by up to 2^-9 of their size
LOGIT_TOLERANCE = 0.05


def _student(model_name: str):
    task = _trained_pair(model_name)
    student = build_student(SCHEMA, SMOKE_CONFIGS[model_name], device=CPU)
    student.load_state_dict(task.student.state_dict())
    return student.eval()


def _served_both_ways(task, example, directory) -> dict:
    served = {}
    for precision in ("fp32", "bf16"):
        config = export_task(task, os.path.join(directory, precision), example.dense_features, example.sparse_features,
                             mixed_precision=precision)
        assert config["dense_program"] == "dense_program.pt2" and config["mixed_precision"] == precision
        notes = open(os.path.join(directory, precision, "INFERENCE.md"), encoding="utf-8").read()
        assert ("--mixed-precision bf16" in notes) == (precision == "bf16")
        served[precision] = ServedModel.load(os.path.join(directory, precision), trust_program=True)
    return served


@pytest.mark.parametrize("model_name", ["deepfm", "dcnv2", "dlrm", "finalmlp"])
def test_a_bf16_program_serves_the_float32_programs_logits_within_bf16_rounding(tmp_path, model_name):
    task = _student(model_name)
    served = _served_both_ways(task, make_batch(4, 100), str(tmp_path))
    request = make_batch(33, 7)
    logits = {name: model.logits(request.dense_features, request.sparse_features) for name, model in served.items()}
    assert logits["bf16"].dtype == torch.float32 and served["bf16"].mixed_precision == "bf16"
    assert not torch.equal(logits["bf16"], logits["fp32"])  # the autocast region is in the program
    torch.testing.assert_close(logits["bf16"], logits["fp32"], rtol=0, atol=LOGIT_TOLERANCE)
    with torch.no_grad():  # the float32 program is the trained model's
        torch.testing.assert_close(logits["fp32"], task.predict(request).logits, rtol=0, atol=1e-6)


def test_a_gain_network_on_entity_tables_and_int8_tables_serve_under_bf16(tmp_path):
    task, example, request = _gain_network()
    served = _served_both_ways(task, example, str(tmp_path))
    logits = {name: model.logits(request.dense_features, request.sparse_features) for name, model in served.items()}
    assert not torch.equal(logits["bf16"], logits["fp32"])
    torch.testing.assert_close(logits["bf16"], logits["fp32"], rtol=0, atol=LOGIT_TOLERANCE)
    export_task(task, str(tmp_path / "int8"), example.dense_features, example.sparse_features, table_dtype="int8",
                mixed_precision="bf16")
    both = ServedModel.load(str(tmp_path / "int8"), trust_program=True)
    assert both.mixed_precision == "bf16"
    torch.testing.assert_close(both.logits(request.dense_features, request.sparse_features), logits["fp32"], rtol=0,
                               atol=LOGIT_TOLERANCE + 0.02)


def test_a_bf16_program_stays_on_cpu_in_float32(tmp_path):
    served = _served_both_ways(_student("deepfm"), make_batch(4, 100), str(tmp_path))
    # "cuda": refused on a GPU host, and on a torch without CUDA too (its own error was an AssertionError)
    for move in (lambda model: model.to("meta"), lambda model: model.half(), lambda model: model.double(),
                 lambda model: model.to("cuda")):
        with pytest.raises(ValueError, match=r"its dense program runs under CPU autocast \(mixed_precision 'bf16'\), "
                                             r"so it serves on CPU in float32; .*export with `--mixed-precision fp32`"):
            move(served["bf16"])
    served["fp32"].double()  # a float32 program moves as before


def test_a_bad_mixed_precision_is_named_before_anything_is_written(tmp_path):
    from recsys_llm.cli.export import export_run

    student = build_student(SCHEMA, SMOKE_CONFIGS["deepfm"], device=CPU).eval()
    example = make_batch(4, 100)
    for bad in ("fp16", "BF16", None):
        with pytest.raises(ConfigError, match=r"export: mixed_precision=.* \(must be one of fp32, bf16\)"):
            export_task(student, str(tmp_path / "out"), example.dense_features, example.sparse_features,
                        mixed_precision=bad)
    assert not os.path.exists(tmp_path / "out")
    # the CLI refuses it before it opens the run (no config, no checkpoint needed to get there)
    with pytest.raises(ConfigError, match=r"export: --mixed-precision='fp16'"):
        export_run(None, str(tmp_path / "no-run"), str(tmp_path / "out"), mixed_precision="fp16")
    with pytest.raises(ValueError, match=r"--mixed-precision bf16 applies to a served export; --state-only"):
        export_run(None, str(tmp_path / "no-run"), str(tmp_path / "out"), state_only=True, mixed_precision="bf16")


def test_an_artifact_of_before_records_float32(tmp_path):
    """Artifacts exported before ``mixed_precision`` was recorded serve their float32 program."""
    export_task(_student("deepfm"), str(tmp_path / "a"), make_batch(4, 100).dense_features,
                make_batch(4, 100).sparse_features)
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    del config["mixed_precision"]
    config.pop("sha256")
    write_config_as_exported(str(tmp_path / "a" / "config.json"), config)
    assert ServedModel.load(str(tmp_path / "a"), trust_program=True).mixed_precision == "fp32"


@pytest.mark.parametrize("model_name", ["fm", "deepfm", "dcnv2"])
def test_an_llactr_task_serves_its_fie_term_under_bf16(tmp_path, model_name):
    """FIE folded into FM / DeepFM's own pairwise term, or a term of its own (DCNv2): both captured under autocast."""
    from tests.test_serving import _llactr_task

    task = _llactr_task(model_name)
    served = _served_both_ways(task, make_batch(4, 100), str(tmp_path))
    request = make_batch(33, 8)
    logits = {name: model.logits(request.dense_features, request.sparse_features) for name, model in served.items()}
    torch.testing.assert_close(logits["bf16"], logits["fp32"], rtol=0, atol=LOGIT_TOLERANCE)
    with torch.no_grad():
        torch.testing.assert_close(logits["fp32"], task.predict(request).logits)


def test_the_bf16_program_autocasts_to_bfloat16(tmp_path):
    """The program's autocast region is bfloat16's (float16 autocast also stays within the logit tolerance)."""
    served = _served_both_ways(_student("deepfm"), make_batch(4, 100), str(tmp_path))
    graphs = {name: "\n".join(str(node.args) for node in model.dense_program.graph.nodes)
              for name, model in served.items()}
    assert "torch.bfloat16" in graphs["bf16"] and "torch.float16" not in graphs["bf16"], graphs["bf16"]
    assert "torch.bfloat16" not in graphs["fp32"]


def test_autocast_around_a_float32_artifact_gives_the_bf16_programs_logits(tmp_path):
    """What a GPU server does with a float32 artifact (the bf16 program stays on CPU): autocast at request time
    computes what the bf16 program captured."""
    served = _served_both_ways(_student("dcnv2"), make_batch(4, 100), str(tmp_path))
    request = make_batch(33, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        at_request = served["fp32"].logits(request.dense_features, request.sparse_features)
    assert torch.equal(at_request.float(), served["bf16"].logits(request.dense_features, request.sparse_features))


def test_a_full_rank_dcnv2_program_runs_its_cross_layers_as_gemms_outside_autograd(tmp_path):
    """The packaged DCNv2 (``model.low_rank`` 0, torchrec's full-rank CrossNet) served under ``no_grad``: torch's
    matmul of the (K, K) kernel with (B, K, 1) columns ran in the program as a ``bmm`` over the kernel expanded to
    (B, K, K), in bfloat16 ~30x slower than the float32 program at batch 4096."""
    import dataclasses

    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    task = build_student(SCHEMA, dataclasses.replace(SMOKE_CONFIGS["dcnv2"], low_rank=0), device=CPU).eval()
    served = _served_both_ways(task, make_batch(4, 100), str(tmp_path))
    request = make_batch(33, 7)
    for model in served.values():
        with torch.no_grad(), Ops() as ops:
            model.logits(request.dense_features, request.sparse_features)
        assert "aten.bmm.default" not in ops.names, ops.names
    logits = {name: model.logits(request.dense_features, request.sparse_features) for name, model in served.items()}
    torch.testing.assert_close(logits["bf16"], logits["fp32"], rtol=0, atol=LOGIT_TOLERANCE)
