"""Typed settings from YAML values: a dataclass built from a mapping, each value converted to its
field's declared type, every error naming the dotted key of the setting.

A leaf module (the standard library only), so the plug-in configs of :mod:`recsys_llm.modules` and
the experiment config of :mod:`recsys_llm.train.config` share it. Numbers that keep the text YAML
read them from (a ``yaml_text`` attribute, as the experiment config's loader gives them) become
that text in a string setting and are refused in a number setting when not written in decimal.

Example::

    @dataclasses.dataclass
    class Distill:
        alpha: float = 1.0
        layers: Tuple[int, ...] = (64,)

    build_dataclass(Distill, {"alpha": "0.5", "layers": [32, 16]}, "elec.distill")
    # Distill(alpha=0.5, layers=(32, 16)); {"alpha": "x"}: ConfigError "elec.distill.alpha: expected a number, got 'x'"
"""

import dataclasses
import math
import os
import typing
from typing import Any, Dict, List, Mapping, Optional, Tuple, Type, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the config dataclasses."""


def setting_text(value: Any) -> str:
    """``value`` as a string setting: a YAML number as it was written (its ``yaml_text``)."""
    return getattr(value, "yaml_text", None) or str(value)


def coerce_value(value: Any, annotation: Any, where: str) -> Any:
    """Converts a YAML value to ``annotation`` (int, float, bool, str, Literal, Optional, List, Tuple, Dict, Any)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin is typing.Literal:
        return _literal(value, args, where)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce_value(value, inner[0], where)
    if origin in (list, List, tuple) or annotation in (list, tuple):
        if isinstance(value, str) and not value.strip():
            value = []  # ``key=`` (an empty override, as '' turns a str setting off): no items, not one ''
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item_type = args[0] if args else Any
        items = [coerce_value(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or annotation is tuple else items
    if origin in (dict, Dict) or annotation is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        value_type = args[1] if len(args) == 2 else Any
        return {setting_text(k): coerce_value(v, value_type, dotted_key(where, setting_text(k)))
                for k, v in value.items()}
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        if isinstance(value, int) and value in (0, 1):  # an unquoted 0 / 1, which YAML reads as an integer
            return bool(value)
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if annotation in (int, float):
        _check_written_in_decimal(value, where)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)) or (
                isinstance(value, str) and not value.lstrip("-").isdigit()):
            raise ConfigError(f"{where}: expected an integer, got {value!r}{_in_digits(value)}")
        try:
            return int(value)
        except ValueError:  # digits str.isdigit takes but int() does not: '--3', '\u00b2'
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if annotation is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if annotation is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        if isinstance(value, bool):  # YAML's yes / no / on / off / true / false: never the text meant here
            raise ConfigError(f"{where}: expected a string, got the boolean {value!r} (YAML reads yes, no, on, off, "
                              "true and false as booleans): quote it, e.g. key='off'")
        return "" if value is None else setting_text(value)
    if dataclasses.is_dataclass(annotation):
        return build_dataclass(annotation, value, where)
    return value


def _in_digits(value: Any) -> str:
    """``; write it in digits: N`` for a whole number written otherwise (``1e3``, which YAML 1.1 reads as text, or
    ``1000.0``), else ``""``."""
    if isinstance(value, bool):
        return ""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return ""
    if not math.isfinite(number) or number != int(number):
        return ""
    exponent = isinstance(value, str) and "e" in value.lower()  # not '1000.0' or '1_000', quoted
    text = " (YAML 1.1 reads an exponent without a '.' as text)" if exponent else ""
    return f"; write it in digits: {int(number)}{text}"


def _literal(value: Any, choices: Tuple[Any, ...], where: str) -> Any:
    """The choice of a ``Literal`` setting ``value`` names: a string choice by its text, a bool choice as a bool
    setting reads it (``true``, ``no``, ``1``, ...), e.g. ``Literal["auto", True, False]``.

    Raises:
        ConfigError: naming the setting, its choices and the value.
    """
    for choice in choices:
        if isinstance(choice, bool):
            try:
                if coerce_value(value, bool, where) is choice:
                    return choice
            except ConfigError:
                continue
        elif isinstance(value, str) and not isinstance(value, bool) and value == choice:
            return choice
    names = [str(choice).lower() if isinstance(choice, bool) else str(choice) for choice in choices]
    raise ConfigError(f"{where}: expected {', '.join(names[:-1])} or {names[-1]}, got {value!r}")


# how YAML 1.1 reads a number not written in decimal digits: the base it names, by the text's start
_NON_DECIMAL = (("0x", "hexadecimal"), ("0b", "binary"), ("0", "octal"))


def _check_written_in_decimal(value: Any, where: str) -> None:
    """Raises when a number setting's YAML text is no decimal number: YAML 1.1 reads ``010`` as the
    octal 8, ``0x10`` as 16, ``0b11`` as 3 and ``1:30`` as the base-60 90, not the number meant.

    Raises:
        ConfigError: naming the setting, its text and the number YAML made of it.
    """
    text = getattr(value, "yaml_text", None)
    if text is None:
        return
    digits = text.lstrip("+-").replace("_", "").lower()
    if ":" in digits:
        base = "base-60"
    elif isinstance(value, int) and digits != "0":
        base = next((name for prefix, name in _NON_DECIMAL if digits.startswith(prefix)), None)
    else:
        base = None
    if base:
        raise ConfigError(f"{where}: {text} is the {base} {value!r} to YAML 1.1; write it in decimal digits "
                          "without leading zeros")


