"""MovieLens in RecBole's atomic format -> Parquet splits + schema with user and item text.

Input: a directory with ``<name>.inter`` (``user_id:token item_id:token rating:float
timestamp:float``), ``<name>.item`` (``item_id:token movie_title:token_seq
release_year:token genre|class:token_seq``) and ``<name>.user`` (``user_id:token
age:token gender:token occupation:token zip_code:token``), tab separated with typed
headers, as in RecBole's ``ml-100k`` / ``ml-1m`` downloads, all named after one data set (``ml-1m.inter``
beside ``ml-100k.item`` is an error). Without a ``.user`` file (RecBole's ``ml-20m`` / ``ml-25m``) the user
attribute fields are left out and ``user_id`` has no value text, with a warning. Genres are split on white
space, or on ``|`` in a file that writes them so (MovieLens' own ``Action|Comedy``); ``(no genres listed)`` is no
genre. A column named twice in a header is an error. A leading UTF-8 byte order mark
is ignored; blank lines are skipped (error messages still name the line as an editor counts it);
white space around a cell is dropped (``"1 "`` is user ``1``); an id repeated in ``.item`` or ``.user``
is an error (no row silently replaces another), as is an empty user or item id. A release year
written as a float (``release_year:float``, ``1995.0``) is the year ``1995``, and a whole-number age so
written (``age:float``, ``24.0``; ML-1M's code ``1.0``) the age ``24`` (the code ``1``).

Output (the usual CTR protocol for MovieLens):

* label = rating > 3, rows with rating == 3 dropped;
* rows sorted by timestamp (ties keep file order) and split 8:1:1 into
  train/valid/test, so validation and test lie in the future of training;
* every token remapped to a contiguous id starting at 1 (0 = padding/unknown);
* fields: ``user_id``, ``item_id``, ``age``, ``gender``, ``occupation``, ``zip_prefix``,
  ``release_year`` (sparse), ``genres`` (sequence), ``user_age`` and ``movie_year`` (dense, scaled to
  about [0, 1]; the user's fields ``age`` .. ``zip_prefix`` and ``user_age`` only with a ``.user`` file);
  extra column ``timestamp``; with ``history_length`` N > 0 also ``history`` (sequence): the last N
  movies the user rated above 3 at an earlier timestamp, most recent first (ratings of the same second
  are not each other's history);
* value-text files: item = title + year + genres, user = age, gender, occupation and zip code
  (ML-1M's age and occupation codes, e.g. age 1 and occupation 10, as the words of its README:
  "under 18", "K-12 student", when most users' values are its codes; a value that is none is warned
  about and written as its code, "occupation: code 21"); a movie without a title is "A movie without a title";
* the item catalogue ``item_catalog.parquet``: every movie of the ``.item`` file (rated or
  not) with its ``ITEM_FIELDS`` columns, for ``elec.distill.swap_catalog``.

All of it is written into a temp directory that replaces the output directory only once
complete, so a failed run leaves an earlier output untouched.

The raw files are only read, never copied into the output directory.
"""

import collections
import dataclasses
import os
import re
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from tqdm import tqdm

from recsys_llm.data.parquet_writer import SplitWriter, arrow_schema_for, list_array, write_prepared
from recsys_llm.data.schema import DatasetSchema, FieldKind, FieldSpec
from recsys_llm.data.synthetic import ITEM_CATALOG, write_value_text
from recsys_llm.data.tabular.splits import split_bounds
from recsys_llm.data.validation import DataError, check_number, check_split_fractions, offsets_from_lengths
from recsys_llm.progress import bar_options

_NUMBER = r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$"
#: a release year: four digits, or as a float column writes them (``release_year:float``): 1995.0
_YEAR = r"^([0-9]{4})(\.0*)?$"
#: a whole number as a float column writes it (``age:float``): 24.0 is the age 24, 1.0 ML-1M's age code 1
_WHOLE_NUMBER = r"^([0-9]+)\.0*$"
#: pyarrow's message for a cell that is not UTF-8; its column counts from 0, its row counts the header
#: as row 1 and skips blank lines
_INVALID_UTF8 = re.compile(r"In CSV column #(\d+): Row #(\d+): CSV conversion error to string: invalid UTF8 data")
GENDER_WORDS = {"M": "man", "F": "woman"}
# MovieLens-1M's users.dat (and RecBole's ml-1m.user) holds codes for age and occupation (its README)
ML1M_AGE_WORDS = {"1": "under 18", "18": "18 to 24", "25": "25 to 34", "35": "35 to 44", "45": "45 to 49",
                  "50": "50 to 55", "56": "56 or older"}
ML1M_OCCUPATION_WORDS = (
    "other or not specified", "academic/educator", "artist", "clerical/admin", "college/grad student",
    "customer service", "doctor/health care", "executive/managerial", "farmer", "homemaker", "K-12 student",
    "lawyer", "programmer", "retired", "sales/marketing", "scientist", "self-employed", "technician/engineer",
    "tradesman/craftsman", "unemployed", "writer",
)
_ML1M_OCCUPATIONS = {str(code): words for code, words in enumerate(ML1M_OCCUPATION_WORDS)}
#: a movie without a genre in RecBole's ml-20m / ml-25m (and MovieLens' own movies.csv)
NO_GENRES = "(no genres listed)"
# the movie's side of a row (what ``elec.distill.swap_fields`` re-pairs); the rest is the user's
ITEM_FIELDS = ("item_id", "release_year", "genres", "movie_year")


