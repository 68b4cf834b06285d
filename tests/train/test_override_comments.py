"""``section.key=value`` overrides whose value holds a ``#``: YAML reads ``' #...'`` as a comment."""

import shlex

import pytest

from recsys_llm.cli.export import override_text
from recsys_llm.train.config import apply_overrides
from recsys_llm.typed_config import ConfigError


@pytest.mark.parametrize("override, dropped", [("train.run_dir=/tmp/runs/r #1 é", "#1 é"),
                                               ("train.run_dir=#run", "#run"),
                                               ("data.extras=[a, b] # c", "# c")])
def test_a_value_yaml_would_cut_at_a_comment_is_refused_naming_what_it_drops(override: str, dropped: str) -> None:
    """train.run_dir=/tmp/runs/r #1 trained into /tmp/runs/r, silently."""
    with pytest.raises(ConfigError, match=f"YAML reads '{dropped}' as a comment and drops it; quote the value"):
        apply_overrides({}, [override])


@pytest.mark.parametrize("override, value", [("train.run_dir='/tmp/runs/r #1'", "/tmp/runs/r #1"),
                                             ('train.run_dir="/tmp/runs/r #1"', "/tmp/runs/r #1"),
                                             ("train.run_dir=/tmp/runs/r#1", "/tmp/runs/r#1"),
                                             ("train.run_dir=/tmp/a=b/run", "/tmp/a=b/run"),
                                             ('data.extras=["#a", b]', ["#a", "b"])])
def test_a_hash_inside_a_token_or_quotes_is_part_of_the_value(override: str, value: object) -> None:
    section, key = override.split("=", 1)[0].split(".")
    assert apply_overrides({}, [override])[section][key] == value


@pytest.mark.parametrize("path", ["data/t/schema.json", "data/teach 日本 #/schema.json", "it's #1/schema.json",
                                  "yes"])
def test_the_offline_student_hint_reads_back_as_the_path_it_names(path: str) -> None:
    """teacher-outputs printed `data.schema=data/teach 日本 #/schema.json` unquoted: pasted into a shell, it was
    split at the space, and YAML cut it at the '#'."""
    words = shlex.split(override_text("data.schema", path))
    assert len(words) == 1 and apply_overrides({}, words)["data"]["schema"] == path
