r"""Every Python file of the project compiles without a warning: an invalid escape sequence (``"\ "`` in a
docstring) is a DeprecationWarning on Python 3.10-3.11, which pytest.ini hides, but a SyntaxWarning that a
3.12+ user sees each time the file runs from source (``python examples/daily_training.py``)."""

import subprocess
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_the_projects_python_files_compile_without_warnings() -> None:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"],
                            cwd=REPO_ROOT, capture_output=True, text=True)
    files = ([REPO_ROOT / name for name in listed.stdout.split()] if listed.returncode == 0
             else [path for path in REPO_ROOT.rglob("*.py") if ".venv" not in path.parts])
    assert files
    bad = []
    for path in files:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            try:
                compile(path.read_text(encoding="utf-8"), str(path), "exec")
            except (SyntaxError, Warning) as error:
                bad.append(f"{path.relative_to(REPO_ROOT)}: {error}")
    assert not bad, "\n".join(bad)


def test_no_module_asks_pyarrow_for_a_pandas_dtype() -> None:
    """``DataType.to_pandas_dtype`` imports pandas on pyarrow < 26 (Python 3.10's newest is 25), which the project
    does not install: multi-rank ``score``, ``semantics export`` and ``teacher-outputs`` failed there with
    ``No module named 'pandas'``; ``recsys_llm.data.parquet_writer.numpy_dtype`` needs no pandas."""
    calls = [f"{path.relative_to(REPO_ROOT)}:{number}" for path in (REPO_ROOT / "recsys_llm").rglob("*.py")
             for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if ".to_pandas_dtype(" in line]
    assert not calls, calls


def test_numpy_dtype_of_the_arrow_types_the_project_writes() -> None:
    import numpy as np
    import pyarrow as pa

    from recsys_llm.data.parquet_writer import numpy_dtype

    for arrow, numpy in ((pa.float16(), np.float16), (pa.float32(), np.float32), (pa.float64(), np.float64),
                         (pa.int8(), np.int8), (pa.int32(), np.int32), (pa.int64(), np.int64)):
        assert numpy_dtype(arrow) == np.dtype(numpy)
