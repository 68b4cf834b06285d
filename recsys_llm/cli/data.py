"""``recsys-llm prepare {synthetic|movielens|criteo|tabular}``: raw data -> Parquet splits + schema.

Examples::

    recsys-llm prepare synthetic --out data/synthetic --rows 1000000
    recsys-llm prepare movielens --input ../shared/data/ml-100k --out data/ml-100k
    recsys-llm prepare criteo --input train.txt --out data/criteo --hash-size 1000000
    recsys-llm prepare tabular --input clicks.csv --schema clicks.yaml --out data/clicks --split-by ts
    recsys-llm prepare tabular --input day2.csv --like data/clicks --out data/clicks-day2
    recsys-llm prepare tabular --input day2.csv --like data/clicks --schema clicks2.yaml --out data/clicks-day2
"""

import argparse
import math
from typing import Callable, Optional, Tuple, Union

from recsys_llm.cli.semantics import show_defaults
from recsys_llm.data.criteo import NUM_SPARSE, CriteoConfig
from recsys_llm.data.movielens import MovieLensConfig
from recsys_llm.data.prepare import prepare_dataset
from recsys_llm.data.synthetic import SyntheticConfig
from recsys_llm.data.tabular import TabularConfig
from recsys_llm.data.validation import check_split_fractions


def _one_input(joined: str) -> type:
    """An argparse action for ``--input`` that refuses a second one (argparse keeps the last, and the
    data of the first was silently left out); ``joined`` says how to give several files at once."""

    class OneInput(argparse.Action):
        def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, value: object,
                     option: Optional[str] = None) -> None:
            earlier = getattr(namespace, self.dest, None)
            if earlier is not None:
                parser.error(f"{option} given twice ({earlier}, {value}); this converter reads one input: {joined}")
            setattr(namespace, self.dest, value)

    return OneInput


def _fractions(text: str) -> tuple:
    """``--split`` value: three positive train,valid,test shares (checked before any work)."""
    try:
        parts = tuple(float(p) for p in text.split(","))
        check_split_fractions(parts, "--split")
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected three positive shares like 0.8,0.1,0.1 (a zero share leaves a split without rows), got {text!r}"
        ) from None
    return parts


def _hash_sizes(text: str) -> Union[int, Tuple[int, ...]]:
    """``--hash-size`` value: one table size, or one per categorical field (each >= 2: id 0 is for missing values)."""
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) not in (1, NUM_SPARSE) or min(sizes) < 2:
        raise argparse.ArgumentTypeError(
            f"expected an integer >= 2, or {NUM_SPARSE} of them separated by commas (C1..C{NUM_SPARSE}), got {text!r}"
        )
    return sizes[0] if len(sizes) == 1 else sizes


def _delimiter(text: str) -> str:
    """``--delimiter`` value: one character; ``\\t`` (what typing ``'\\t'`` in a shell passes) or ``tab`` is a tab."""
    if text in ("\\t", "tab"):
        return "\t"
    if len(text) != 1:
        raise argparse.ArgumentTypeError(f"expected one character, or \\t or tab for a tab, got {text!r}")
    return text


def _sequence_separator(text: str) -> str:
    """``--sequence-separator`` value: a non-empty string (an empty one would split no cell)."""
    if not text:
        raise argparse.ArgumentTypeError(f"expected a non-empty separator of sequence tokens, e.g. '|', got {text!r}")
    return text


def integer_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``minimum`` (checked before any work, naming the flag)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def _number(minimum: Optional[float] = None, below: Optional[float] = None,
            above: Optional[float] = None) -> Callable[[str], float]:
    """An argparse ``type``: a finite number in ``[minimum, below)`` and ``> above`` (bounds that are None unchecked)."""
    bounds = " and ".join(([f">= {minimum:g}"] if minimum is not None else []) + ([f"> {above:g}"] if above is not None else [])
                          + ([f"< {below:g}"] if below is not None else []))
    expected = f"a finite number{' ' + bounds if bounds else ''}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if (not math.isfinite(value) or (minimum is not None and value < minimum)
                or (above is not None and value <= above) or (below is not None and value >= below)):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    parse.__name__ = expected
    return parse


def number_above(bound: float) -> Callable[[str], float]:
    """An argparse ``type``: a finite number > ``bound`` (checked before any work, naming the flag)."""
    return _number(above=bound)


def _config(args: argparse.Namespace):
    if args.source == "synthetic":
        return SyntheticConfig(num_rows=args.rows, seed=args.seed, num_users=args.users, num_items=args.items,
                               rows_per_group=args.rows_per_group, cold_item_fraction=args.cold_item_fraction)
    if args.source == "movielens":
        return MovieLensConfig(split_fractions=args.split, zip_prefix_length=args.zip_prefix_length,
                               rows_per_group=args.rows_per_group, history_length=args.history_length)
    if args.source == "criteo":
        return CriteoConfig(hash_size=args.hash_size, delimiter=args.delimiter, split_fractions=args.split,
                            rows_per_group=args.rows_per_group, max_rows=args.max_rows)
    defaults = TabularConfig()
    return TabularConfig(split_by=args.split_by, split_fractions=args.split or defaults.split_fractions,
                         seed=defaults.seed if args.seed is None else args.seed,
                         label_threshold=args.label_threshold, fill_missing_dense=args.fill_missing_dense,
                         sequence_separator=args.sequence_separator, delimiter=args.delimiter,
                         rows_per_group=args.rows_per_group, missing_tokens=("",) + tuple(args.missing_token),
                         vocabulary_fields=tuple(args.vocabulary or ()), hash_fields=tuple(args.hash or ()))