@dataclasses.dataclass(frozen=True)
class MovieLensConfig:
    """Options of the MovieLens conversion.

    Args:
        split_fractions (Tuple[float, float, float]): train/valid/test shares of the time-ordered rows.
        zip_prefix_length (int): leading characters of the zip code kept as ``zip_prefix``.
        rows_per_group (int): Parquet row group size.
        history_length (int): N > 0 adds the sequence field ``history``, the last N movies the
            user rated above 3 before the row (text: each movie's title, year and genres); 0: none.
    """

    split_fractions: Tuple[float, float, float] = (0.8, 0.1, 0.1)
    zip_prefix_length: int = 2
    rows_per_group: int = 8192
    history_length: int = 0

    def __post_init__(self) -> None:
        check_split_fractions(self.split_fractions, "MovieLensConfig.split_fractions")
        check_number("MovieLensConfig.zip_prefix_length", self.zip_prefix_length, integer=True, minimum=1)
        check_number("MovieLensConfig.rows_per_group", self.rows_per_group, integer=True, minimum=1)
        check_number("MovieLensConfig.history_length (--history-length)", self.history_length, integer=True,
                     minimum=0)


# ---- RecBole atomic files ----------------------------------------------------------------------------
def read_atomic_file(path: str, required: Dict[str, Tuple[str, ...]]) -> pa.Table:
    """Reads a RecBole atomic file; every column comes back as strings named without ``:type``.

    Args:
        path (str): the ``.inter`` / ``.item`` / ``.user`` file.
        required (Dict[str, Tuple[str, ...]]): column name -> accepted RecBole types; a name
            ``a|b`` accepts either column (the first one present is renamed to ``a``).

    Raises:
        DataError: a missing file, a bad header, a line with the wrong number of columns
            or a cell that is not UTF-8 (naming the line), or a missing required column.

    A UTF-8 byte order mark before the header is dropped (``utf-8-sig``; pyarrow skips it too), and
    so is white space around a cell (``"1 "`` is the token ``"1"``).
    """
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    with open(path, encoding="utf-8-sig", errors="replace") as handle:
        header = handle.readline().rstrip("\n\r").split("\t")
    if len(header) == 1 and len(required) > 1:  # "a:token,b:float" would parse as one column "a:token,b" of type float
        raise DataError(f"{path}, line 1: the header is one tab-separated column {header[0][:120]!r}; expected "
                        f"tab-separated 'name:type' columns (RecBole atomic format) naming {list(required)}")
    names, types = [], {}
    for position, cell in enumerate(header):
        if ":" not in cell:
            raise DataError(f"{path}, line 1: header column {position + 1} {cell!r} is not 'name:type' (RecBole atomic format)")
        name, kind = cell.rsplit(":", 1)
        if name in types:  # pyarrow would refuse the table with 'Field ... exists 2 times', naming no file
            raise DataError(f"{path}, line 1: header column {position + 1} {cell!r} repeats column {name!r} (column "
                            f"{names.index(name) + 1}); expected each column once")
        names.append(name)
        types[name] = kind
    bad_lines: List[str] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        # pyarrow numbers rows from the header (row 1) without the blank lines it skips
        line = row.number if row.number is None else _file_lines(path, [row.number - 2])[0]
        bad_lines.append(
            f"{path}, line {line}: {row.actual_columns} tab-separated columns, expected "
            f"{row.expected_columns} ({header}): {row.text[:80]!r}"
        )
        return "error"

    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(column_names=names, skip_rows=1, use_threads=False),
            parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False, invalid_row_handler=on_invalid),
            convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names}, strings_can_be_null=False),
        )
    except (pa.ArrowInvalid, UnicodeDecodeError) as error:
        cell = _INVALID_UTF8.search(str(error))
        if not bad_lines and cell and int(cell.group(1)) < len(names):
            line = _file_lines(path, [int(cell.group(2)) - 2])[0]
            raise DataError(f"{path}, line {line}: column {names[int(cell.group(1))]!r} is not UTF-8 text; expected a "
                            "UTF-8 file (re-encode it, e.g. from Latin-1: iconv -f latin1 -t utf-8)") from error
        raise DataError(bad_lines[0] if bad_lines else f"{path}: cannot parse as a tab-separated RecBole file: {error}") from error
    # "1 " is user 1 (not a second user without attributes), "30 " the age 30 (not a crash casting it)
    table = pa.table([pc.utf8_trim_whitespace(column) for column in table.columns], names=table.column_names)
    for wanted, accepted in required.items():
        options = wanted.split("|")
        present = [o for o in options if o in types]
        if not present:
            raise DataError(f"{path}: missing column {' or '.join(repr(o) for o in options)}; header: {header}")
        if types[present[0]] not in accepted:
            raise DataError(f"{path}: column {present[0]!r} has type {types[present[0]]!r}; expected one of {list(accepted)}")
        if present[0] != options[0]:
            table = table.rename_columns([options[0] if n == present[0] else n for n in table.column_names])
    return table


