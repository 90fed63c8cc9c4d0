"""Option tables: one per command, the single place its options are declared.

A command's :class:`Command` lists its :class:`Option` entries once; from that table come

* its argparse parser (:meth:`Command.add_parser`, :meth:`Command.add_options`),
* for a long-running command (``config_file=True``) its ``--config FILE`` keys: a TOML file
  whose keys are the long options with ``_`` for ``-`` (:meth:`Command.load_config`), every
  value checked against its option's kind, and the merge of file and command line
  (:meth:`Command.resolve`: the command line wins; a list given on the command line replaces
  the file's list),
* what the docs check compares with docs/ (:meth:`Command.long_options`, ``Command.doc``).

Every option is parsed as None ("not given") and gets its value in :meth:`Command.resolve`:
the command line's, else the file's, else the table's default. -v/-q are command-line only.

Kinds (what a value may be, on the command line as text and in a file as TOML):

========  ==========================================  ========================================
kind      command line                                file
========  ==========================================  ========================================
str       the text (``parse``, ``choices`` apply)      a string (or an integer, with parse)
int       a whole number                              an integer
count     a whole number of at least 1                such an integer
float     a number                                    an integer or a float (as float)
seconds   a positive number of seconds                a positive integer or float (as float)
size      bytes, or 64K, 512M, 50G, 1T                an integer >= 0, or such a string
port      0 to 65535, or ``off`` (:data:`OFF`)        such an integer, or the string "off"
bool      a flag (present: true)                      true or false
list      repeatable (``parse`` applies to each)      a list of strings, or one string
========  ==========================================  ========================================
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Literal

Kind = Literal["str", "int", "count", "float", "seconds", "size", "port", "bool", "list"]

#: A ``port`` option given as ``off``.
OFF = -1

SIZE_FORMS = "bytes, or a number with K, M, G or T (powers of 1024), e.g. 65536, 64M, 50G"

#: What a file value of each kind must be, for error messages.
KIND_TEXT: dict[str, str] = {
    "str": "a string", "int": "an integer", "count": "a whole number of at least 1",
    "float": "a number", "seconds": "a positive number of seconds",
    "size": 'a size (bytes as an integer, or a string like "64M" or "50G")',
    "port": 'a port number (0 to 65535) or "off"', "bool": "true or false",
    "list": "a list of strings",
}

#: Keys a config file may not have: -v/-q are command-line options only.
CLI_ONLY_KEYS = frozenset({"v", "q", "verbose", "quiet"})

#: Options every command has besides -v/-q (a key of its ``--config FILE`` too).
COMMON_OPTIONS: tuple[Option, ...] = ()  # set below, once Option exists

#: The attribute of a resolved namespace that holds the dests given explicitly.
_GIVEN = "_given_settings"
#: The attribute that keeps the namespace as parsed, before :meth:`Command.resolve`.
_RAW = "_parsed_settings"


def parse_bytes(text: str) -> int:
    """``64K``, ``512M``, ``20G``, ``1T`` or a number of bytes -> bytes. Raises ValueError
    naming the accepted forms."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        n = int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except (ValueError, OverflowError):
        n = -1
    if n < 0:
        raise ValueError(f"{text!r} is not a size: give {SIZE_FORMS}")
    return n


def parse_int(text: str) -> int:
    """A whole number. Raises ValueError."""
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number") from None


def parse_float(text: str) -> float:
    """A number. Raises ValueError."""
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None


def parse_count(text: str) -> int:
    """A whole number of at least 1. Raises ValueError."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{text!r} is not a whole number of at least 1")
    return n


def parse_seconds(text: str) -> float:
    """A positive number of seconds. Raises ValueError."""
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not v > 0:
        raise ValueError(f"{text!r} is not a positive number of seconds")
    return v


def parse_port(text: str) -> int:
    """A port 0..65535, or ``off`` (:data:`OFF`). Raises ValueError."""
    if text.strip().lower() == "off":
        return OFF
    try:
        n = int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a port (0 to 65535, or off)") from None
    if not 0 <= n < 65536:
        raise ValueError(f"port {n} out of range")
    return n


def _argtype(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` as an argparse type: its ValueError message, not argparse's."""
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return convert


