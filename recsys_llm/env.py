"""Start-up checks of the environment: that torch, fbgemm-gpu and torchrec match each other, and torchrun's
integer variables (:func:`env_int`).

A mismatch shows up as an undefined-symbol ``ImportError`` deep inside fbgemm; this
module turns it into a message that names the installed versions and the fix.
"""

import os
import platform
import subprocess
import sys
from importlib import metadata
from typing import Any, Dict, Sequence

# torchrec release -> (fbgemm-gpu release, torch minor versions known to work with it): the whole
# test suite passed on each, with the CPU build (fbgemm-gpu-cpu). 1.8.0 is what scripts/install.sh installs.
KNOWN_GOOD: Dict[str, tuple] = {
    "1.8.0": ("1.8.0", ("2.13",)),
    "1.9.2": ("1.9.0", ("2.14",)),
}
# the same for CUDA builds (fbgemm-gpu) that ran on a GPU: the demo and tests/train/test_cuda.py on an
# H200 (docs/results.md, "On a GPU"), not the whole suite
RAN_ON_A_GPU: Dict[str, tuple] = {
    "1.6.1": ("1.6.0", ("2.11",)),
}


def env_int(name: str, default: int, minimum: int) -> int:
    """The integer in environment variable ``name`` (``default`` when unset), read without torch.

    Raises:
        ValueError: set but not an integer of at least ``minimum``, naming the variable.
    """
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise ValueError(f"environment variable {name}={raw!r}: expected an integer >= {minimum} (torchrun sets "
                         "RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE for each process; unset them to run as "
                         "one process)")
    return value


def known_good_text() -> str:
    """The combinations of ``KNOWN_GOOD`` as one phrase, e.g. ``torch 2.13 + fbgemm-gpu 1.8.0 + torchrec 1.8.0``."""
    return "; ".join(
        f"torch {' or '.join(torch_minors)} + fbgemm-gpu {fbgemm} + torchrec {torchrec}"
        for torchrec, (fbgemm, torch_minors) in KNOWN_GOOD.items()
    )


def installed_versions() -> Dict[str, str]:
    """Returns the installed versions of torch, fbgemm-gpu(-cpu) and torchrec ('' if absent)."""
    versions = {}
    for name in ("torch", "fbgemm-gpu", "fbgemm-gpu-cpu", "torchrec"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = ""
    return versions


def machine_description() -> Dict[str, Any]:
    """The machine a result is computed on (float results differ between CPUs): its platform, Python, CPU model,
    CPU count and the cores this process may use."""
    try:
        usable_cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        usable_cores = os.cpu_count() or 1
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu_model": _cpu_model(),
            "cpu_count": os.cpu_count(), "usable_cores": usable_cores}


def _cpu_model() -> str:
    """``model name`` of /proc/cpuinfo, else what :mod:`platform` names."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def release(version: str) -> str:
    """``version`` without its local part: ``1.8.0`` of ``1.8.0+cu128`` (PyTorch's CUDA index)."""
    return version.split("+")[0]


def check_versions(verbose: bool = False) -> Dict[str, str]:
    """Imports fbgemm and torchrec and raises a clear ``RuntimeError`` when they do not match torch.

    Returns:
        Dict[str, str]: the installed versions.
    """
    versions = installed_versions()
    fbgemm = versions["fbgemm-gpu"] or versions["fbgemm-gpu-cpu"]
    summary = f"torch {versions['torch']}, fbgemm-gpu {fbgemm or 'missing'}, torchrec {versions['torchrec'] or 'missing'}"
    try:
        import fbgemm_gpu  # noqa: F401
        import torchrec  # noqa: F401
    except (ImportError, OSError) as error:
        cause = error.__cause__ or error
        raise RuntimeError(
            f"torch/fbgemm-gpu/torchrec do not import together ({summary}): {cause}. "
            f"fbgemm-gpu is built for one torch release; known to work: {known_good_text()} "
            "(fbgemm-gpu-cpu on a machine without CUDA). Install a matching set, or run "
            "scripts/install.sh, which creates .venv with the first one."
        ) from error
    if verbose:
        print(f"[recsys_llm] {summary} ({_verified_status(versions, fbgemm)})")
    return versions


def _listed(table: Dict[str, tuple], versions: Dict[str, str], fbgemm: str) -> bool:
    """Whether torch, ``fbgemm`` and torchrec, by release, are a set of ``table``."""
    known = table.get(release(versions["torchrec"]))
    torch_minor = ".".join(release(versions["torch"]).split(".")[:2])
    return bool(known) and release(fbgemm) == known[0] and torch_minor in known[1]


def _verified_status(versions: Dict[str, str], fbgemm: str) -> str:
    """What is known of the installed set: ``known good``, or how far it was checked (a CUDA build,
    ``fbgemm-gpu``, is not known good because the CPU build of its versions passed the suite)."""
    if not versions["fbgemm-gpu"]:  # the CPU build
        return "known good" if _listed(KNOWN_GOOD, versions, fbgemm) else f"not verified; known to work: {known_good_text()}"
    if _listed(RAN_ON_A_GPU, versions, fbgemm):
        return "CUDA build: ran the demo and tests/train/test_cuda.py on a GPU, not the whole suite"
    if _listed(KNOWN_GOOD, versions, fbgemm):
        return "CUDA build, not verified on a GPU: the whole suite passed with the CPU build of these versions"
    return f"CUDA build, not verified; the CPU builds known to work: {known_good_text()}"


def source_commit(ignore: Sequence[str] = ()) -> str:
    """Short git commit of the checkout this package runs from, with ``+dirty`` when tracked
    files differ from it (paths in ``ignore``, relative to the repository root, do not count);
    ``""`` where git does not track this package's files: outside a git checkout, or installed
    inside another project's repository (its venv), whose commit says nothing of this code (a
    checkout of this project inside a larger repository is tracked there: its commit is given).
    Recorded next to results so they can be traced to code."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10)
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", "--", os.path.abspath(__file__)], cwd=root,
                                 capture_output=True, text=True, timeout=10)
        if head.returncode != 0 or tracked.returncode != 0:
            return ""
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *(f":(exclude){p}" for p in ignore)],
            cwd=root, capture_output=True, text=True, timeout=10,
        )
        return head.stdout.strip() + ("+dirty" if status.returncode == 0 and status.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def job_provenance() -> Dict[str, Any]:
    """What a training job ran: ``versions`` (recsys_llm's version and source commit, Python's, torch's,
    torchrec's and fbgemm_gpu's) and ``command`` (the process's command line, overrides included), kept
    in the ``started`` / ``resumed`` records of ``metrics.jsonl`` so a run's results can be traced to the
    code and libraries that trained each part of it."""
    from recsys_llm import __version__

    installed = installed_versions()
    versions = {"recsys_llm": __version__, "recsys_llm_commit": source_commit(), "python": platform.python_version(),
                "torch": installed["torch"], "torchrec": installed["torchrec"],
                "fbgemm_gpu": installed["fbgemm-gpu"] or installed["fbgemm-gpu-cpu"]}
    return {"versions": versions, "command": list(sys.argv)}