def _file_lines(path: str, rows: Sequence[int]) -> List[int]:
    """1-based lines of the data rows ``rows`` of an atomic file (row 0 follows the header line 1).

    pyarrow's CSV reader skips blank lines without a row, so row ``r`` is on line ``r + 2`` only
    when no blank line precedes it; this counts them in a second pass over the file, made only
    to word an error. (The files have no quoting, so no cell spans lines.)
    """
    wanted = set(rows)
    found: Dict[int, int] = {}
    row = 0
    with open(path, encoding="utf-8-sig", errors="replace") as handle:  # universal newlines, as pyarrow
        next(handle, None)  # the header
        for number, text in enumerate(handle, start=2):
            if text == "\n":  # a blank line: skipped by the reader
                continue
            if row in wanted:
                found[row] = number
                if len(found) == len(wanted):
                    break
            row += 1
    return [found.get(r, r + 2) for r in rows]


def _numbers(table: pa.Table, column: str, path: str) -> np.ndarray:
    """Parses a string column as float64; the first non-number is reported with its line."""
    strings = table[column]
    ok = pc.match_substring_regex(strings, _NUMBER).to_numpy(zero_copy_only=False)
    if not ok.all():
        first = int(np.argmin(ok))
        raise DataError(f"{path}, line {_file_lines(path, [first])[0]}: column {column!r} is "
                        f"{strings[first].as_py()!r}; expected a number")
    return pc.cast(pc.utf8_trim_whitespace(strings), pa.float64()).to_numpy()


def _check_timestamps(path: str, table: pa.Table, timestamp: np.ndarray) -> None:
    """Raises if a timestamp (``timestamp``: the column of ``table`` as :func:`_numbers` read it) is
    infinite (``1e400``) or beyond int64, naming its line: it would be stored as a made-up int64."""
    bad = ~(np.abs(timestamp) < 2.0**63)
    if bad.any():
        first = int(np.argmax(bad))
        raise DataError(f"{path}, line {_file_lines(path, [first])[0]}: column 'timestamp' is "
                        f"{table['timestamp'][first].as_py()!r}; expected a number of seconds within int64's range")


def _check_ids_present(path: str, table: pa.Table, column: str) -> None:
    """Raises if an id cell of ``column`` is empty or blank, naming its line: read as the token ``''`` it
    would be one made-up user (or movie) shared by every such row, pooling their histories."""
    blank = pc.equal(pc.utf8_trim_whitespace(table[column]), "").to_numpy(zero_copy_only=False)
    if blank.any():
        line = _file_lines(path, [int(np.argmax(blank))])[0]
        raise DataError(f"{path}, line {line}: column {column!r} is empty; expected an id in every row")


def _check_unique(path: str, column: str, tokens: pa.ChunkedArray, keys: np.ndarray) -> None:
    """Raises if an id repeats in a ``.item`` / ``.user`` file, naming the lines of its first repeat.

    ``tokens``: the id column as read; ``keys``: (rows,) its ids (equal tokens, equal ids). A later
    row would otherwise silently replace the earlier one's attributes and text.
    """
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    repeats = np.nonzero(ordered[1:] == ordered[:-1])[0]
    if repeats.size:
        second = int(order[repeats + 1].min())  # the first row, in file order, whose id came before
        first = int(np.argmax(keys == keys[second]))
        first_line, second_line = _file_lines(path, [first, second])
        raise DataError(
            f"{path}, line {second_line}: {column} {tokens[second].as_py()!r} is repeated (first on line "
            f"{first_line}); expected one row per {column}"
        )


def _vocabulary(*columns: pa.Array) -> pa.Array:
    """Distinct tokens, in numeric order when all are integers, else lexicographic."""
    chunks = [chunk for column in columns for chunk in pa.chunked_array(column).chunks]
    values = pc.unique(pa.chunked_array(chunks, pa.string())).to_pylist()
    if all(re.fullmatch(r"-?\d+", v) for v in values):
        values.sort(key=int)
    else:
        values.sort()
    return pa.array(values, pa.string())


def _encode(column: pa.Array, vocabulary: pa.Array) -> np.ndarray:
    """Token -> 1-based id in ``vocabulary`` (0 when absent)."""
    index = pc.index_in(column, value_set=vocabulary)
    return pc.fill_null(pc.add(index, 1), 0).to_numpy(zero_copy_only=False).astype(np.int64)


def _year(token: Optional[str]) -> Optional[str]:
    """The four digits of a release-year token (``"1995"``, or ``"1995.0"`` from a ``release_year:float``
    column), None for any other token (ML-100K's ``unkonwn``)."""
    match = re.fullmatch(_YEAR, token or "")
    return match.group(1) if match else None


def _warn_unread(path: str, column: str, values: pa.Array, parsed: np.ndarray, effect: str,
                 stacklevel: int = 3) -> None:
    """Warns when cells of ``column`` that are not empty did not read as numbers (``parsed`` False): they
    count as missing (``effect``), not as the value they may mean. The warnings of the conversion name
    :func:`prepare_movielens`'s line (``stacklevel`` 3 from a helper :func:`_convert` calls)."""
    unread = [value for value, ok in zip(values.to_pylist(), parsed) if not ok and value not in (None, "")]
    if unread:
        shown = ", ".join(repr(v) for v in list(dict.fromkeys(unread))[:3])
        warnings.warn(f"{path}: {len(unread)} {column} value(s) are not numbers ({shown}); read as missing ({effect})",
                      stacklevel=stacklevel)