#: ``prepare tabular`` options that the earlier preparation decides, refused with ``--like``
_LIKE_REFUSED = {"split": "--split", "split_by": "--split-by", "seed": "--seed",
                 "vocabulary": "--vocabulary", "hash": "--hash"}
#: of :data:`_LIKE_REFUSED`, those ``--like`` takes with a ``--schema`` that adds fields, for the new fields alone
_NEW_FIELD_OPTIONS = ("vocabulary", "hash")


def _check_like_options(args: argparse.Namespace) -> None:
    """Raises ValueError for the ``prepare tabular`` options the earlier preparation decided (:data:`_LIKE_REFUSED`)
    given with ``--like``, even at their default values; with ``--schema`` (new fields), ``--vocabulary`` and
    ``--hash`` are the new fields' (``prepare_dataset`` refuses the other misfits: a missing schema,
    ``--split-name`` without ``--like``, those options naming an earlier field)."""
    if args.like is None:
        return
    refused = {name: flag for name, flag in _LIKE_REFUSED.items()
               if not (args.schema and name in _NEW_FIELD_OPTIONS)}
    given = [flag for name, flag in refused.items() if getattr(args, name) not in (None, [])]
    if given:
        options = ", ".join(refused.values())
        raise ValueError(f"prepare tabular --like {args.like}: {', '.join(given)} decided by the earlier preparation "
                         f"(its splits and ids, which the new rows keep); expected them left out ({options} "
                         "with --like)")


