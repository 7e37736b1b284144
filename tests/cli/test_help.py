"""``--version`` on every command; help and a default for every option; no RST in ``--help``."""

from __future__ import annotations

import argparse
import re

import pytest

from confide import __version__
from confide.cli import build_parser
from confide.cli import main as confide_main
from confide_server.cli import build_parser as build_server_parser
from confide_server.cli import main as server_main
from confide_server.ledger_cli import build_ledger_parser
from confide_server.simulate import build_simulate_parser
from tests.cli.conftest import SERVER, run

COMMANDS = [
    ["confide"],
    ["confide", "client"],
    ["confide", "init-model"],
    ["confide", "export"],
    ["confide", "identity"],
    ["confide", "provision"],
    ["confide", "provision", "init"],
    ["confide", "provision", "sign"],
    ["confide", "provision", "tls"],
    ["confide-server"],
    ["confide-server", "run"],
    ["confide-server", "enroll"],
    ["confide-server", "status"],
    ["confide-server", "simulate"],
    ["confide-server", "ledger"],
    ["confide-server", "ledger", "verify"],
    ["confide-server", "ledger", "receipt"],
    ["confide-server", "abort"],
    ["confide-server", "revoke"],
    ["confide-server", "new-job"],
]


def _run(cmd: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    main = confide_main if cmd[0] == "confide" else server_main
    with pytest.raises(SystemExit) as info:
        main(cmd[1:])
    assert info.value.code == 0
    return capsys.readouterr().out


def _parsers() -> list[argparse.ArgumentParser]:
    out = [build_simulate_parser()]
    for top in (build_parser(), build_server_parser(), build_ledger_parser()):
        out.append(top)
        for action in top._actions:
            if isinstance(action, argparse._SubParsersAction):
                out.extend(p for p in action.choices.values() if p.add_help)
    return out


@pytest.mark.parametrize("cmd", COMMANDS, ids=" ".join)
def test_version_on_every_command(cmd: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    out = _run([*cmd, "--version"], capsys)
    assert re.fullmatch(rf"{cmd[0]}( \S+)* {re.escape(__version__)}\n", out), out


def test_version_from_the_installed_command() -> None:
    r = run([*SERVER, "simulate", "--version"])
    assert (r.rc, r.out) == (0, f"confide-server {__version__}\n")


def test_every_option_has_help_and_shows_its_default() -> None:
    for parser in _parsers():
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help, f"{parser.prog} {action.option_strings}: no help"
            text = parser.format_help()
            if action.default not in (None, False, argparse.SUPPRESS) and action.option_strings:
                assert "(default:" in action.help or issubclass(
                    parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter
                ), f"{parser.prog} {action.option_strings}: default not shown"
            assert text


@pytest.mark.parametrize("cmd", COMMANDS, ids=" ".join)
def test_help_has_no_rst_markup(cmd: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    out = _run([*cmd, "--help"], capsys)
    for markup in ("``", ":class:", ":func:", ":mod:", ":meth:", "**"):
        assert markup not in out, f"{markup!r} in {' '.join(cmd)} --help"
    assert "(default: None)" not in out
