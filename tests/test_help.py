"""Every script's --help explains every flag, and its example commands survive as written."""
from __future__ import annotations

import argparse
import importlib
import re

import pytest

from humback import flags

# script -> the parser builder it parses its flags with (humback/flags.py); the help text is the script's docstring
SCRIPTS = {"train": flags.train_parser, "generate": flags.generate_parser, "curate": flags.curate_parser,
           "evaluate": flags.evaluate_parser, "pipeline": flags.pipeline_parser}


def script_parser(name: str) -> argparse.ArgumentParser:
    return SCRIPTS[name](importlib.import_module(name).__doc__)


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_flag_has_help(name: str) -> None:
    parser = script_parser(name)
    missing = [a.option_strings or [a.dest] for a in parser._actions
               if not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()]
    assert not missing, f"{name}.py: flags without help: {missing}"


@pytest.mark.parametrize("name", SCRIPTS)
def test_example_commands_keep_their_line_breaks(name: str) -> None:
    # A lone backslash at a line's end inside a docstring joins the two lines (Python reads it
    # as a line continuation), so "cmd \<newline>    --flag" prints as "cmd     --flag".
    text = script_parser(name).format_help()
    joined = [line for line in text.splitlines() if re.search(r"\S {4,}--\w", line)]
    assert not joined, f"{name}.py --help: a continued command lost its line break: {joined}"