_TEXT_PARSERS: dict[str, Callable[[str], Any]] = {
    "int": parse_int, "count": parse_count, "float": parse_float, "seconds": parse_seconds,
    "size": parse_bytes, "port": parse_port,
}


@dataclass(frozen=True)
class Option:
    """One option of a command (or, with ``positional``, one of its arguments).

    ``name``: the long option without ``--`` (``hot-size``), or a positional's name.
    ``kind``: see the module docstring. ``default``: the value when neither the command line
    nor the file gives one. ``dest``: the settings field (default: ``name`` with ``_``).
    ``config``: a key of ``--config FILE`` (when the command takes one). ``aliases``: more
    spellings of its file key. ``parse``: for ``str`` and ``list`` options, text -> value
    (raises ValueError with a message for the user). ``group``: the ``--help`` section.
    ``nargs``: a positional's argparse ``nargs``.
    """

    name: str
    kind: Kind = "str"
    default: Any = None
    help: str = ""
    metavar: str | None = None
    dest: str = ""
    config: bool = True
    aliases: tuple[str, ...] = ()
    choices: tuple[str, ...] = ()
    parse: Callable[[str], Any] | None = None
    required: bool = False
    group: str | None = None
    positional: bool = False
    nargs: str | None = None

    def __post_init__(self) -> None:
        if not self.dest:
            object.__setattr__(self, "dest", self.name.replace("-", "_"))

    @property
    def flag(self) -> str:
        """``--name`` (a positional: its name)."""
        return self.name if self.positional else f"--{self.name}"

    @property
    def key(self) -> str:
        """The config-file key: the long option with ``_`` for ``-``."""
        return self.name.replace("-", "_")

    def _text_parser(self) -> Callable[[str], Any] | None:
        if self.kind in ("str", "list"):
            return self.parse
        return _TEXT_PARSERS.get(self.kind)

    def add_to(self, parser: Any, *, suppress: bool = False, required: bool = False) -> None:
        """Add this option to ``parser`` (an ArgumentParser or argument group), parsed as
        None when not given; ``suppress``: absent from the namespace when not given (an
        option repeated on a subcommand's parser); ``required``: argparse refuses a command
        line without it."""
        help_text = self.help.replace("%", "%%")
        if self.positional:
            kw: dict[str, Any] = {"help": help_text}
            if self.nargs is not None:
                kw["nargs"] = self.nargs
            if self.metavar is not None:
                kw["metavar"] = self.metavar
            parser.add_argument(self.dest, **kw)
            return
        kw = {"dest": self.dest, "help": help_text,
              "default": argparse.SUPPRESS if suppress else None}
        if required:
            kw["required"] = True
        if self.kind == "bool":
            parser.add_argument(self.flag, action="store_true", **kw)
            return
        parse = self._text_parser()
        if parse is not None:
            kw["type"] = _argtype(parse)
        if self.kind == "list":
            kw["action"] = "append"
        if self.choices:
            kw["choices"] = self.choices
        if self.metavar is not None:
            kw["metavar"] = self.metavar
        parser.add_argument(self.flag, **kw)

    def from_file(self, path: str, key: str, value: Any) -> Any:
        """``value`` of setting ``key`` in config file ``path``, checked against the kind and
        converted. Raises ValueError naming the file and the setting."""
        ok = True
        kind = self.kind
        if kind == "str":
            if (self.parse is not None and isinstance(value, int)
                    and not isinstance(value, bool)):
                value = str(value)  # a number where a parsed text takes one (workers = 2)
            ok = isinstance(value, str)
        elif kind == "bool":
            ok = isinstance(value, bool)
        elif kind in ("int", "count"):
            ok = isinstance(value, int) and not isinstance(value, bool)
            ok = ok and (kind == "int" or value >= 1)
        elif kind in ("float", "seconds"):
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            ok = ok and (kind == "float" or value > 0)
            value = float(value) if ok else value
        elif kind == "size":
            if isinstance(value, str):
                try:
                    value = parse_bytes(value)
                except ValueError:
                    ok = False
            ok = ok and isinstance(value, int) and not isinstance(value, bool) and value >= 0
        elif kind == "port":
            if isinstance(value, str) and value.strip().lower() == "off":
                value = OFF
            ok = isinstance(value, int) and not isinstance(value, bool) and (
                value == OFF or 0 <= value < 65536)
        elif kind == "list":
            if isinstance(value, str):
                value = [value]  # a single string is a one-element list
            ok = isinstance(value, list) and all(isinstance(x, str) for x in value)
        if not ok:
            raise ValueError(f"{path}: setting {key!r} must be {KIND_TEXT[kind]}, "
                             f"got {value!r}")
        if self.choices and value not in self.choices:
            raise ValueError(f"{path}: setting {key!r} must be one of "
                             f"{', '.join(self.choices)}, got {value!r}")
        if self.parse is not None and kind in ("str", "list"):
            try:
                value = ([self.parse(x) for x in value] if kind == "list"
                         else self.parse(value))
            except ValueError as e:
                raise ValueError(f"{path}: setting {key!r}: {e}") from e
        return value