def _warn_absent(inter_path: str, path: str, entity: str, ids: pa.ChunkedArray, known: np.ndarray) -> None:
    """Warns when ratings name ids that ``path`` lacks: they get attribute id 0 and the text 'unknown {entity}'."""
    if not known.all():
        absent = list(dict.fromkeys(ids.filter(pa.array(~known)).to_pylist()))
        shown = ", ".join(repr(v) for v in absent[:3])
        warnings.warn(f"{inter_path}: {int((~known).sum())} rating(s) of {len(absent)} {entity}(s) absent from {path} "
                      f"({shown}{', ...' if len(absent) > 3 else ''}): their attributes are missing (id 0) and their "
                      f"text 'unknown {entity}'", stacklevel=3)


def _lookup(table_ids: np.ndarray, keys: np.ndarray, values: np.ndarray, default: object) -> np.ndarray:
    """values[k] for the row whose key is k, for every id in ``table_ids`` (default when missing)."""
    out = np.full(len(table_ids), default, dtype=values.dtype)
    out[keys] = values
    return out[table_ids]


# ---- conversion ----------------------------------------------------------------------------------------
def liked_before(user: np.ndarray, item: np.ndarray, liked: np.ndarray, timestamp: np.ndarray,
                 length: int) -> Tuple[np.ndarray, np.ndarray]:
    """Per row, the last ``length`` items its user liked at an earlier timestamp, most recent first.

    Args:
        user (np.ndarray): (n,) user ids of the rows, in time order.
        item (np.ndarray): (n,) item ids.
        liked (np.ndarray): (n,) bool, the rows whose rating counts as liked.
        timestamp (np.ndarray): (n,) non-decreasing; a like becomes history only for rows of a later
            timestamp, so ratings given in the same second are not each other's history.
        length (int): at most this many items per row.

    Returns:
        Tuple[np.ndarray, np.ndarray]: lengths (n,) int64 and the items of every row, concatenated
        (sum of lengths,) int64.
    """
    recent: Dict[int, "collections.deque[int]"] = {}
    lengths = np.zeros(len(user), dtype=np.int64)
    items: List[int] = []
    pending: List[Tuple[int, int]] = []  # likes of the current timestamp, history from the next one on
    for row in range(len(user)):
        if row and timestamp[row] != timestamp[row - 1]:
            for who, what in pending:
                recent.setdefault(who, collections.deque(maxlen=length)).appendleft(what)
            pending = []
        history = recent.get(int(user[row]), ())
        lengths[row] = len(history)
        items.extend(history)
        if liked[row]:
            pending.append((int(user[row]), int(item[row])))
    return lengths, np.asarray(items, dtype=np.int64)


# the ratings of GroupLens' MovieLens downloads (ml-100k; ml-1m, ml-10m; ml-20m, ml-25m, ml-latest)
GROUPLENS_RATING_FILES = ("u.data", "ratings.dat", "ratings.csv")
RECBOLE_CONVERSION_TOOLS = "https://github.com/RUCAIBox/RecSysDatasets/tree/master/conversion_tools"


def _find(raw_dir: str, suffix: str, required: bool = True) -> Optional[str]:
    """The one ``*<suffix>`` file of ``raw_dir`` (None when there is none and it is not ``required``); none, or
    several (RecBole's benchmark files ``x.train.inter`` / ``x.valid.inter`` / ``x.test.inter``, two data
    sets), is an error."""
    if os.path.isfile(raw_dir):
        raise DataError(f"{raw_dir}: a file; expected the directory that holds it with the other RecBole atomic files "
                        f"(.inter/.item/.user): --input {os.path.dirname(raw_dir) or '.'}")
    candidates = sorted(f for f in os.listdir(raw_dir) if f.endswith(suffix))
    if not candidates and not required:
        return None
    if not candidates:
        grouplens = sorted(set(os.listdir(raw_dir)) & set(GROUPLENS_RATING_FILES))
        hint = (f"; {grouplens[0]} is a file of GroupLens' own download, not a RecBole atomic file: convert the "
                f"download first with RecBole's conversion tools ({RECBOLE_CONVERSION_TOOLS})" if grouplens else "")
        raise DataError(f"{raw_dir}: no *{suffix} file (expected RecBole atomic files .inter/.item, and .user if the "
                        f"data set has one){hint}")
    if len(candidates) > 1:
        raise DataError(f"{raw_dir}: several *{suffix} files ({', '.join(candidates)}); expected one (one data set "
                        "per directory, as RecBole atomic files <name>.inter/.item/.user, all interactions in one .inter)")
    return os.path.join(raw_dir, candidates[0])


def _find_files(raw_dir: str) -> Tuple[str, str, Optional[str]]:
    """The ``.inter``, ``.item`` and ``.user`` files of ``raw_dir`` (the ``.user`` None where the data set has
    none: RecBole's ml-20m, ml-25m); files of two data sets (``ml-1m.inter`` beside ``ml-100k.item``) are an
    error."""
    inter_path, item_path = _find(raw_dir, ".inter"), _find(raw_dir, ".item")
    user_path = _find(raw_dir, ".user", required=False)
    files = [os.path.basename(p) for p in (inter_path, item_path, user_path) if p]
    stems = [os.path.splitext(f)[0] for f in files]
    if len(set(stems)) > 1:
        named = ", ".join(f"{f} (name {s!r})" for f, s in zip(files, stems))
        raise DataError(f"{raw_dir}: atomic files of different data sets: {named}; expected the files of one data set, "
                        "all named <name>.inter/.item/.user with the same <name> (move the others out)")
    return inter_path, item_path, user_path


