"""Every command the README, docs/ and the --help examples print parses as written, names repository files that
exist, and a code block does not send two commands into one output folder that the second would refuse.

Running each at its printed budget would take hours; the commands' behaviour is tested where each is built. This
holds what a reader copies: flags that exist, values the parser takes, paths that are there.
"""

import re
import shlex
from pathlib import Path

import pytest

from nas.cli import PARSERS

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "experiments").glob("*/README.md"))]
REPO_PATH = re.compile(r"^(configs|experiments|search_spaces|scripts)/\S+")
WRITES_A_NEW_FOLDER = ("export", "finetune", "slim")  # refuse an --out that holds files (without --force)


def doc_blocks() -> list[tuple[str, list[str]]]:
    """(where, commands) of every fenced block in the docs that holds nas-* commands."""
    blocks = []
    for path in DOCS:
        for number, block in enumerate(re.findall(r"```[^\n]*\n(.*?)```", path.read_text(), re.S)):
            commands = commands_in(block)
            if commands:
                blocks.append((f"{path.relative_to(ROOT)} block {number}", commands))
    return blocks


def help_blocks() -> list[tuple[str, list[str]]]:
    """(where, commands) of each command's --help examples."""
    blocks = []
    for name, build in PARSERS.items():
        epilog = build().epilog or ""
        examples = re.split(r"\nexamples?:\n", epilog)
        if len(examples) > 1:
            blocks.append((f"nas-{name} --help", commands_in(examples[1])))
    return blocks


def commands_in(text: str) -> list[str]:
    """The nas-* command lines of `text` (a `$ ` prompt dropped, `\\` continuations joined)."""
    text = re.sub(r"\\\n\s*", " ", text)
    lines = [line.strip().removeprefix("$ ") for line in text.splitlines()]
    return [line for line in lines if line.startswith("nas-") and " [" not in line]  # not a usage synopsis


BLOCKS = doc_blocks() + help_blocks()
COMMANDS = [(where, command) for where, commands in BLOCKS for command in commands]


def test_the_docs_and_helps_print_commands_of_every_kind():
    names = {shlex.split(command)[0] for _, command in COMMANDS}
    assert {f"nas-{name}" for name in PARSERS} <= names  # the collection itself works


@pytest.mark.parametrize(("where", "command"), COMMANDS, ids=[f"{w}: {c[:60]}" for w, c in COMMANDS])
def test_a_printed_command_parses_and_names_files_that_exist(where, command):
    tokens = shlex.split(command, comments=True)
    name = tokens[0].removeprefix("nas-")
    assert name in PARSERS, f"{where}: no command {tokens[0]}"
    try:
        PARSERS[name]().parse_args(tokens[1:])
    except SystemExit as exc:
        pytest.fail(f"{where}: {command!r} is refused by its parser (exit {exc.code})")
    for token in tokens[1:]:
        for part in token.split("="):  # --factor NAME=FILE, --set KEY=VALUE
            if REPO_PATH.match(part):
                assert (ROOT / part).exists(), f"{where}: {command!r} names {part}, which is not in the repository"


@pytest.mark.parametrize(("where", "commands"), BLOCKS, ids=[where for where, _ in BLOCKS])
def test_a_block_does_not_send_two_commands_into_one_new_folder(where, commands):
    outs = []
    for command in commands:
        tokens = shlex.split(command, comments=True)
        name = tokens[0].removeprefix("nas-")
        if name in WRITES_A_NEW_FOLDER:
            outs.append(str(Path(PARSERS[name]().parse_args(tokens[1:]).out)))
    assert len(outs) == len(set(outs)), f"{where}: the second command into the same --out is refused: {outs}"
