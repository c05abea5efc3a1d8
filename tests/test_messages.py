"""Every message that advises an action names a config key, a flag or a command that exists.

The walk reads every string of the package's source (error messages and their f-string templates, warnings,
notices, --help texts; docstrings are left out) with ``ast`` and checks:

- each ``--flag`` against the option strings of the ``dagman`` parser (all commands); in a command's own module,
  against that command's options, and after a quoted ```dagman CMD ...``` / ``'dagman CMD ...'``, against CMD's;
- each dotted config key (``data.batch_size``, ``train.total_steps=...``) against :func:`dagman.config.config_keys`;
- each bare config field name that advice names (``raise samples_per_volume``, ``set crop_size ...``): it must be
  spelled with its section (``data.samples_per_volume``), the only form ``KEY=VALUE`` accepts;
- each quoted command (```dagman export```, ``'dagman data prepare'``) against the parser's commands.
"""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path


import dagman
from dagman.cli import COMMANDS, build_parser
from dagman.config import config_keys

SRC = Path(dagman.__file__).parent

#: flags of other programs that the project's texts name on purpose, per file
FOREIGN_FLAGS = {
    "commands/pretrain.py": {"--standalone", "--nproc_per_node", "--nnodes", "--node_rank", "--rdzv_backend",
                             "--rdzv_endpoint", "--rdzv_id", "--master_addr", "--master_port"},  # torchrun
    "data/examples.py": {"--no-deps", "--no-input", "--disable-pip-version-check", "--no-binary", "--target",
                         "--no-build-isolation", "--only-binary", "--dest", "--quiet", "--index-url"},  # pip
}
#: file names that look like dotted keys
FILE_SUFFIXES = ("safetensors", "json", "jsonl", "yaml", "yml", "py", "pt", "md", "png", "csv", "npz", "npy", "html")

FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9_-]*[a-z0-9])")
SECTIONS = "model|sa|data|mask|heads|loss|optim|ema|train"
KEY = re.compile(rf"(?<![\w.])((?:{SECTIONS})\.[a-z_][a-z0-9_]*)(?![\w(])(?!\.[a-z])")
QUOTED_COMMAND = re.compile(r"[`']dagman ([a-z][a-z-]*)(?: ([a-z][a-z-]*))?([^`'\n]*)")
ADVICE = re.compile(r"\b(raise|lower|set|use|increase|decrease|reduce|change|try|pass|give|pick|choose)\b(\s+\S+){0,2}\s*$")
IDENT = re.compile(r"(?<![\w.\-])([a-z]+(?:_[a-z0-9]+)+)(?![\w.(=\-])")


def _parsers() -> dict[str, set[str]]:
    """``{"": top-level options, "pretrain": {...}, "data prepare": {...}, ...}``."""
    found: dict[str, set[str]] = {}

    def walk(parser: argparse.ArgumentParser, name: str) -> None:
        found[name] = {o for a in parser._actions for o in a.option_strings}
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    walk(sub, f"{name} {sub_name}".strip())

    walk(build_parser(), "")
    return found


PARSERS = _parsers()
ALL_FLAGS = set().union(*PARSERS.values())
KEYS = set(config_keys())
FIELDS = {k.split(".", 1)[1] for k in KEYS if "." in k}
MODULE_COMMAND = {module: f"{group} {name}" if group else name for group, name, module in COMMANDS}


def _strings(tree: ast.AST):
    """``(line, text)`` for every string constant and f-string template (``{}`` for each field), no docstrings."""
    docstrings, parts = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                docstrings.add(id(first.value))
        if isinstance(node, ast.JoinedStr):
            parts.update(id(v) for v in node.values)
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            yield node.lineno, "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings | parts:
            yield node.lineno, node.value


def _command_of(words: tuple[str, str | None]) -> str | None:
    a, b = words
    if b and f"{a} {b}" in PARSERS:
        return f"{a} {b}"
    return a if a in PARSERS else None


def message_problems(root: Path = SRC) -> list[str]:
    """One line per wrong name in the strings of the ``.py`` files under ``root`` (the package by default)."""
    problems = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        module = "dagman." + ".".join(path.relative_to(root).with_suffix("").parts)
        own = MODULE_COMMAND.get(module)
        foreign = FOREIGN_FLAGS.get(rel, set())
        for line, text in _strings(ast.parse(path.read_text(encoding="utf-8"))):
            where = f"{rel}:{line}"
            keys = {m.group(1) for m in KEY.finditer(text)}
            for flag in FLAG.findall(text):
                if flag not in ALL_FLAGS and flag not in foreign:
                    problems.append(f"{where}: names the flag {flag}, which no dagman command has")
            if own is not None:  # outside a quoted `dagman OTHER ...`, a flag is this module's command's
                for flag in FLAG.findall(QUOTED_COMMAND.sub("", text)):
                    if flag in ALL_FLAGS and flag not in PARSERS[own] | PARSERS[""]:
                        problems.append(f"{where}: names {flag}, which 'dagman {own}' (this module's command) lacks")
            for key in keys:
                if key.rsplit(".", 1)[1] in FILE_SUFFIXES:
                    continue
                if key not in KEYS:
                    problems.append(f"{where}: names the config key {key}, which does not exist")
            dotted = {k.split(".", 1)[1] for k in keys}
            for m in IDENT.finditer(text):
                name = m.group(1)
                # advice ("raise samples_per_volume", "set crop_size to ...") must name a key a user can set
                if name in FIELDS and name not in dotted and ADVICE.search(text[max(0, m.start() - 30):m.start()]):
                    problems.append(f"{where}: names the config field '{name}' without its section "
                                    f"(write {' or '.join(sorted(k for k in KEYS if k.endswith('.' + name)))})")
            for m in QUOTED_COMMAND.finditer(text):
                command = _command_of((m.group(1), m.group(2)))
                if command is None:
                    problems.append(f"{where}: names the command 'dagman {m.group(1)}', which does not exist")
                    continue
                for flag in FLAG.findall(m.group(3)):
                    if flag not in PARSERS[command] | PARSERS[""]:
                        problems.append(f"{where}: 'dagman {command}' has no option {flag}")
    return problems


def test_every_named_key_flag_and_command_exists():
    problems = message_problems()
    assert not problems, "\n".join(problems)


def test_the_walk_finds_what_it_should(tmp_path):
    """The checker itself: a module with one wrong name of each kind is reported, the right ones are not."""
    bad = tmp_path / "probe.py"
    bad.write_text(
        "def f(n):\n"
        "    raise ValueError(f'{n} samples make no batch; raise samples_per_volume or lower the batch size')\n"
        "def g():\n"
        "    raise ValueError('use --min-sise 8, data.batch_sise=4, or `dagman exports --checkpoint C`')\n"
        "def h():\n"
        "    raise ValueError('set data.samples_per_volume=4 or data.batch_size=1; run `dagman export --out F` "
        "or `dagman data prepare S --min-size 8`; see model.safetensors')\n"
        "def k():\n"
        "    raise ValueError('`dagman export --spacing 2` is wrong')\n",
        encoding="utf-8",
    )
    problems = message_problems(tmp_path)
    text = "\n".join(problems)
    assert "'samples_per_volume' without its section (write data.samples_per_volume)" in text
    assert "the flag --min-sise" in text and "config key data.batch_sise" in text
    assert "command 'dagman exports'" in text
    assert "'dagman export' has no option --spacing" in text
    assert len(problems) == 5, text