def _read_users(path: str) -> pa.Table:
    """The ``.user`` file, its ages read as whole numbers: an ``age:float`` column's ``24.0`` is the age 24 (its
    text, order and ML-1M code), as in an ``age:token`` column."""
    users = read_atomic_file(path, {"user_id": ("token",), "age": ("token", "float"), "gender": ("token",),
                                    "occupation": ("token",), "zip_code": ("token",)})
    return users.set_column(users.column_names.index("age"), "age",
                            pc.replace_substring_regex(users["age"], _WHOLE_NUMBER, r"\1"))


def _warn_no_user_file(raw_dir: str) -> None:
    """Says that a data set without a ``.user`` file (RecBole's ml-20m, ml-25m) gets no user attribute fields."""
    warnings.warn(f"{raw_dir}: no *.user file (as in RecBole's ml-20m / ml-25m): user attributes are absent, so the "
                  "fields age, gender, occupation, zip_prefix and user_age are left out and user_id has no value text "
                  "(its id is its text)", stacklevel=3)


# ---- user side -----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _UserSide:
    """What the ``.user`` file adds to the conversion; per-user arrays are indexed by the new user id (0 = unknown).

    Attributes:
        keys (np.ndarray): (users of the file,) the new id of each row of the file.
        sparse_fields (List[FieldSpec]): ``age``, ``gender``, ``occupation``, ``zip_prefix``.
        dense_fields (List[FieldSpec]): ``user_age``.
        columns (Dict[str, np.ndarray]): field -> (num_users + 1,) its id (sparse) or value (dense) of each user.
        user_text (List[str]): (num_users + 1,) the text of each user.
        value_texts (Dict[str, List[str]]): sparse field -> the texts of its ids 1.. (id 0, 'unknown', not included).
    """

    keys: np.ndarray
    sparse_fields: List[FieldSpec]
    dense_fields: List[FieldSpec]
    columns: Dict[str, np.ndarray]
    user_text: List[str]
    value_texts: Dict[str, List[str]]


def _ml1m_coded(user_path: str, users: pa.Table) -> bool:
    """Whether the ``.user`` file holds MovieLens-1M's age and occupation codes (its README's: age 1, 18, .., 56,
    occupation 0 to 20), read as their words: more than half of the users' ages, and of their occupations, are
    codes (empty cells left out). ML-100K's ages in years and occupation words are not. Warns naming the values
    that are no codes when they are read so."""
    outside: Dict[str, List[str]] = {}
    for column, codes in (("age", ML1M_AGE_WORDS), ("occupation", _ML1M_OCCUPATIONS)):
        present = [value for value in users[column].to_pylist() if value]
        outside[column] = [value for value in present if value not in codes]
        if len(outside[column]) * 2 >= len(present):
            return False
    if outside["age"] or outside["occupation"]:
        shown = "; ".join(f"{column} {', '.join(repr(v) for v in list(dict.fromkeys(values))[:3])}"
                          f"{', ...' if len(set(values)) > 3 else ''}" for column, values in outside.items() if values)
        examples = [repr(_age_words(v, True)) for v in outside["age"][:1]]
        examples += [repr(_occupation_words(v, True)) for v in outside["occupation"][:1]]
        warnings.warn(f"{user_path}: ages and occupations read as MovieLens-1M's codes (the words of its README, e.g. "
                      f"age 1 'under 18', occupation 10 'K-12 student'), but {sum(map(len, outside.values()))} "
                      f"value(s) are none of its codes ({shown}): their texts name the code ({', '.join(examples)})",
                      stacklevel=4)
    return True


def _age_words(age: str, coded: bool) -> str:
    """An age as the user text writes it: ML-1M's code as its group (``aged under 18``), else in years."""
    if not coded:
        return f"{age} years old"
    if age in ML1M_AGE_WORDS:
        return f"aged {ML1M_AGE_WORDS[age]}"
    return f"of age code {age}" if age else "of unknown age"


def _occupation_words(job: str, coded: bool) -> str:
    """An occupation as the user text writes it: ML-1M's code as its words (``K-12 student``), else as it is."""
    if not coded:
        return job
    if job in _ML1M_OCCUPATIONS:
        return _ML1M_OCCUPATIONS[job]
    return f"code {job}" if job else "unknown"


def _user_text(age: str, gender: str, job: str, zip_code: str, coded: bool) -> str:
    """One user's text: ``A 24 year old man, occupation: technician, zip code 85711.`` (ML-100K),
    ``A woman aged under 18, occupation: K-12 student, zip code 48067.`` (ML-1M's codes)."""
    gender_words = GENDER_WORDS.get(gender, gender)
    who = f"{gender_words} {_age_words(age, coded)}" if coded else f"{age} year old {gender_words}"
    return f"A {who}, occupation: {_occupation_words(job, coded)}, zip code {zip_code}."


