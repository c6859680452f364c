"""Every option of every ``cascade`` command says what it does in --help."""

from __future__ import annotations

import argparse

from devstack.cli import _parser


def test_every_option_of_every_command_has_help_text() -> None:
    parser = _parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    missing = [
        f"cascade {name} {'/'.join(action.option_strings) or action.dest}"
        for name, command in sub.choices.items()
        for action in command._actions
        if not isinstance(action, argparse._HelpAction) and not action.help
    ]
    assert missing == []
    assert all(command.description or name == "loadtest" for name, command in sub.choices.items())