COMMON_OPTIONS = (
    Option("log-format", default="text", choices=("text", "json"), metavar="text|json",
           group="logging",
           help="log lines as key=value text (default) or one JSON object each; every line "
                "has an event key and a timestamp with its UTC offset"),
)


@dataclass(frozen=True)
class Command:
    """A command's table: its name (``serve``, ``pxe serve``), texts for ``--help``
    (``epilog``: examples, every command has one), its options in ``--help`` order, the docs
    page that documents every one of them (``doc``, in docs/), and whether it takes
    ``--config FILE``."""

    name: str
    summary: str
    description: str
    epilog: str
    options: tuple[Option, ...]
    doc: str
    config_file: bool = False

    @property
    def prog(self) -> str:
        return f"icbd-cache {self.name}"

    @property
    def all_options(self) -> tuple[Option, ...]:
        """The table's options and the ones every command has (:data:`COMMON_OPTIONS`)."""
        return self.options + COMMON_OPTIONS

    def long_options(self) -> list[str]:
        """Every long option of the command, ``--config`` included, without --help/-v/-q."""
        flags = [o.flag for o in self.all_options if not o.positional]
        return flags + (["--config"] if self.config_file else [])

    def config_keys(self) -> dict[str, Option]:
        """Config-file key (aliases included) -> its option. Empty without ``config_file``."""
        if not self.config_file:
            return {}
        keys: dict[str, Option] = {}
        for o in self.all_options:
            if o.config and not o.positional:
                keys[o.key] = o
                keys.update(dict.fromkeys(o.aliases, o))
        return keys

    def option(self, dest: str) -> Option:
        """The option whose dest is ``dest``. Raises KeyError."""
        for o in self.all_options:
            if o.dest == dest:
                return o
        raise KeyError(dest)

    # ------------------------------------------------------------------ argparse

    def add_options(self, parser: argparse.ArgumentParser, *, suppress: bool = False) -> None:
        """Add the table's options to ``parser``, in sections by ``group``; ``--config FILE``
        for a long-running command; -v/-q."""
        groups: dict[str | None, Any] = {None: parser}
        for o in self.all_options:
            if o.group not in groups:
                groups[o.group] = parser.add_argument_group(o.group)
            # a required option may come from the file: checked in resolve() then
            o.add_to(groups[o.group], suppress=suppress,
                     required=o.required and not self.config_file and not suppress)
        if self.config_file:
            parser.add_argument(
                "--config", metavar="FILE", default=argparse.SUPPRESS if suppress else None,
                help="TOML file with the same settings: keys are the long options with _ "
                     f"(see docs/{self.doc}); options given on the command line win, and a "
                     "list given on the command line replaces the file's")
        parser.add_argument("-v", "--verbose", action="count",
                            default=argparse.SUPPRESS if suppress else 0, help="more log output")
        parser.add_argument("-q", "--quiet", action="store_true",
                            default=argparse.SUPPRESS if suppress else False,
                            help="warnings and errors only")

    def add_parser(self, sub: Any, handler: Callable[[argparse.Namespace], int]
                   ) -> argparse.ArgumentParser:
        """Add the command to ``sub`` (argparse subparsers); its ``func`` resolves the
        settings (:meth:`resolve`) and calls ``handler``, or prints why not and returns 2."""
        p: argparse.ArgumentParser = sub.add_parser(
            self.name.split()[-1], help=self.summary, description=self.description,
            epilog=self.epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
        self.add_options(p)
        p.set_defaults(func=partial(_run, self, handler))
        return p

    # ------------------------------------------------------------------ settings

    def load_config(self, path: str) -> dict[str, Any]:
        """The settings of TOML file ``path`` by dest, each checked. Raises ValueError naming
        the file (and the setting)."""
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except OSError as e:
            raise ValueError(f"--config {path}: {e.strerror or e}") from e
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a valid TOML file: {e}") from e
        cli_only = sorted(set(raw) & CLI_ONLY_KEYS)
        if cli_only:
            raise ValueError(f"{path}: {', '.join(cli_only)}: -v/-q are command-line options "
                             "only")
        keys = self.config_keys()
        unknown = sorted(set(raw) - set(keys))
        if unknown:
            known = [o.key for o in self.all_options if o.config and not o.positional]
            raise ValueError(f"{path}: unknown settings {', '.join(unknown)} "
                             f"(known: {', '.join(known)})")
        out: dict[str, Any] = {}
        given: dict[str, str] = {}
        for key, value in raw.items():
            option = keys[key]
            if option.dest in given:
                raise ValueError(f"{path}: {given[option.dest]!r} and {key!r} are the same "
                                 "setting; give one")
            given[option.dest] = key
            out[option.dest] = option.from_file(path, key, value)
        return out

    def resolve(self, args: argparse.Namespace) -> None:
        """Give every option of ``args`` (as parsed) its value: the command line's, else the
        ``--config`` file's, else the default; record which were given (:func:`given`).
        Raises ValueError for the user (a bad file, a required option missing)."""
        path = getattr(args, "config", None) if self.config_file else None
        file = self.load_config(path) if path else {}
        explicit: set[str] = set()
        for o in self.all_options:
            if o.positional:
                continue
            value = getattr(args, o.dest, None)
            if value is None and o.dest in file:
                value = file[o.dest]
            if value is not None:
                explicit.add(o.dest)
            else:
                value = o.default
                if o.required:
                    where = f" (or {o.key} in --config FILE)" if self.config_file else ""
                    raise ValueError(f"{o.flag} is required{where}")
            setattr(args, o.dest, value)
        setattr(args, _GIVEN, frozenset(explicit))


def reresolve(command: Command, args: argparse.Namespace) -> argparse.Namespace:
    """The settings of ``args`` (resolved by :func:`_run`) resolved again from the same
    command line and the ``--config`` file as it is now (SIGHUP). Raises ValueError for the
    user (a bad file)."""
    raw = getattr(args, _RAW, None)
    if raw is None:
        raise ValueError("the command line was not kept")
    fresh = argparse.Namespace(**vars(raw))
    command.resolve(fresh)
    return fresh


def given(args: argparse.Namespace) -> frozenset[str]:
    """The dests set on the command line or in the config file (after
    :meth:`Command.resolve`)."""
    return frozenset(getattr(args, _GIVEN, frozenset()))


def prefixed(options: Iterable[Option], prefix: str, *, group: str | None = None,
             **changes: dict[str, Any]) -> tuple[Option, ...]:
    """``options`` renamed ``--PREFIX-NAME`` (dest and key follow), not required, in
    ``group``; ``changes``: per original name (``_`` for ``-``), more fields to replace."""
    out = []
    for o in options:
        extra = changes.get(o.name.replace("-", "_"), {})
        out.append(replace(o, name=f"{prefix}{o.name}", dest=f"{prefix}{o.name}".replace(
            "-", "_"), required=False, group=group, **extra))
    return tuple(out)


def _run(command: Command, handler: Callable[[argparse.Namespace], int],
         args: argparse.Namespace) -> int:
    """Resolve the settings of ``command``, then run ``handler``."""
    from icbdcache import log as logsetup

    setattr(args, _RAW, argparse.Namespace(**vars(args)))
    try:
        command.resolve(args)
    except ValueError as e:
        print(f"{command.prog}: {e}", file=sys.stderr)
        return 2
    logsetup.setup(-1 if getattr(args, "quiet", False) else getattr(args, "verbose", 0),
                   args.log_format)
    return int(handler(args))