def _user_side(user_path: str, users: pa.Table, user_vocab: pa.Array, config: MovieLensConfig) -> _UserSide:
    """The user attribute fields, their values per user and their texts, from the ``.user`` file ``users``."""
    num_users = len(user_vocab)
    keys = _encode(users["user_id"], user_vocab)
    _check_unique(user_path, "user_id", users["user_id"], keys)
    raw = {"age": users["age"], "gender": users["gender"], "occupation": users["occupation"],
           "zip_prefix": pc.utf8_slice_codeunits(users["zip_code"], 0, config.zip_prefix_length)}
    vocab = {name: _vocabulary(column) for name, column in raw.items()}
    columns = {name: _lookup(np.arange(num_users + 1), keys, _encode(column, vocab[name]), 0)
               for name, column in raw.items()}
    age_numeric = pc.match_substring_regex(users["age"], _NUMBER).to_numpy(zero_copy_only=False)
    ages = pc.cast(pc.if_else(pa.array(age_numeric), users["age"], "0"), pa.float64()).to_numpy()
    age_values = np.where(age_numeric, ages, 0.0)
    columns["user_age"] = _lookup(np.arange(num_users + 1), keys, age_values / 100.0, 0.0).astype(np.float32)
    _warn_unread(user_path, "age", users["age"], age_numeric, "user_age 0", stacklevel=4)

    coded = _ml1m_coded(user_path, users)
    user_text = ["unknown user"] * (num_users + 1)
    for new_id, *cells in zip(keys, *(users[c].to_pylist() for c in ("age", "gender", "occupation", "zip_code"))):
        user_text[new_id] = _user_text(*cells, coded=coded)
    value_texts = {
        "age": [_age_words(a, coded) for a in vocab["age"].to_pylist()],
        "gender": [GENDER_WORDS.get(g, g) for g in vocab["gender"].to_pylist()],
        "occupation": [_occupation_words(o, coded) for o in vocab["occupation"].to_pylist()],
        "zip_prefix": [f"zip code starting with {z}" for z in vocab["zip_prefix"].to_pylist()],
    }
    sparse_fields = [
        FieldSpec("age", FieldKind.SPARSE, len(vocab["age"]) + 1,
                  description="age group of the user" if coded else "age of the user in years",
                  value_text="text/age.parquet"),
        FieldSpec("gender", FieldKind.SPARSE, len(vocab["gender"]) + 1, description="gender of the user",
                  value_text="text/gender.parquet"),
        FieldSpec("occupation", FieldKind.SPARSE, len(vocab["occupation"]) + 1, description="occupation of the user",
                  value_text="text/occupation.parquet"),
        FieldSpec("zip_prefix", FieldKind.SPARSE, len(vocab["zip_prefix"]) + 1,
                  description="leading digits of the user's zip code (region)", value_text="text/zip_prefix.parquet"),
    ]
    user_age = ("youngest age of the user's age group in years divided by 100 (0.01: under 18)" if coded
                else "age of the user in years divided by 100")
    dense_fields = [FieldSpec("user_age", FieldKind.DENSE, description=user_age)]
    return _UserSide(keys, sparse_fields, dense_fields, columns, user_text, value_texts)


# ---- item side -----------------------------------------------------------------------------------------
def _genre_lists(genres: pa.ChunkedArray) -> List[List[str]]:
    """The genres of each ``.item`` row: its cell split on ``|`` where a cell of the column holds one (MovieLens'
    own ``Action|Comedy``, whose genre names may hold spaces), else on white space (RecBole's ``Action Comedy``);
    ``(no genres listed)`` (ML-20M and later) is no genre."""
    cells = genres.to_pylist()
    piped = any("|" in cell for cell in cells)

    def split(cell: str) -> List[str]:
        if cell == NO_GENRES:
            return []
        return [g.strip() for g in cell.split("|") if g.strip()] if piped else cell.split()

    return [split(cell) for cell in cells]


def _item_text(items: pa.Table, item_key: np.ndarray, genre_rows: List[List[str]], num_items: int) -> List[str]:
    """(num_items + 1,) the text of each movie: ``Toy Story (1995). Genres: Animation, Children's, Comedy.``;
    one without a title is ``A movie without a title (1995). ...``, one the ``.item`` file lacks ``unknown movie``."""
    item_text = ["unknown movie"] * (num_items + 1)
    titles = items["movie_title"].to_pylist()
    years = items["release_year"].to_pylist()
    for row, new_id in enumerate(item_key):
        year = _year(years[row])
        genres = ", ".join(genre_rows[row]) or "unknown"
        title = titles[row] or "A movie without a title"
        item_text[new_id] = f"{title}{f' ({year})' if year else ''}. Genres: {genres}."
    return item_text


def _warn_untitled(item_path: str, items: pa.Table) -> None:
    """Warns of movies whose title is empty: their text has none (``A movie without a title (1995). ...``)."""
    untitled = items["item_id"].filter(pc.equal(items["movie_title"], "")).to_pylist()
    if untitled:
        shown = ", ".join(repr(v) for v in untitled[:3])
        warnings.warn(f"{item_path}: {len(untitled)} movie(s) with an empty movie_title (item_id {shown}"
                      f"{', ...' if len(untitled) > 3 else ''}): their text reads 'A movie without a title'",
                      stacklevel=3)


