"""The option tables (icbdcache.commands.options): one table per command gives its parser,
its ``--config FILE`` keys and their checks, and the merge of file and command line.

In-process: parsers are built and resolved without running any command.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from icbdcache.cli import COMMANDS, build_parser
from icbdcache.commands.options import OFF, Command, Option, given, parse_bytes

LONG_RUNNING = ("serve", "master", "replica", "pxe serve")

TOY = Command(
    "toy", "a command to test tables", "A toy.", "example:\n  toy --name x",
    (Option("name", required=True, metavar="NAME"),
     Option("level", "int", default=3),
     Option("jobs", "count", default=1),
     Option("ratio", "float", default=0.5),
     Option("wait", "seconds", default=2.0),
     Option("bound", "size", dest="bound_bytes", aliases=("bound_bytes",)),
     Option("port", "port", default=69),
     Option("fast", "bool", default=False),
     Option("tag", "list", parse=str.upper),
     Option("mode", default="a", choices=("a", "b")),
     Option("secret", config=False)),
    doc="toy.md", config_file=True)


def toy_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toy")
    TOY.add_options(parser)
    return parser


def resolve(argv: list[str], command: Command = TOY) -> argparse.Namespace:
    """``argv`` parsed and resolved by ``command`` (TOY, or a real one by name)."""
    if command is TOY:
        args = toy_parser().parse_args(argv)
    else:
        args = build_parser().parse_args([*command.name.split(), *argv])
    command.resolve(args)
    return args


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_defaults_and_command_line() -> None:
    args = resolve(["--name", "n"])
    assert (args.level, args.jobs, args.ratio, args.wait, args.bound_bytes, args.port,
            args.fast, args.tag, args.mode) == (3, 1, 0.5, 2.0, None, 69, False, None, "a")
    assert given(args) == {"name"}
    args = resolve(["--name", "n", "--level", "-2", "--jobs", "4", "--bound", "2M", "--port",
                    "off", "--fast", "--tag", "x", "--tag", "y", "--mode", "b"])
    assert (args.level, args.jobs, args.bound_bytes, args.port, args.fast, args.tag,
            args.mode) == (-2, 4, 2 << 20, OFF, True, ["X", "Y"], "b")
    assert given(args) == {"name", "level", "jobs", "bound_bytes", "port", "fast", "tag", "mode"}


@pytest.mark.parametrize(("argv", "message"), [
    (["--level", "x"], "'x' is not a whole number"),
    (["--ratio", "1/2"], "'1/2' is not a number"),
    (["--jobs", "0"], "'0' is not a whole number of at least 1"),
    (["--wait", "0"], "'0' is not a positive number of seconds"),
    (["--bound", "12Q"], "'12Q' is not a size"),
    (["--port", "70000"], "port 70000 out of range"),
    (["--mode", "c"], "invalid choice: 'c'"),
])
def test_command_line_values_are_checked(argv: list[str], message: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        toy_parser().parse_args(["--name", "n", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_file_fills_what_the_command_line_does_not_give(tmp_path: Path) -> None:
    conf = write(tmp_path / "t.toml", 'name = "f"\nlevel = 9\njobs = 2\nratio = 1\nwait = 3\n'
                                      'bound = "1K"\nport = "off"\nfast = true\n'
                                      'tag = ["a", "b"]\nmode = "b"\n')
    args = resolve(["--config", conf])
    assert (args.name, args.level, args.jobs, args.ratio, args.wait, args.bound_bytes,
            args.port, args.fast, args.tag, args.mode) == (
        "f", 9, 2, 1.0, 3.0, 1024, OFF, True, ["A", "B"], "b")
    assert isinstance(args.ratio, float)
    args = resolve(["--config", conf, "--level", "1", "--tag", "c", "--name", "cli"])
    assert (args.name, args.level, args.tag, args.jobs) == ("cli", 1, ["C"], 2)


def test_required_may_come_from_the_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"--name is required \(or name in --config FILE\)"):
        resolve([])
    assert resolve(["--config", write(tmp_path / "t.toml", 'name = "f"\n')]).name == "f"


@pytest.mark.parametrize(("setting", "message"), [
    ('level = "x"', "setting 'level' must be an integer, got 'x'"),
    ("level = true", "setting 'level' must be an integer, got True"),
    ("jobs = 0", "setting 'jobs' must be a whole number of at least 1, got 0"),
    ("ratio = false", "setting 'ratio' must be a number, got False"),
    ("wait = 0", "setting 'wait' must be a positive number of seconds, got 0"),
    ('bound = "lots"', "setting 'bound' must be a size"),
    ("port = 65536", "setting 'port' must be a port number (0 to 65535) or \"off\", got 65536"),
    ('port = "on"', "setting 'port' must be a port number"),
    ('fast = "yes"', "setting 'fast' must be true or false, got 'yes'"),
    ("tag = [1]", "setting 'tag' must be a list of strings, got [1]"),
    ('mode = "c"', "setting 'mode' must be one of a, b, got 'c'"),
    ('secret = "s"', "unknown settings secret (known: name, level, jobs, ratio, wait, bound, "
                     "port, fast, tag, mode, log_format)"),
    ("bound = 1\nbound_bytes = 2", "'bound' and 'bound_bytes' are the same setting; give one"),
    ("quiet = true", "quiet: -v/-q are command-line options only"),
    ("name = [", "not a valid TOML file"),
])
def test_file_values_are_checked(tmp_path: Path, setting: str, message: str) -> None:
    conf = write(tmp_path / "t.toml", f'name = "n"\n{setting}\n' if "name" not in setting
                 else f"{setting}\n")
    with pytest.raises(ValueError) as e:
        resolve(["--config", conf])
    assert str(e.value).startswith(f"{conf}: "), e.value
    assert message in str(e.value)


def test_parse_errors_in_a_file_name_the_setting(tmp_path: Path) -> None:
    conf = write(tmp_path / "s.toml", 'listen = ["127.0.0.1:99999"]\nexport = "lab"\n')
    serve = next(c for c in COMMANDS if c.name == "serve")
    with pytest.raises(ValueError, match=r"s\.toml: setting 'listen': bad port"):
        serve.load_config(conf)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"--config .*nope\.toml: No such file"):
        resolve(["--config", str(tmp_path / "nope.toml")])


def test_parse_bytes() -> None:
    assert [parse_bytes(t) for t in ("0", "65536", "64K", "1.5M", "2GiB", "1t")] == [
        0, 65536, 64 << 10, 3 << 19, 2 << 30, 1 << 40]
    for bad in ("", "-1", "12Q", "M"):
        with pytest.raises(ValueError, match="is not a size"):
            parse_bytes(bad)


# ---------------------------------------------------------------------- the real tables

def table(name: str) -> Command:
    return next(c for c in COMMANDS if c.name == name)


def test_long_running_commands_take_every_long_option_as_a_key() -> None:
    for c in COMMANDS:
        assert c.config_file is (c.name in LONG_RUNNING), c.name
    for name in LONG_RUNNING:
        c = table(name)
        keys = {o.key for o in c.all_options if not o.positional and o.config}
        assert {f"--{k.replace('_', '-')}" for k in keys} | {"--config"} == set(
            c.long_options()), name
        assert set(c.config_keys()) >= keys


#: A value for every option of the long-running commands that differs from its default: by
#: option name where the kind alone does not make a good one, else by kind.
SAMPLES_BY_NAME: dict[str, Any] = {
    "listen": ["127.0.0.1:1234"], "export": ["lab=/srv/lab.img,cow"],
    "compress": "zstd:5", "ip": "dhcp", "overlay": "none", "pxe-ip": "dhcp",
    "tls-identity": "subject",
    "pxe-overlay": "tmpfs:1g", "subscribe": ["lab", "exam"], "pull-parallel": 5,
    "pull-batch": 128, "pxe-tftp-port": "off", "tftp-port": 0, "http-port": "off",
    "pxe-http-port": 8088, "allow": ["10.0.0.0/8", "192.168.1.7/32"],
    "pxe-allow": ["10.1.0.0/16"], "metrics-listen": "127.0.0.1:9810",
    "master": "https://master:10810", "workers": "3",
}
SAMPLES_BY_KIND: dict[str, Any] = {
    "str": "text", "int": 7, "count": 2, "float": 1.5, "seconds": 2.5, "size": "64M",
    "port": 8081, "bool": True, "list": ["a", "b"],
}


def sample(c: Command, o: Option) -> Any:
    if o.name == "listen" and c.name != "serve":
        return "127.0.0.1:1234" if c.name == "master" else "127.0.0.2"
    return SAMPLES_BY_NAME.get(o.name, SAMPLES_BY_KIND[o.kind])


def as_argv(c: Command) -> list[str]:
    argv: list[str] = []
    for o in c.options:
        v = sample(c, o)
        if o.kind == "bool":
            argv.append(o.flag)
        elif o.kind == "list":
            for x in v:
                argv += [o.flag, x]
        else:
            argv += [o.flag, str(v)]
    return argv


def as_toml(c: Command) -> str:
    return "".join(f"{o.key} = {json.dumps(sample(c, o))}\n" for o in c.options)


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_a_file_with_every_key_equals_the_command_line(name: str, tmp_path: Path) -> None:
    """Every long option as a file key sets what the option sets on the command line, and
    none is left at its default."""
    c = table(name)
    from_cli = resolve(as_argv(c), c)
    conf = write(tmp_path / f"{name.replace(' ', '-')}.toml", as_toml(c))
    from_file = resolve(["--config", conf], c)
    for o in c.options:
        got = getattr(from_file, o.dest)
        assert got == getattr(from_cli, o.dest), o.name
        assert got is not None and got != o.default, o.name
    assert given(from_file) == given(from_cli) == {o.dest for o in c.options}