def _prepare(args: argparse.Namespace) -> int:
    from recsys_llm.cli.semantics import refuse_several_ranks

    # under torchrun every rank prepared the whole data set into the same --out: one won its lock, the
    # others failed as "another prepared data set is writing it", and torchrun then stopped the winner
    refuse_several_ranks(f"prepare {args.source}", instead="once, before the jobs that read the data on every "
                         "rank; `train` generates data.synthetic_rows on rank 0 alone")
    like = {}
    if args.source == "tabular":
        _check_like_options(args)
        like = {"like_dir": args.like, "split_name": args.split_name, "grow_vocabulary": args.grow_vocabulary}
    report = prepare_dataset(args.source, args.out, getattr(args, "input", None), getattr(args, "schema", None),
                             _config(args), progress=not args.quiet, **like)
    print(report.summary())
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``prepare`` with one sub-command per source."""
    prepare = subparsers.add_parser("prepare", help="raw data -> Parquet row groups + schema.json")
    sources = prepare.add_subparsers(dest="source", required=True)

    def common(parser: argparse.ArgumentParser, rows_per_group: int) -> None:
        parser.add_argument("--out", required=True, help="output directory")
        parser.add_argument("--rows-per-group", type=integer_at_least(1), default=rows_per_group, help="Parquet row group size")
        parser.add_argument("--quiet", action="store_true", help="no progress bars")
        parser.set_defaults(func=_prepare)

    synthetic = sources.add_parser("synthetic", help="generate the embedded synthetic data set (text-driven clicks)")
    common(synthetic, 65536)
    synthetic.add_argument("--rows", type=integer_at_least(10), default=200_000, help="impressions over all splits (at least 10)")
    synthetic.add_argument("--seed", type=integer_at_least(0), default=0,
                           help="seed of users, items and impressions: the same seed writes the same data")
    synthetic.add_argument("--users", type=integer_at_least(1), default=None, help="number of users (default from --rows)")
    synthetic.add_argument("--items", type=integer_at_least(1), default=None, help="number of items (default from --rows)")
    synthetic.add_argument("--cold-item-fraction", type=_number(0.0, 1.0), default=0.1,
                           help="share of items seen only in valid/test, in [0, 1)")

    movielens = sources.add_parser("movielens", help="MovieLens in RecBole atomic format (.inter/.item/.user)")
    common(movielens, 8192)
    movielens.add_argument("--input", required=True, action=_one_input("the directory of the RecBole atomic files"),
                           help="directory with the RecBole atomic files")
    movielens.add_argument("--split", type=_fractions, default=(0.8, 0.1, 0.1),
                           help="time-ordered train,valid,test shares, divided by their sum, 8,1,1 as 0.8,0.1,0.1 "
                                "(default: 0.8,0.1,0.1)")
    movielens.add_argument("--zip-prefix-length", type=integer_at_least(1), default=2, help="zip code characters kept")
    movielens.add_argument("--history-length", type=integer_at_least(0), default=0,
                           help="N > 0: a sequence field 'history' of the last N movies the user rated above 3 "
                                "before each rating, most recent first (0: none)")

    criteo = sources.add_parser("criteo", help="Criteo TSV/CSV (label, I1..I13, C1..C26)")
    common(criteo, 65536)
    criteo.add_argument("--input", required=True,
                        action=_one_input("join the day files first (cat day_0 day_1 > days.tsv; --split takes "
                                          "shares in file order)"),
                        help="the raw Criteo file; .gz, .bz2, .zst, .lz4 are decompressed as read (e.g. day_0.gz)")
    criteo.add_argument("--hash-size", type=_hash_sizes, default=1_000_000,
                        help="rows per categorical table: one size, or 26 comma-separated sizes for C1..C26")
    criteo.add_argument("--delimiter", type=_delimiter, default=None,
                        help="column separator (default: ',' for .csv or .csv.gz, else tab; \\t or tab: a tab)")
    criteo.add_argument("--split", type=_fractions, default=(0.8, 0.1, 0.1),
                        help="train,valid,test shares in file order, divided by their sum, 8,1,1 as 0.8,0.1,0.1 "
                             "(default: 0.8,0.1,0.1)")
    criteo.add_argument("--max-rows", type=integer_at_least(1), default=None,
                        help="convert only the first rows; the rest of the file is not read (default: every row)")

    tabular = sources.add_parser("tabular", help="your CSV/Parquet + a JSON/YAML schema file")
    common(tabular, 65536)
    tabular.add_argument("--input", required=True,
                         action=_one_input("a directory of Parquet files is one input, or join the CSV files first"),
                         help="CSV with header (.gz, .bz2, .zst, .lz4 are decompressed as read), Parquet file or directory")
    tabular.add_argument("--schema", default=None,
                         help="schema file naming fields, label, row key, extras (required unless --like); with "
                              "--like, the earlier output's fields as they were plus new fields (a new column)")
    tabular.add_argument("--like", default=None, metavar="PREPARED_DIR",
                         help="prepare the new rows of --input into the schema and ids of this earlier prepare "
                              "tabular output, as one split, so that a model trained on it scores them (no --split, "
                              "--split-by, --seed: the earlier preparation decided them); with --schema, the file's "
                              "new fields are added, prepared as a fresh prepare tabular would (--vocabulary, --hash "
                              "for them alone), for a run that takes the shared fields' tables "
                              "(train.init_scope=tables); the label column is optional (default: none)")
    tabular.add_argument("--split-name", default=None, metavar="NAME",
                         help="with --like, the name of the one split written, NAME.parquet (default: test)")
    tabular.add_argument("--grow-vocabulary", action="store_true",
                         help="with --like, values a vocabulary field's vocabulary lacks take the free ids of its "
                              "table (cardinality beyond the values it holds), most frequent first, instead of id 0; "
                              "the output's value-text files hold them (for training on the new rows: "
                              "train.init_from)")
    tabular.add_argument("--split", type=_fractions, default=None,
                         help="train,valid,test shares, divided by their sum, 8,1,1 as 0.8,0.1,0.1 "
                              "(default: 0.8,0.1,0.1)")
    tabular.add_argument("--split-by", default=None,
                         help="column for a time-ordered split, holding numbers or ISO-8601 dates/timestamps "
                              "(default: random)")
    tabular.add_argument("--seed", type=integer_at_least(0), default=None, help="seed of the random split (default: 0)")
    tabular.add_argument("--label-threshold", type=_number(), default=None,
                         help="label = value > threshold (default: none: labels must be 0/1)")
    tabular.add_argument("--fill-missing-dense", type=_number(), default=None,
                         help="value for missing or NaN/inf dense features (default: they are an error)")
    tabular.add_argument("--sequence-separator", type=_sequence_separator, default="|",
                         help="separator of sequence tokens in CSV cells (default: '|')")
    tabular.add_argument("--delimiter", type=_delimiter, default=",", help="CSV delimiter (default: ',')")
    tabular.add_argument("--missing-token", action="append", default=[], metavar="TOKEN",
                         help="a CSV cell of a string column read as missing besides the empty cell, e.g. NA "
                              "(repeatable; also missing in numeric columns unless it reads as a number, e.g. "
                              "MySQL's \\N) (default: none: only the empty cell is missing, NA, null, N/A are values)")
    tabular.add_argument("--vocabulary", action="append", default=None, metavar="FIELD",
                         help="map this sparse/sequence field through a vocabulary built from the data even when "
                              "its values are (mostly) integers, e.g. zip codes (repeatable) (default: none: "
                              "integer values are ids as they are)")
    tabular.add_argument("--hash", action="append", default=None, metavar="FIELD",
                         help="hash the values of this \"hashed\": true field as text even when every value is an "
                              "integer, so that one non-integer value in other data cannot switch every id of the "
                              "field (repeatable) (default: none: a hashed field whose values are all integers takes "
                              "them as ids, folded modulo its cardinality; one other value hashes them all)")

    for parser in (synthetic, movielens, criteo, tabular):
        show_defaults(parser)  # their --help shows every default, as the semantics group's does