def prepare_movielens(raw_dir: str, out_dir: str, config: Optional[MovieLensConfig] = None, progress: bool = False) -> DatasetSchema:
    """Converts RecBole-format MovieLens in ``raw_dir`` into Parquet splits + schema in ``out_dir``.

    The output (splits, value text, item catalogue, schema) is built in a temp directory
    and replaces ``out_dir`` only when complete and checked: a failed conversion leaves an
    earlier output as it was (:func:`~recsys_llm.data.parquet_writer.write_prepared`).

    Args:
        raw_dir (str): directory with ``*.inter``, ``*.item`` and, where the data set has one, ``*.user``
            (all named after one data set); without a ``.user`` file the user attribute fields are left out.
        out_dir (str): output directory (``train/valid/test.parquet``, ``text/``, ``item_catalog.parquet``,
            ``schema.json``); absent, empty or an earlier prepared data set.
        config (Optional[MovieLensConfig]): conversion options.
        progress (bool): show a tqdm bar over the steps.

    Returns:
        DatasetSchema: the written schema (``root`` = ``out_dir``).

    Example::

        schema = prepare_movielens("../shared/data/ml-100k", "data/ml-100k")
    """
    config = config or MovieLensConfig()
    return write_prepared(out_dir, raw_dir, [raw_dir], lambda tmp: _convert(raw_dir, tmp, config, progress))


