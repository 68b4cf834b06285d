"""Fingerprints of a model directory."""

import os



def test_a_remote_code_models_python_files_are_part_of_its_fingerprint(tmp_path, tiny_bert_dir) -> None:
    """Its modeling code changes its vectors as much as its weights do: a cache must not outlive it."""
    import shutil

    from recsys_llm.semantics.model_dir import model_dir_fingerprint

    model = str(tmp_path / "remote")
    shutil.copytree(tiny_bert_dir, model)
    with open(os.path.join(model, "modeling_x.py"), "w") as handle:
        handle.write("SCALE = 1.0\n")
    before = model_dir_fingerprint(model)
    with open(os.path.join(model, "modeling_x.py"), "w") as handle:
        handle.write("SCALE = 3.0\n")
    assert model_dir_fingerprint(model) != before
