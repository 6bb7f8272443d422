"""Config fields that are also command-line options: the ``setting`` declaration and what reads it.

A field made with :func:`setting` carries its option's facts in the field's metadata: help text,
flag, choices (a registry, read when needed) and allowed range. ``softcache.cli`` builds each
command's options from them, :func:`check_settings` validates a config against them (every float
also for being finite), and :func:`load_settings` reads the same fields from a ``--config`` YAML or
JSON file. So a setting is declared once, in its config dataclass (softcache.config).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import re
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from softcache.errors import SoftcacheError

_SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)")


def parse_size(text: str) -> int | None:
    """A size such as ``20GiB``, ``1.5GB``, ``512 MiB`` or ``4096`` (bytes), decimal or binary units, in
    bytes; None if ``text`` is not one (negative, inf and nan are not)."""
    match = _SIZE.fullmatch(text.strip().lower())
    if match is None or match.group(2) not in ("", *_SIZE_UNITS):
        return None
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2) or "b"])

INT_LIMIT = 2**63 - 1
"""No integer setting may exceed this in size: numpy and torch take 64-bit integers, while click and
YAML read any Python int."""


@dataclass(frozen=True)
class Setting:
    """The command-line facts of one config field: its flag, help text, choices and range.

    :func:`setting` fills in the declared part; :func:`settings_of` binds each to its field (name, type,
    default), which is all ``softcache.cli`` needs to build the option.
    """

    # Declared with the field, by setting():
    help: str
    flag: str | None = None
    """The flag, e.g. ``--json``; default: ``--`` and the field name with dashes."""
    choices: Iterable[str] | Callable[[], Iterable[str]] | None = None
    """The allowed values: a registry (a dict's keys count), or a function returning one when the
    registry's module is slow to import."""
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    resumable: bool = False
    """May change when a training run is resumed (see RESUMABLE_CHANGES)."""
    # Bound to the field by settings_of():
    many: bool = False
    """The flag may be given several times (a ``str | list[str]`` field): one value is kept as a string,
    several as a list in the order given."""
    name: str = ""
    value_type: type = str
    """The value's type: str, int, float or bool (``X | None`` fields are ``optional``)."""
    optional: bool = False
    default: Any = None
    required: bool = False

    def choice_list(self) -> tuple[str, ...] | None:
        if self.choices is None:
            return None
        return tuple(self.choices() if callable(self.choices) else self.choices)

    def range_text(self) -> str | None:
        """The allowed range in words, as error messages say it: "at least 1", "in (0, 1]"."""
        low = ("[", self.ge) if self.ge is not None else ("(", self.gt) if self.gt is not None else None
        high = ("]", self.le) if self.le is not None else (")", self.lt) if self.lt is not None else None
        if low and high:
            if low[0] + high[0] == "[]":
                return f"between {low[1]} and {high[1]}"
            if low[0] + high[0] == "()":
                return f"between {low[1]} and {high[1]} (exclusive)"
            return f"in {low[0]}{low[1]}, {high[1]}{high[0]}"
        if low:
            return f"at least {low[1]}" if low[0] == "[" else f"greater than {low[1]}"
        if high:
            return f"at most {high[1]}" if high[0] == "]" else f"less than {high[1]}"
        return None

    def check(self, value: Any) -> None:
        """Raise :class:`SoftcacheError` naming the flag if ``value`` is not a choice, outside the range,
        an integer beyond 64 bits, or a float that is not finite. None (an optional field left unset)
        passes."""
        if value is None:
            return
        choices = self.choice_list()
        if choices is not None and value not in choices:
            raise SoftcacheError(f"{self.flag} must be one of {', '.join(choices)}, got {value!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return
        bounds = self.range_text()
        if isinstance(value, float) and not math.isfinite(value):
            raise SoftcacheError(f"{self.flag} must be {bounds} and finite, got {value}" if bounds
                                 else f"{self.flag} must be a finite number, got {value}")
        if ((self.ge is not None and not value >= self.ge) or (self.gt is not None and not value > self.gt)
                or (self.le is not None and not value <= self.le) or (self.lt is not None and not value < self.lt)):
            raise SoftcacheError(f"{self.flag} must be {bounds}, got {value}")
        if isinstance(value, int) and abs(value) > INT_LIMIT:
            raise SoftcacheError(f"{self.flag} must fit in 64 bits (at most {INT_LIMIT}), got {value}")

    def coerce(self, value: Any) -> Any:
        """``value`` as read from a YAML or JSON file, as this setting's type; ValueError says what was
        expected. Strict: 8.5 is not an integer and "yes" is not a boolean."""
        if value is None and self.optional:
            return None
        if self.value_type is bool and isinstance(value, bool):
            return value
        if self.value_type is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if self.value_type is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if self.value_type is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if self.value_type is str and isinstance(value, str):
            return value
        if self.many and isinstance(value, list) and value and all(isinstance(item, str) for item in value):
            return value[0] if len(value) == 1 else value
        expected = {bool: "true or false", int: "an integer", float: "a number",
                    str: "a string or a list of strings" if self.many else "a string"}[self.value_type]
        raise ValueError(f"must be {expected}{' or null' if self.optional else ''}, got {value!r}")


def setting(default: Any = dataclasses.MISSING, *, help: str, flag: str | None = None,
            choices: Iterable[str] | Callable[[], Iterable[str]] | None = None, ge: float | None = None,
            gt: float | None = None, le: float | None = None, lt: float | None = None,
            resumable: bool = False) -> Any:
    """A dataclass field that is also a command-line option (and a key of a ``--config`` file).

    ``help`` is the field's documentation and its ``--help`` text; ``choices`` the allowed values (a
    registry, or a function returning one); ``ge``/``gt``/``le``/``lt`` the allowed range, checked
    with every float also checked to be finite. No default makes the option required. Booleans
    become ``--x/--no-x`` when they default to True and a plain ``--x`` switch when they default to
    False.
    """
    spec = Setting(help=help, flag=flag, choices=choices, ge=ge, gt=gt, le=le, lt=lt, resumable=resumable)
    return dataclasses.field(default=default, metadata={"setting": spec})


@functools.cache
def settings_of(cls: type) -> tuple[Setting, ...]:
    """The :class:`Setting` of every field of ``cls`` made with :func:`setting`, in field order, bound to
    its field: name, flag, type, default, required."""
    hints = typing.get_type_hints(cls)
    bound = []
    for field in dataclasses.fields(cls):
        spec = field.metadata.get("setting")
        if spec is None:
            continue
        kind, optional, many = hints[field.name], False, False
        if typing.get_origin(kind) in (typing.Union, types.UnionType):
            args = [arg for arg in typing.get_args(kind) if arg is not type(None)]
            many = list[str] in args
            args = [arg for arg in args if arg != list[str]]
            kind, optional = args[0], len(args) + many < len(typing.get_args(kind))
        assert kind in (str, int, float, bool), f"{cls.__name__}.{field.name}: unsupported type {kind}"
        required = field.default is dataclasses.MISSING
        bound.append(dataclasses.replace(
            spec, name=field.name, flag=spec.flag or "--" + field.name.replace("_", "-"), value_type=kind,
            optional=optional, many=many, default=None if required else field.default, required=required))
    return tuple(bound)


def check_settings(config: Any) -> None:
    """Raise :class:`SoftcacheError` naming the flag of the first field of ``config`` whose value is not
    one of its choices, outside its range, or not finite."""
    for spec in settings_of(type(config)):
        spec.check(getattr(config, spec.name))


def load_settings(cls: type, path: str | Path) -> dict[str, Any]:
    """The settings of a YAML (``.yaml``, ``.yml``) or JSON (``.json``) file for the config class ``cls``,
    by field name, each typed and checked as its flag would be.

    The file is one mapping; a key is a field name or its flag's spelling (``seq_len``, ``seq-len``
    or ``--seq-len``). Raises :class:`SoftcacheError` naming the file and the problem: missing,
    unparseable, not a mapping, an unknown key (with the closest known one), a value of the wrong
    type or outside its range.
    """
    where = f"--config {path}"
    file = Path(path)
    if not file.exists():
        raise SoftcacheError(f"{where} does not exist")
    if not file.is_file():
        raise SoftcacheError(f"{where} is not a file")
    suffix = file.suffix.lower()
    try:
        text = file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise SoftcacheError(f"{where} is not UTF-8 text (byte {err.start} is {err.object[err.start]:#04x})") from None
    except OSError as err:
        raise SoftcacheError(f"{where} cannot be read ({err.strerror or err})") from None
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise SoftcacheError(f"{where} is not valid JSON: {err.msg} (line {err.lineno}, column {err.colno})") from None
    elif suffix in (".yaml", ".yml"):
        import yaml  # only a --config file needs it

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            problem = getattr(err, "problem", None) or " ".join(str(err).split())
            raise SoftcacheError(f"{where} is not valid YAML: {problem}{at}") from None
    else:
        raise SoftcacheError(f"{where}: give a .yaml, .yml or .json file, not {file.suffix or 'one without a suffix'}")
    if data is None:  # an empty YAML file sets nothing
        data = {}
    if not isinstance(data, dict):
        raise SoftcacheError(f"{where} must hold a mapping of settings to values, not a {type(data).__name__}")
    spellings = {}
    for spec in settings_of(cls):
        for spelling in (spec.name, spec.flag, spec.flag[2:], spec.flag[2:].replace("-", "_")):
            spellings[spelling] = spec
    values: dict[str, Any] = {}
    for key, value in data.items():
        spec = spellings.get(str(key))
        if spec is None:
            if (renamed := getattr(cls, "RENAMED", {}).get(str(key).replace("-", "_"))) is not None:
                raise SoftcacheError(f"{where}: {key!r} was replaced by {renamed}")
            close = difflib.get_close_matches(str(key).replace("-", "_"), [s.name for s in settings_of(cls)], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise SoftcacheError(f"{where}: unknown setting {key!r}{hint}")
        if spec.name in values:
            raise SoftcacheError(f"{where}: {spec.flag} is set twice")
        try:
            values[spec.name] = spec.coerce(value)
        except ValueError as err:
            raise SoftcacheError(f"{where}: {key} {err}") from None
        try:
            spec.check(values[spec.name])
        except SoftcacheError as err:
            raise SoftcacheError(f"{where}: {err}") from None
    return values