def _convert(raw_dir: str, out_dir: str, config: MovieLensConfig, progress: bool) -> DatasetSchema:
    """The conversion into the fresh directory ``out_dir``; returns the schema rooted there (not yet saved)."""
    inter_path, item_path, user_path = _find_files(raw_dir)
    steps = tqdm(total=4, desc="movielens", disable=not progress, **bar_options())  # once the files are there
    inter = read_atomic_file(inter_path, {"user_id": ("token",), "item_id": ("token",), "rating": ("float",), "timestamp": ("float",)})
    items = read_atomic_file(item_path, {"item_id": ("token",), "movie_title": ("token_seq", "token"),
                                         "release_year": ("token", "float"), "genre|class": ("token_seq", "token")})
    users = _read_users(user_path) if user_path else None
    id_columns = [(inter_path, inter, "user_id"), (inter_path, inter, "item_id"), (item_path, items, "item_id")]
    for path, table, column in id_columns + ([(user_path, users, "user_id")] if users is not None else []):
        _check_ids_present(path, table, column)
    if users is None:
        _warn_no_user_file(raw_dir)
    steps.update()

    rating = _numbers(inter, "rating", inter_path)
    timestamp = _numbers(inter, "timestamp", inter_path)
    _check_timestamps(inter_path, inter, timestamp)
    off_scale = (rating < 0.5) | (rating > 5)
    if off_scale.any():
        shown = ", ".join(f"{v:g}" for v in list(dict.fromkeys(rating[off_scale].tolist()))[:3])
        warnings.warn(f"{inter_path}: {int(off_scale.sum())} rating(s) outside MovieLens' scale of 0.5 to 5 "
                      f"({shown}): each is read as a click above 3 and a non-click below", stacklevel=2)
    keep = rating != 3
    order = np.argsort(timestamp[keep], kind="stable")
    kept = inter.filter(pa.array(keep)).take(pa.array(order))
    rating, timestamp = rating[keep][order], timestamp[keep][order]
    if kept.num_rows < 10:
        raise DataError(f"{inter_path}: only {kept.num_rows} ratings other than 3; expected at least 10 to split 8:1:1")

    user_vocab = _vocabulary(inter["user_id"], *([users["user_id"]] if users is not None else []))
    item_vocab = _vocabulary(items["item_id"], inter["item_id"])
    num_users, num_items = len(user_vocab), len(item_vocab)
    user_side = _user_side(user_path, users, user_vocab, config) if users is not None else None
    item_key = _encode(items["item_id"], item_vocab)
    _check_unique(item_path, "item_id", items["item_id"], item_key)

    # item attributes
    year_vocab = _vocabulary(items["release_year"])
    item_year_id = _lookup(np.arange(num_items + 1), item_key, _encode(items["release_year"], year_vocab), 0)
    year_numeric = pc.match_substring_regex(items["release_year"], _YEAR).to_numpy(zero_copy_only=False)
    year_values = np.where(
        year_numeric, pc.cast(pc.if_else(pa.array(year_numeric), items["release_year"], "1900"), pa.float64()).to_numpy(), 1900.0
    )
    movie_year = _lookup(np.arange(num_items + 1), item_key, (year_values - 1900.0) / 100.0, 0.0).astype(np.float32)
    _warn_unread(item_path, "release_year", items["release_year"], year_numeric, "movie_year 0")
    genre_rows = _genre_lists(items["genre"])  # one list of genre tokens per .item row
    genre_vocab = _vocabulary(pa.array([g for row in genre_rows for g in row], pa.string()))
    genre_index = {g: i + 1 for i, g in enumerate(genre_vocab.to_pylist())}
    genres_of = [[] for _ in range(num_items + 1)]  # new item id -> genre ids
    for row, new_id in enumerate(item_key):
        genres_of[new_id] = [genre_index[g] for g in genre_rows[row]]
    genre_len = np.array([len(g) for g in genres_of], dtype=np.int64)
    genre_flat_new = np.array([g for row in genres_of for g in row], dtype=np.int64)
    genre_off = offsets_from_lengths(genre_len)  # (num_items + 2,)
    max_genres = int(max(genre_len.max(), 1))
    steps.update()

    # ---- text ----
    item_text = _item_text(items, item_key, genre_rows, num_items)
    _warn_untitled(item_path, items)
    attribute_text = {
        **(user_side.value_texts if user_side else {}),
        "release_year": [f"released in {_year(y)}" if _year(y) else "unknown release year"
                         for y in year_vocab.to_pylist()],
        "genres": genre_vocab.to_pylist(),
    }

    schema = DatasetSchema(
        name=os.path.basename(os.path.abspath(raw_dir)),
        fields=[
            FieldSpec("user_id", FieldKind.SPARSE, num_users + 1, description="id of the user who rated the movie",
                      value_text="text/user_id.parquet" if user_side else None),
            FieldSpec("item_id", FieldKind.SPARSE, num_items + 1, description="id of the rated movie; its text is title, year and genres",
                      value_text="text/item_id.parquet"),
            *(user_side.sparse_fields if user_side else []),
            FieldSpec("release_year", FieldKind.SPARSE, len(year_vocab) + 1,
                      description="year the movie was released", value_text="text/release_year.parquet"),
            FieldSpec("genres", FieldKind.SEQUENCE, len(genre_vocab) + 1, max_length=max_genres,
                      description="genres of the movie", value_text="text/genres.parquet"),
            *([FieldSpec("history", FieldKind.SEQUENCE, num_items + 1, max_length=config.history_length,
                         description="movies the user rated above 3 before this rating, most recent first",
                         value_text="text/history.parquet")] if config.history_length else []),
            *(user_side.dense_fields if user_side else []),
            FieldSpec("movie_year", FieldKind.DENSE, description="release year of the movie minus 1900, divided by 100"),
        ],
        label="label",
        row_key="row_id",
        splits={"train": "train.parquet", "valid": "valid.parquet", "test": "test.parquet"},
        extra_columns=["timestamp"],
        root=os.path.abspath(out_dir),
    )
    if user_side:
        write_value_text(os.path.join(out_dir, "text", "user_id.parquet"), user_side.user_text)
    write_value_text(os.path.join(out_dir, "text", "item_id.parquet"), item_text)
    if config.history_length:
        write_value_text(os.path.join(out_dir, "text", "history.parquet"), item_text)
    for name, texts in attribute_text.items():
        write_value_text(os.path.join(out_dir, "text", f"{name}.parquet"), ["unknown"] + texts)
    steps.update()

    # ---- rows ----
    user = _encode(kept["user_id"], user_vocab)
    item = _encode(kept["item_id"], item_vocab)
    if user_side:
        _warn_absent(inter_path, user_path, "user", kept["user_id"], np.isin(user, user_side.keys))
    _warn_absent(inter_path, item_path, "movie", kept["item_id"], np.isin(item, item_key))
    n = kept.num_rows
    seq_len = genre_len[item]
    seq_off = offsets_from_lengths(seq_len)  # (n + 1,)
    gather = np.arange(seq_off[-1]) - np.repeat(seq_off[:-1] - genre_off[item], seq_len)
    columns = {
        "row_id": np.arange(n, dtype=np.int64),
        "user_id": user,
        "item_id": item,
        **{name: values[user] for name, values in (user_side.columns if user_side else {}).items()},
        "release_year": item_year_id[item],
        "genres": list_array(seq_len, genre_flat_new[gather]),
        **({"history": list_array(*liked_before(user, item, rating > 3, timestamp, config.history_length))}
           if config.history_length else {}),
        "movie_year": movie_year[item],
        "label": (rating > 3).astype(np.int8),
        "timestamp": timestamp.astype(np.int64),
    }
    bounds = [0, *split_bounds(config.split_fractions, n), n]  # exact: not the floor of a float sum
    arrow_schema = arrow_schema_for(schema, {"timestamp": pa.int64()})
    rows = pa.Table.from_pydict(columns, schema=arrow_schema)  # every split is a slice of it (no copy)
    for file_name, start, stop in zip(schema.splits.values(), bounds[:-1], bounds[1:]):
        table = rows.slice(start, stop - start)
        with SplitWriter(os.path.join(out_dir, file_name), arrow_schema, config.rows_per_group) as writer:
            writer.write({name: table[name] for name in arrow_schema.names})
    catalog_ids = np.unique(item_key)  # every movie of the .item file, rated or not
    catalog = {
        "item_id": catalog_ids,
        "release_year": item_year_id[catalog_ids],
        "genres": list_array(genre_len[catalog_ids], np.concatenate(
            [genre_flat_new[genre_off[i]:genre_off[i + 1]] for i in catalog_ids] or [np.zeros(0, np.int64)])),
        "movie_year": movie_year[catalog_ids],
    }
    catalog_schema = pa.schema([arrow_schema.field(name) for name in ITEM_FIELDS])
    with SplitWriter(os.path.join(out_dir, ITEM_CATALOG), catalog_schema, config.rows_per_group) as writer:
        writer.write(catalog)
    steps.update()
    steps.close()
    return schema
