"""``experiments.ml100k_backbones``: its command line."""

import pytest

from experiments.ml100k_backbones import main


def test_another_data_set_is_refused_not_replaced_by_ml100k(tmp_path, capsys) -> None:
    """``--data synthetic`` used to be accepted and ignored: the table trained on ML-100K."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--data", "synthetic", "--data-dir", str(tmp_path / "data"), "--raw", str(tmp_path / "raw"),
              "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "--data synthetic: this table trains on ML-100K only" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()
