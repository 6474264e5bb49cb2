"""The README and docs/*.md against the command lines they describe, and their links.

Options. Only long options (`--name`) are checked; a doc names them in two ways.

1. In a command: a line of a fenced code block (lines ending in a backslash joined, a `# ...`
   comment dropped) or an inline code span, split into commands at `&&`, `||`, `;` and ` | `.
   The options that follow an invocation of one of this project's commands belong to it and
   must exist in its parser:

   - `python -m iterand_tune train ...`, `iterand-tune train ...`: `_build_train_parser()`;
   - `python -m iterand_tune ...`, `iterand-tune ...`: `_build_run_parser()`;
   - `python -m analysis [table|figure1|figure2|figure3] ...`: that command of analysis/cli.py;
   - `python benchmarks/NAME.py ...`: the `add_argument` calls of that script, which must exist;

   with any Python (`python3`, `.venv/bin/python`). Options of any other command (`ray start
   --head`, `pytest -m`, `pip install -e`, `mlflow ui --backend-store-uri`, `tensorboard
   --logdir`, `ray job submit --no-wait`) belong to that tool and are not checked, and neither
   are options before the invocation on the same line. Python code blocks are not commands.
2. Alone: in prose, or in a code span that begins with the option (`--dry-run`,
   `--set KEY=VALUE`, `[--name NAME]`). Such an option is this project's: where the heading of
   its section (or of an enclosing one) invokes the run or the train command ("## One trial
   without Ray: `python -m iterand_tune train`"), it must be an option of that command;
   elsewhere, of one of the three parsers. So a doc names another tool's option together with
   its command (`ray start --dashboard-host`), and the test never has to guess whose it is.

Every option of the run and train commands (but --help) is named in the section of
docs/experiments.md whose heading invokes that command: that page is the full option list.
Every `make TARGET` a doc names is a target of the Makefile.

Links: every relative link or image leads to an existing file, and a `#anchor` to a heading of
the target page (anchors as GitHub makes them).

Help texts: `python -m iterand_tune --help` must agree with the docs too. Its options hold no
project history, name installable extras as a checkout installs them, offer the values and use
the placeholders of their rows in docs/experiments.md, and state what the code does where the
code differs from a plain reading (FACTS). The cases in PENDING_HELP fail against today's help
texts of iterand_tune/cli.py and are expected to fail (strict xfail) until those texts change;
then they pass, and their entries go.
"""
from __future__ import annotations

import argparse
import ast
import configparser
import functools
import glob
import os
import re
from dataclasses import dataclass, field
from typing import Iterator, Optional

import pytest

from analysis.cli import build_parser as build_analysis_parser
from iterand_tune.cli import _build_run_parser, _build_train_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = sorted([os.path.join(ROOT, "README.md"), *glob.glob(os.path.join(ROOT, "docs", "*.md"))])
EXPERIMENTS_MD = os.path.join(ROOT, "docs", "experiments.md")
ANALYSIS_MD = os.path.join(ROOT, "docs", "analysis.md")

ANALYSIS_COMMANDS = ("table", "figure1", "figure2", "figure3", "report")
OPTION = re.compile(r"(?<![\w-])--[A-Za-z][A-Za-z0-9-]*")
PYTHON = r"(?<![\w./~-])(?:[\w./~-]*/)?python[\d.]*\s+-m\s+"
INVOCATION = re.compile(
    rf"{PYTHON}iterand_tune(?![\w.])(?:\s+(?P<train>train)\b)?"
    rf"|(?<![\w./-])iterand-tune(?![\w-])(?:\s+(?P<train2>train)\b)?"
    rf"|{PYTHON}analysis(?![\w.])(?:\s+(?P<sub>[\w|{{}},]+))?"
    r"|(?<![\w-])(?:[\w./~-]*/)?benchmarks/(?P<bench>\w+)\.py\b")