def build_dataclass(cls: Type[T], raw: Any, where: str, init_vars: Optional[Mapping[str, Any]] = None) -> T:
    """Builds dataclass ``cls`` from a mapping, converting every field to its declared type; an error
    of ``cls`` naming its field as ``{cls.__name__}.{field}`` names it as ``{where}.{field}``.
    ``init_vars``: values of ``cls``'s ``dataclasses.InitVar`` parameters (never settings of ``raw``),
    e.g. the dotted key its ``__post_init__`` names in its errors.

    Raises:
        ConfigError: ``raw`` is not a mapping, has unknown keys, or a value has the wrong type.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - set(fields), key=str)  # YAML reads a key `1:` or `yes:` as no string
    if unknown:
        raise ConfigError(f"{where or 'top level'}: unknown keys {unknown}; allowed: {sorted(fields)}")
    missing = [name for name, field in fields.items() if name not in raw and field.default is dataclasses.MISSING
               and field.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where or 'top level'}: missing key(s) {missing}; expected them beside {sorted(raw)}")
    # a section left empty in YAML (``model:`` alone reads as null) is a section left out: its defaults
    kwargs = {name: coerce_value(value, hints[name], dotted_key(where, name)) for name, value in raw.items()
              if not (value is None and fields[name].default_factory is not dataclasses.MISSING
                      and (dataclasses.is_dataclass(hints[name]) or typing.get_origin(hints[name]) is dict))}
    try:
        return cls(**kwargs, **(init_vars or {}))
    except (TypeError, ValueError) as error:
        message = str(error)  # already naming the key (e.g. "optim.dense_lr must be ...") or not
        # "TeacherStudentConfig.alpha must be ..." -> "elec.distill.alpha must be ..." (also from a base class's check)
        own = next((f"{base.__name__}." for base in cls.__mro__ if message.startswith(f"{base.__name__}.")), None)
        if where and own:
            message = f"{where}.{message[len(own):]}"
        named = message if not where or message.startswith(f"{where}.") else f"{where}: {message}"
        raise ConfigError(named) from error


def dotted_key(where: str, name: str) -> str:
    """The dotted key of ``name`` inside ``where`` ('' is the top level)."""
    return f"{where}.{name}" if where else name


def as_bool(value: Any) -> Optional[bool]:
    """``value`` as a bool when it is one: a bool, or a numpy bool (``np.True_``, a cell of a pandas sweep grid),
    which no bool subclasses; None for anything else."""
    if isinstance(value, bool):
        return value
    dtype = getattr(value, "dtype", None)  # numpy's bool scalar or 0-d array (no import: a leaf module)
    if getattr(dtype, "kind", None) == "b" and getattr(value, "shape", None) == ():
        return bool(value)
    return None


def check_bool_settings(config: Any, names: Tuple[str, ...], where: str) -> None:
    """Raises ConfigError, naming ``<where>.<name>``, for a setting of ``names`` that is no bool: a config built in
    Python is not converted as a config file's is, and ``"false"``, ``1`` or a list would count as on. A numpy bool
    is taken, and stored as a bool."""
    for name in names:
        value = getattr(config, name)
        checked = as_bool(value)
        if checked is None:
            raise ConfigError(f"{dotted_key(where, name)}: expected true or false, got {value!r}")
        if checked is not value:
            object.__setattr__(config, name, checked)  # a frozen dataclass's too


def check_str_settings(config: Any, names: Tuple[str, ...], where: str, *, paths: Tuple[str, ...] = ()) -> None:
    """Raises ConfigError, naming ``<where>.<name>``, for a setting of ``names`` or ``paths`` that is no string: a
    config built in Python is not converted as a config file's is, and ``True``, ``3`` or a list would be taken as
    text (or fail far from the setting). None is taken where the setting's default is None, or ``""`` (off, which
    None then becomes); a setting of ``paths`` also takes an ``os.PathLike`` (a ``pathlib.Path``), stored as its
    ``os.fspath`` string."""
    defaults = {field.name: field.default for field in dataclasses.fields(config)}
    for name in names + paths:
        value = getattr(config, name)
        if name in paths and isinstance(value, os.PathLike):
            value = os.fspath(value)
            if isinstance(value, str):
                object.__setattr__(config, name, value)  # a frozen dataclass's too
        takes_none = defaults.get(name) in (None, "")
        if value is None and takes_none:
            object.__setattr__(config, name, defaults[name])
        elif not isinstance(value, str):
            raise ConfigError(f"{dotted_key(where, name)}: expected a string{' or None' if takes_none else ''}, got "
                              f"{value!r}")


def check_name_list(value: Any, where: str) -> None:
    """Raises ConfigError, naming ``where``, for a single string where a list of names is expected (it would be
    read letter by letter)."""
    if isinstance(value, str):
        raise ConfigError(f"{where}: expected a list of names, got the string {value!r} (for one name: [{value!r}])")