MAKE = re.compile(r"(?<![\w-])make\s+(?P<target>[a-z][\w-]*)(?![\w=-])")
SEGMENT_SPLIT = re.compile(r"&&|\|\||;|\s\|\s")
FENCE = re.compile(r"^\s*(```|~~~)\s*([\w+-]*)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
SPAN = re.compile(r"(`+)(.+?)\1", re.S)
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def rel(path: str) -> str:
    return os.path.relpath(path, ROOT)


# ------------------------------------------------------------------ the parsers

def parser_options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


@functools.lru_cache(maxsize=None)
def parsers() -> dict[str, argparse.ArgumentParser]:
    """The project's commands by name: run, train, analysis and analysis's subcommands."""
    out = {"run": _build_run_parser(), "train": _build_train_parser()}
    top = build_analysis_parser()
    out["analysis"] = top
    for action in top._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out[f"analysis {name}"] = sub
    return out


def options_of(command: str) -> set[str]:
    return parser_options(parsers()[command])


@functools.lru_cache(maxsize=None)
def benchmark_options(name: str) -> Optional[set[str]]:
    """The options benchmarks/NAME.py declares (with --help), or None when there is no such file."""
    path = os.path.join(ROOT, "benchmarks", f"{name}.py")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    found = {"--help"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            found |= {a.value for a in node.args if isinstance(a, ast.Constant)
                      and isinstance(a.value, str) and a.value.startswith("--")}
    return found


@functools.lru_cache(maxsize=None)
def make_targets() -> set[str]:
    with open(os.path.join(ROOT, "Makefile")) as f:
        return {m.group(1) for m in re.finditer(r"^([A-Za-z][\w-]*)\s*:(?!=)", f.read(), re.M)}


def ours() -> set[str]:
    """Every option of this project's three command lines."""
    return set().union(*(parser_options(p) for p in parsers().values()))


# ------------------------------------------------------------------ reading the docs

@dataclass
class Mention:
    """An option named in a doc, and the command it belongs to (None: any of ours; a frozenset:
    one of these commands; "bench:NAME": a benchmark script)."""
    path: str
    line: int
    option: str
    owner: object
    text: str


@dataclass
class Block:
    """A piece of a doc: a heading, one shell command of a code block (continuations joined,
    comment dropped) or a paragraph of prose (a table row, a list item or running text)."""
    kind: str                # "heading", "code" or "prose"
    line: int                # where it starts
    text: str
    lang: Optional[str]      # a code block's language
    section: Optional[str]   # the command the innermost heading that invokes one invokes
    level: int = 0           # a heading's level


@dataclass
class Section:
    level: int
    title: str
    command: Optional[str]   # the command the heading invokes, if any
    start: int
    end: float = float("inf")
    mentions: list = field(default_factory=list)


def invoked_command(match: re.Match) -> object:
    if match.group("bench"):
        return f"bench:{match.group('bench')}"
    if match.group("train") or match.group("train2"):
        return "train"
    if match.group(0).rstrip().endswith(("iterand_tune", "iterand-tune")):
        return "run"
    sub = match.group("sub")
    names = [n for n in re.split(r"[|{},]", sub or "") if n]
    if names and all(n in ANALYSIS_COMMANDS for n in names):
        return frozenset(f"analysis {n}" for n in names)
    return frozenset(["analysis", *(f"analysis {n}" for n in ANALYSIS_COMMANDS)])


def strip_comment(line: str) -> str:
    """A shell line without its `# comment` (a # at the start or after a space, outside quotes)."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def command_mentions(text: str) -> Iterator[tuple[str, object]]:
    """(option, owner) for the options of a command line that follow one of our invocations."""
    for segment in SEGMENT_SPLIT.split(text):
        calls = list(INVOCATION.finditer(segment))
        for i, call in enumerate(calls):
            end = calls[i + 1].start() if i + 1 < len(calls) else len(segment)
            owner = invoked_command(call)
            for option in OPTION.findall(segment[call.end():end]):
                yield option, owner


def span_mentions(span: str, section_command: Optional[str]) -> Iterator[tuple[str, object]]:
    """An inline code span: a command of ours, an option alone, or another tool's command."""
    span = span.replace("\\|", "|").replace("\n", " ").strip()
    if INVOCATION.search(span):
        yield from command_mentions(span)
    elif re.match(r"[\[(]*--[A-Za-z]", span):
        for option in OPTION.findall(span):
            yield option, section_command


@functools.lru_cache(maxsize=None)
def blocks(path: str) -> tuple[Block, ...]:
    return tuple(_blocks(path))


def _blocks(path: str) -> Iterator[Block]:
    with open(path) as f:
        lines = f.read().splitlines()
    stack: list[tuple[int, Optional[str]]] = []
    fence: Optional[str] = None
    lang: Optional[str] = None
    pending = ""
    pending_at = 0
    para: list[str] = []
    para_at = 0

    def command() -> Optional[str]:
        return next((c for _, c in reversed(stack) if c), None)

    def flush():
        nonlocal para
        if para:
            text = "\n".join(para)
            para = []
            return [Block("prose", para_at, text, None, command())]
        return []

    for no, line in enumerate(lines, 1):
        m = FENCE.match(line)
        if fence is not None:
            if m and m.group(1) == fence:
                if pending:
                    yield Block("code", pending_at, pending, lang, command())
                fence, pending = None, ""
                continue
            code = strip_comment(line)
            if not pending:
                pending_at = no
            if code.rstrip().endswith("\\"):
                pending += code.rstrip()[:-1] + " "
                continue
            pending += code
            yield Block("code", pending_at, pending, lang, command())
            pending = ""
            continue
        if m:
            yield from flush()
            fence, lang = m.group(1), m.group(2) or None
            continue
        h = HEADING.match(line)
        if h:
            yield from flush()
            level, title = len(h.group(1)), h.group(2)
            while stack and stack[-1][0] >= level:
                stack.pop()
            stack.append((level, heading_command(title)))
            yield Block("heading", no, title, None, command(), level)
            continue
        if not line.strip():
            yield from flush()
            continue
        if not para:
            para_at = no
        para.append(line)
    yield from flush()


def heading_command(title: str) -> Optional[str]:
    """"run" or "train" when a code span of a heading invokes that command, else None."""
    for _, span in SPAN.findall(title):
        m = INVOCATION.search(span)
        owner = invoked_command(m) if m else None
        if owner in ("run", "train"):
            return owner
    return None


NOT_SHELL = ("python", "py", "yaml", "json")


def mentions(path: str) -> Iterator[Mention]:
    for b in blocks(path):
        if b.kind == "code" and b.lang not in NOT_SHELL:
            for option, owner in command_mentions(b.text):
                yield Mention(path, b.line, option, owner, b.text.strip())
        elif b.kind == "prose":
            for _, span in SPAN.findall(b.text):
                for option, owner in span_mentions(span, b.section):
                    yield Mention(path, b.line, option, owner, span.strip())
            for option in OPTION.findall(LINK.sub(" ", SPAN.sub(" ", b.text))):
                yield Mention(path, b.line, option, b.section, option)


def code_texts(path: str) -> Iterator[tuple[int, str]]:
    """Every shell command and inline code span of a doc, with its line."""
    for b in blocks(path):
        if b.kind == "code" and b.lang not in NOT_SHELL:
            yield b.line, b.text
        elif b.kind in ("prose", "heading"):
            for _, span in SPAN.findall(b.text):
                yield b.line, span.replace("\n", " ")


NAMES = {None: "any of python -m iterand_tune, its train command and python -m analysis",
         "run": "python -m iterand_tune", "train": "python -m iterand_tune train"}


def allowed(owner: object) -> tuple[Optional[set[str]], str]:
    """The options an owner has, and its name; None when the owner is a missing script."""
    if owner is None:
        return ours(), NAMES[None]
    if isinstance(owner, frozenset):
        return set().union(*(options_of(c) for c in owner)), " / ".join(sorted(owner))
    if owner.startswith("bench:"):
        name = owner.split(":", 1)[1]
        return benchmark_options(name), f"benchmarks/{name}.py"
    return options_of(owner), NAMES.get(owner, owner)


# ------------------------------------------------------------------ options named in the docs

@pytest.mark.parametrize("path", DOCS, ids=rel)
def test_every_option_a_doc_names_exists_in_its_command(path):
    wrong = []
    for m in mentions(path):
        options, name = allowed(m.owner)
        if options is None:
            wrong.append(f"{rel(path)}:{m.line}: {name} does not exist ({m.text!r})")
        elif m.option not in options:
            wrong.append(f"{rel(path)}:{m.line}: {m.option} is not an option of {name} "
                         f"({m.text!r})")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("path", DOCS, ids=rel)
def test_every_make_target_a_doc_names_exists(path):
    wrong = [f"{rel(path)}:{line}: no target {m.group('target')} in the Makefile ({text!r})"
             for line, text in code_texts(path) for m in MAKE.finditer(text)
             if m.group("target") not in make_targets()]
    assert not wrong, "\n".join(wrong)


def sections(path: str) -> list[Section]:
    """The sections of a doc (a heading to the next of its level or above), with their mentions."""
    found = [Section(b.level, b.text, heading_command(b.text), b.line)
             for b in blocks(path) if b.kind == "heading"]
    every = list(mentions(path))
    for i, s in enumerate(found):
        s.end = next((t.start for t in found[i + 1:] if t.level <= s.level), float("inf"))
        s.mentions = [m for m in every if s.start <= m.line < s.end]
    return found


@pytest.mark.parametrize("command", ["run", "train"])
def test_docs_experiments_lists_every_option(command):
    listing = [s for s in sections(EXPERIMENTS_MD) if s.command == command]
    assert listing, f"docs/experiments.md: no section's heading invokes the {command} command"
    named = {m.option for s in listing for m in s.mentions}
    missing = sorted(s for a in parsers()[command]._actions if a.help != argparse.SUPPRESS
                     for s in a.option_strings if s.startswith("--") and s != "--help"
                     and not set(a.option_strings) & named)
    assert not missing, (f"options of the {command} command missing from its section of "
                         f"docs/experiments.md: {', '.join(missing)}")


def test_every_option_of_analysis_is_in_docs_analysis():
    with open(ANALYSIS_MD) as f:
        text = f.read()
    actions = [a for name, p in parsers().items() if name.startswith("analysis ")
               for a in p._actions if a.option_strings and "--help" not in a.option_strings]
    missing = sorted({a.option_strings[-1] for a in actions
                      if not any(re.search(rf"(?<![\w-]){re.escape(s)}(?![\w-])", text)
                                 for s in a.option_strings)})
    assert not missing, f"docs/analysis.md does not name {', '.join(missing)}"


def test_the_rule_tells_our_options_from_other_tools():
    """The attribution rule on the shapes the docs use."""
    def owners(text):
        return [(o, owner) for o, owner in command_mentions(text)]
    assert owners("ray start --head --port=6379") == []
    assert owners("pytest -m cuda tests/test_cuda.py") == []
    assert owners(".venv/bin/python -m iterand_tune experiments/figure2.py --address auto") == \
        [("--address", "run")]
    assert owners("python3 -m iterand_tune train --method iterand --json") == \
        [("--method", "train"), ("--json", "train")]
    assert owners("ray job submit --no-wait -- bash -c 'cd x && .venv/bin/python -m iterand_tune "
                  "f.py --address auto'") == [("--address", "run")]
    assert owners("python -m analysis table RUN --rows trials") == \
        [("--rows", frozenset({"analysis table"}))]
    assert owners("python benchmarks/gpu_hours.py report.json --detail") == \
        [("--detail", "bench:gpu_hours")]
    assert owners("python -m analysis table X; python -m iterand_tune f.py --resume") == \
        [("--resume", "run")]
    assert list(span_mentions("--set KEY=VALUE", None)) == [("--set", None)]
    assert list(span_mentions("tensorboard --logdir ray_results", "run")) == []
    assert strip_comment("tensorboard --logdir x   # or --logdir y") == "tensorboard --logdir x   "
    assert allowed("bench:no_such_script")[0] is None


# ------------------------------------------------------------------ links

def slug(title: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@functools.lru_cache(maxsize=None)
def anchors(path: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for b in blocks(path):
        if b.kind == "heading":
            base = slug(b.text)
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


@pytest.mark.parametrize("path", DOCS, ids=rel)
def test_every_relative_link_leads_somewhere(path):
    wrong = []
    for b in blocks(path):
        if b.kind not in ("prose", "heading"):
            continue
        line = b.line
        for target in LINK.findall(SPAN.sub(" ", b.text)):
            if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:, ...
                continue
            file, _, anchor = target.partition("#")
            dest = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
            if not os.path.exists(dest):
                wrong.append(f"{rel(path)}:{line}: {target}: no file {rel(dest)}")
            elif anchor and (not dest.endswith(".md") or anchor not in anchors(dest)):
                wrong.append(f"{rel(path)}:{line}: {target}: no heading #{anchor} in {rel(dest)}")
    assert not wrong, "\n".join(wrong)


def test_slugs_are_githubs():
    assert slug("One trial without Ray: `python -m iterand_tune train`") == \
        "one-trial-without-ray-python--m-iterand_tune-train"
    assert slug("10. How the mask is computed, and what it costs") == \
        "10-how-the-mask-is-computed-and-what-it-costs"


# ------------------------------------------------------------------ no project history

HISTORY = re.compile(
    r"\b(?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b"  # a commit hash
    r"|\b(?:slow|fast) hour\b|\bseen once\b|\bmeasured (?:at|on this)\b|\bthis machine's speed\b"
    r"|\bon this project's\b|\bclean clone at\b|\bmisbehav", re.I)


@pytest.mark.parametrize("path", DOCS, ids=rel)
def test_docs_say_what_the_software_does_not_its_history(path):
    """A figure appears with the command that measures it, as an example of its output; the
    docs name no commits and tell no anecdotes of the machines they were written on."""
    with open(path) as f:
        found = [f"{rel(path)}:{no}: {m.group(0)!r}" for no, line in enumerate(f, 1)
                 for m in HISTORY.finditer(line)]
    assert not found, "\n".join(found)


# ------------------------------------------------------------------ help texts against the docs

# What the code does, which each option's help must say (the words it must contain).
FACTS = {
    ("run", "--cpus-per-trial"): ["ImageNet"],  # resources.trial_request: 1; ImageNet 1 + workers
    ("run", "--download"): ["default"],         # dataset_download is true by default already
    ("train", "--download"): ["default"],
    ("run", "--verbose"): ["ETA", "Ray Tune"],  # 1: our lines with an ETA; 2: Ray Tune's instead
}

# Help texts of iterand_tune/cli.py that disagree with the docs today (issue 22); each case
# xpasses, and fails as such, once its text is changed: then remove it here.
PENDING_HELP: set = set()


def option_rows(command: str) -> dict[str, str]:
    """The first cell of each option row of the docs/experiments.md section of `command`:
    option -> what follows it there (`--address auto|local|HOST:PORT` -> 'auto|local|HOST:PORT')."""
    rows: dict[str, str] = {}
    with open(EXPERIMENTS_MD) as f:
        lines = f.read().splitlines()
    for s in sections(EXPERIMENTS_MD):
        if s.command != command:
            continue
        for line in lines[s.start:int(min(s.end, len(lines) + 1)) - 1]:
            cell = re.match(r"\|\s*(.*?)\s*(?<!\\)\|", line)
            if not cell:
                continue
            for _, span in SPAN.findall(cell.group(1)):
                m = re.match(r"(--[A-Za-z][\w-]*)\s*(.*)", span.replace("\\|", "|"))
                if m:
                    rows[m.group(1)] = m.group(2).strip()
    return rows


def extras() -> set[str]:
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    return set(cfg["options.extras_require"])


def action(command: str, option: str) -> argparse.Action:
    return next(a for a in parsers()[command]._actions if option in a.option_strings)


def help_cases() -> list:
    cases = []
    for command in ("run", "train"):
        rows = option_rows(command)
        for a in parsers()[command]._actions:
            long = [s for s in a.option_strings if s.startswith("--")]
            if not long or long[0] == "--help":
                continue
            opt = long[0]
            rules = ["history", "install"]
            doc = rows.get(opt, "")
            if "|" in doc and any(re.fullmatch(r"[a-z0-9][\w:./-]*", v) for v in doc.split("|")):
                rules.append("values")
            if isinstance(a.metavar, str) and re.fullmatch(r"\[?[A-Z][A-Z_=]*\]?( \.\.\.)?", doc):
                rules.append("metavar")
            if (command, opt) in FACTS:
                rules.append("facts")
            for rule in rules:
                case_id = f"{rule}:{command}:{opt}"
                marks = [pytest.mark.xfail(strict=True, reason="iterand_tune/cli.py help text to "
                                           "change (issue 22)")] if case_id in PENDING_HELP else []
                cases.append(pytest.param(rule, command, opt, doc, id=case_id, marks=marks))
    return cases


def listed(value: str, text: str) -> bool:
    """Whether `value` is an item of a list in `text` ("auto, HOST:PORT or ray://HOST:PORT"),
    not just a word of a sentence ("else a local one")."""
    return re.search(rf"(?:^|[:(,]\s*|\bor\s+){re.escape(value)}(?=\s*(?:,|\bor\b|[();]|$))",
                     text) is not None


HELP_HISTORY = re.compile(rf"{HISTORY.pattern}|\bseen\b|heavy load|\bmeasured (?:at|on)\b", re.I)


@pytest.mark.parametrize("rule, command, option, doc", help_cases())
def test_help_agrees_with_the_docs(rule, command, option, doc):
    a = action(command, option)
    text = " ".join((a.help or "").split())
    if rule == "history":
        assert not HELP_HISTORY.search(text), f"{option}'s help tells history: {text!r}"
    elif rule == "install":
        for extra in extras():
            if f"[{extra}]" in text:
                assert f"pip install -e '.[{extra}]'" in text, (
                    f"{option}'s help names the {extra} extra, not how a checkout installs it: "
                    f"{text!r}")
    elif rule == "values":
        values = [v for v in doc.split("|") if re.fullmatch(r"[a-z0-9][\w:./-]*", v)]
        offered = {str(c) for c in a.choices or ()}
        missing = [v for v in values if v not in offered and not listed(v, text)]
        assert not missing, (f"docs/experiments.md gives {option} {', '.join(missing)}, which its "
                             f"help neither offers nor names: {text!r}")
    elif rule == "metavar":
        placeholder = doc.strip("[]").split()[0].strip("[]")
        assert a.metavar == placeholder, (f"{option} shows {a.metavar} in --help and {placeholder} "
                                          "in docs/experiments.md")
    elif rule == "facts":
        missing = [w for w in FACTS[(command, option)] if w not in text]
        assert not missing, f"{option}'s help does not say {', '.join(missing)}: {text!r}"
