"""Every command and snippet in README.md and docs/*.md runs, on tiny data, and so does
every ``>>>`` example in prefast's and store's docstrings (``test_docstring_examples_run``).

The convention the docs follow (checked by ``test_fences_follow_the_convention``):

* fenced blocks carry a tag: ```` ```python ```` and ```` ```sh ```` blocks are **run**;
  ```` ```text ```` blocks are output or pictures of a layout and are never run; any other tag,
  an untagged fence or a command in an indented block fails the check;
* a doc's blocks run in order, in one temporary folder per doc: ``python`` blocks with
  ``exec`` in one namespace per doc, ``sh`` blocks line by line (a trailing ``\\`` joins lines,
  ``&&`` splits a line into commands, ``# ...`` is a comment, and ``# exits N`` in it is the
  exit code the command must return; 0 otherwise);
* ``sh`` commands run in this process, not in a shell: ``prefast ...`` and
  ``python -m prefast ...`` call ``prefast.cli.main``, ``python -m store ...``
  ``store.__main__.main``, ``python benchmarks/NAME.py ...`` ``benchmarks.NAME.main`` and
  ``python -c CODE`` ``exec``; ``*`` globs are expanded in the folder and must match.

What makes it tiny is written here, not hidden: ``SUBSTITUTIONS`` rewrite a command before it
runs (each must match some command, and says why), and ``NOT_RUN`` lists the commands that
cannot run here, with the reason (each must match some command). Every other command runs.
``prefast train`` commands in ``NOT_RUN`` are still parsed into a ``TrainConfig``, so their
flags cannot rot.

Beside running them: every flag the docs name must be in the ``--help`` of the command it
belongs to (``test_flags_exist``), relative links must point to files that exist, the README
must stay under 10 KB and its test command must be ``.ci/run``'s. The option tables in
docs/training.md are generated from ``prefast.cli.build_parser()``;
``python tests/test_docs.py --write-options`` regenerates them.
"""

from __future__ import annotations

import argparse
import contextlib
import doctest
import glob
import importlib
import io
import os
import re
import shlex
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
# The pages beside committed results (SUMMARY.md, README.md): their links are checked too.
RESULT_PAGES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "benchmarks/results").rglob("*.md"))
RUN_TAGS = ("python", "sh")
TAGS = (*RUN_TAGS, "text")

# Tiny data: (pattern, replacement, why), applied in order to every sh command (regex on the
# command's text after line joining). Appended flags win: argparse keeps the last value.
SUBSTITUTIONS: list[tuple[str, str, str]] = [
    (
        r"--dataset fashion-mnist",
        "--dataset synthetic --synthetic-shape mnist --num-samples 96",
        "60,000 real images take minutes: 96 synthetic images of the same 1x28x28 shape",
    ),
    (
        r"--dataset cifar10 --data-root \S+ --download",
        "--dataset synthetic --num-samples 96",
        "no network here: 96 synthetic images of CIFAR's 3x32x32 shape",
    ),
    (
        r"--depth (76|40) --growth 12",
        "--depth 16 --growth 8",
        "the smallest DenseNet-BC the docs use elsewhere",
    ),
    (r"--num-samples \d+", "--num-samples 96", "96 images: a few steps per epoch"),
    (r"--epochs \d+", "--epochs 3", "3 epochs: the fewest in which a cache is built and read"),
    (
        r"^(prefast (train|verify) .*)$",
        r"\1 --device cpu --no-progress",
        "the CPU whatever the machine has, no progress bars in the test log",
    ),
    (
        r"^(prefast train .*)$",
        r"\1 --batch-size 32 --eval-batch-size 256",
        "batches sized for 96 images",
    ),
    (
        r"^(prefast train .*--cache zarr.*)$",
        r"\1 --recache-policy every",
        "auto decides from timings measured on the machine and may not cache 96 images at all; "
        "the commands after it inspect the store, so the test caches at every freeze",
    ),
    (
        r"^(python benchmarks/compare\.py .*)$",
        r"\1 --num-samples 96 --epochs 2 --batch-size 32 --tiers zarr --device cpu --no-progress "
        "--no-plot --cache-dir cmp-cache --out cmp/out.json",
        "tiny data, results in the temporary folder, not benchmarks/results; full, freezeout and "
        "prefast-zarr only (tests/test_benchmarks.py runs every variant)",
    ),
    (
        r"^python benchmarks/(views|fidelity)\.py$",
        r"python benchmarks/\1.py --dataset synthetic --num-samples 96 --epochs 2 --batch-size 32 "
        r"--seeds 0 --device cpu --out study/\1.json",
        "one seed of 96 synthetic images for 2 epochs, results in the temporary folder",
    ),
    (
        r"^(python benchmarks/views\.py .*)$",
        r"\1 --views 1 --no-floor",
        "one view and no floor: the smallest study",
    ),
    (
        r"^(python benchmarks/fidelity\.py .*)$",
        r"\1 --variants freezeout prefast-v1",
        "two variants: the smallest study",
    ),
    (
        r"^(python benchmarks/step_probe\.py .*)$",
        r"\1 --modes none --boundaries 0 3 --warmup 1 --steps 1 --repeats 1 --out probe.json",
        "two boundaries, one timed step, results in the temporary folder",
    ),
    (
        r"^(python benchmarks/step_ops\.py .*)$",
        r"\1 --num-samples 96 --epochs 2 --batch-size 32 --out ops/out.json",
        "two epochs of 96 images, results in the temporary folder",
    ),
    (
        r"--subset \d+",
        "--subset 64",
        "a subset of the 96 synthetic images",
    ),
]

# Commands that cannot run here: (pattern, why). A pattern matches the start of a command.
NOT_RUN: list[tuple[str, str]] = [
    (r"apt-get install ", "installs a system package (root, network); .ci/run runs it"),
    (r"\(apt-get install ", "installs a system package (root, network); .ci/run runs it"),
    (r"python3 -m venv ", "makes a virtual environment; .ci/run runs it"),
    (r"\. \.venv/bin/activate$", "a shell built-in; .ci/run runs it"),
    (
        r"pip install ",
        "installs packages (network); test_pip_extras_exist checks the extras it names",
    ),
    (
        r"python -m pytest",
        "the test suite itself; test_readme_test_command_is_ci checks it is .ci/run's",
    ),
    (r"ruff (check|format) ", "the linters; CI and engineers run them"),
    (r"mypy$", "the type checker; CI and engineers run it"),
    (
        r"torchrun ",
        "several processes on several GPUs (nccl, bf16); tests/test_distributed.py runs "
        "torchrun on the CPU; the prefast arguments are parsed by test_not_run_commands_parse",
    ),
    (
        r'(STEPS=("[^"]*"|\S+) )?bash benchmarks/run_cpu\.sh',
        "every CPU benchmark, hours on 2 cores; its steps are compare.py, views.py and "
        "bench_store.py commands: the first two run here on tiny data",
    ),
    (
        r"('?[A-Z_]+=[^' ]*(?: [^' ]+)*'? )*OUT=\S+ bash benchmarks/gpu\.sh",
        "needs a CUDA GPU (an H100/H200 session)",
    ),
    (
        r"python benchmarks/compare\.py --scenario cifar-gpu",
        "DenseNet-BC-76 on 50,000 images in bf16: needs a CUDA GPU",
    ),
    (
        r"python benchmarks/\S+\.py .*--device cuda",
        "needs a CUDA GPU; the same script runs here on the CPU in another example",
    ),
    (
        r"python benchmarks/compare\.py --scenario (fmnist|cifar-synthetic|paper)",
        "a full scenario (minutes to an hour on 2 cores); compare.py --quick runs here",
    ),
    (
        r"python benchmarks/bench_store\.py",
        "reads every variant in a fresh process: about 20 s on 2 cores even for 300 samples; "
        "tests/test_bench_store.py runs --quick, and test_flags_exist checks the flags",
    ),
]

_EXITS = re.compile(r"\bexits (\d+)\b")


@dataclass
class Block:
    doc: str
    line: int  # 1-based line of the opening fence
    tag: str
    text: str


@dataclass
class Command:
    doc: str
    line: int
    text: str  # as written (one command of a && chain)
    run: str  # after SUBSTITUTIONS
    exit_code: int
    not_run: str | None  # the reason, when NOT_RUN matches
    substituted: tuple[int, ...] = ()  # the SUBSTITUTIONS entries that changed it


def read_blocks(doc: str) -> list[Block]:
    out: list[Block] = []
    lines = (ROOT / doc).read_text().splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)```(.*)$", lines[i])
        if not m:
            i += 1
            continue
        start, tag = i, m.group(2).strip()
        i += 1
        body = []
        while i < len(lines) and not re.match(r"^\s*```\s*$", lines[i]):
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise AssertionError(f"{doc}:{start + 1}: unclosed fence")
        out.append(Block(doc, start + 1, tag, "\n".join(body) + "\n"))
        i += 1
    return out


def _split_comment(line: str) -> tuple[str, str]:
    """``cmd  # comment`` -> (cmd, comment); a # inside quotes is not a comment."""
    quote = None
    for k, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (k == 0 or line[k - 1].isspace()):
            return line[:k].rstrip(), line[k + 1 :].strip()
    return line.rstrip(), ""


def commands_of(block: Block) -> list[Command]:
    out: list[Command] = []
    lines = block.text.splitlines()
    k = 0
    while k < len(lines):
        first = k
        text = lines[k]
        while text.rstrip().endswith("\\") and k + 1 < len(lines):
            k += 1
            text = text.rstrip()[:-1].rstrip() + " " + lines[k].strip()
        k += 1
        cmd, comment = _split_comment(text.strip())
        if not cmd:
            continue
        m = _EXITS.search(comment)
        parts = [p.strip() for p in cmd.split(" && ")]
        for n, part in enumerate(parts):
            reason = next((why for pat, why in NOT_RUN if re.match(pat, part)), None)
            run, used = part, []
            if reason is None:
                for i, (pat, rep, _) in enumerate(SUBSTITUTIONS):
                    new = re.sub(pat, rep, run)
                    if new != run:
                        used.append(i)
                    run = new
            code = int(m.group(1)) if m and n == len(parts) - 1 else 0
            out.append(
                Command(block.doc, block.line + 1 + first, part, run, code, reason, tuple(used))
            )
    return out


def all_commands() -> list[Command]:
    return [c for d in DOCS for b in read_blocks(d) if b.tag == "sh" for c in commands_of(b)]


# ---- running a command in this process ----------------------------------------------------------
def _expand(tokens: list[str]) -> list[str]:
    out: list[str] = []
    for t in tokens:
        if any(ch in t for ch in "*?["):
            hits = sorted(glob.glob(t))
            assert hits, f"the glob {t} matches nothing in {os.getcwd()}"
            out.extend(hits)
        else:
            out.append(t)
    return out


def _call(fn: Any, args: list[str]) -> int:
    try:
        rc = fn(args)
    except SystemExit as e:  # argparse
        rc = e.code if isinstance(e.code, int) else 1
    return int(rc or 0)


def run_command(tokens: list[str], ns: dict[str, Any]) -> int:
    from prefast import cli
    from store import __main__ as store_cli

    tokens = _expand(tokens)
    if tokens[0] == "prefast":
        return _call(cli.main, tokens[1:])
    if tokens[:3] == ["python", "-m", "prefast"]:
        return _call(cli.main, tokens[3:])
    if tokens[:3] == ["python", "-m", "store"]:
        return _call(store_cli.main, tokens[3:])
    if tokens[:2] == ["python", "-c"]:
        exec(compile(tokens[2], "<python -c>", "exec"), dict(ns))
        return 0
    if len(tokens) > 1 and tokens[0] == "python":
        m = re.fullmatch(r"benchmarks/(\w+)\.py", tokens[1])
        if m:
            mod = importlib.import_module(f"benchmarks.{m.group(1)}")
            return _call(mod.main, tokens[2:])
    raise AssertionError(
        f"no in-process runner for {shlex.join(tokens)!r}: write it as one of the supported "
        "commands, or add it to NOT_RUN with the reason"
    )


@pytest.fixture
def one_thread():
    """One torch thread: on a shared 2-core machine two threads per process thrash (a tiny run
    takes 18 s instead of 1 s)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("doc", DOCS)
def test_doc_runs(doc, tmp_path, monkeypatch, one_thread):
    from prefast.models import list_models, unregister_model

    monkeypatch.chdir(tmp_path)
    models = set(list_models())
    ns: dict[str, Any] = {"__name__": "__docs__"}
    try:
        for b in read_blocks(doc):
            if b.tag == "python":
                exec(compile(b.text, f"{doc}:{b.line}", "exec"), ns)
            elif b.tag == "sh":
                for c in commands_of(b):
                    if c.not_run is not None:
                        continue
                    out = io.StringIO()
                    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                        rc = run_command(shlex.split(c.run), ns)
                    assert rc == c.exit_code, (
                        f"{doc}:{c.line}: {c.run}\nexit {rc}, expected {c.exit_code}\n"
                        f"{out.getvalue()[-3000:]}"
                    )
    finally:
        for name in set(list_models()) - models:
            unregister_model(name)
        import matplotlib.pyplot as plt

        plt.close("all")


def _docstring_modules() -> list[str]:
    """The modules of prefast and store whose source holds a ``>>>`` example."""
    return sorted(
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for pkg in ("prefast", "store")
        for path in (ROOT / pkg).rglob("*.py")
        if ">>> " in path.read_text()
    )


@pytest.mark.parametrize("module", _docstring_modules())
def test_docstring_examples_run(module, tmp_path, monkeypatch, one_thread):
    """The ``>>>`` examples of every docstring in prefast and store run as written, in a
    temporary folder, and print what they show."""
    from prefast.models import list_models, unregister_model

    monkeypatch.chdir(tmp_path)
    models = set(list_models())
    mod = importlib.import_module(module)
    tests = [t for t in doctest.DocTestFinder().find(mod) if t.examples]
    assert tests, f"{module}: a '>>> ' that doctest does not find"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    out = io.StringIO()
    try:
        for t in tests:
            runner.run(t, out=out.write)
    finally:
        for name in set(list_models()) - models:
            unregister_model(name)
    assert runner.failures == 0, out.getvalue()[-3000:]


# ---- the convention and the tables -------------------------------------------------------------
def test_fences_follow_the_convention():
    bad = []
    for doc in DOCS:
        for b in read_blocks(doc):
            if b.tag not in TAGS:
                bad.append(f"{doc}:{b.line}: fence tag {b.tag!r}, use one of {TAGS}")
        inside = False
        for n, line in enumerate((ROOT / doc).read_text().splitlines(), 1):
            if re.match(r"^\s*```", line):
                inside = not inside
            elif not inside and re.match(
                r"^ {4,}(\$ |prefast |python |pip |torchrun |bash |apt-get )", line
            ):
                bad.append(f"{doc}:{n}: an indented command; put it in a ```sh block")
    assert not bad, "\n".join(bad)


def test_substitutions_and_not_run_entries_are_used():
    cmds = all_commands()
    used = {i for c in cmds for i in c.substituted}
    for i, (pat, _, why) in enumerate(SUBSTITUTIONS):
        assert i in used, f"SUBSTITUTIONS entry {pat!r} ({why}) changes no command any more"
    for pat, why in NOT_RUN:
        assert any(re.match(pat, c.text) for c in cmds), (
            f"NOT_RUN entry {pat!r} ({why}) matches no command any more"
        )


def test_not_run_commands_parse():
    """The prefast arguments of commands that cannot run here are valid flags and values."""
    from prefast.cli import build_parser, config_from_args

    checked = 0
    for c in all_commands():
        if c.not_run is None:
            continue
        tokens = shlex.split(c.text)
        if "prefast" not in tokens:
            continue
        args = tokens[tokens.index("prefast") + 1 :]
        ns = build_parser().parse_args(args)
        if ns.command == "train":
            config_from_args(ns)
        checked += 1
    assert checked >= 1


# ---- every flag the docs name exists ------------------------------------------------------------
# Flags of other programs that the docs name (torchrun's, ruff's).
EXTERNAL_FLAGS = {
    "--standalone",
    "--nproc_per_node",
    "--nnodes",
    "--node_rank",
    "--rdzv-backend",
    "--rdzv-endpoint",
    "--check",
}
_FLAG = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")


def _project_cli(tokens: list[str]) -> tuple[list[str], list[str]] | None:
    """(the command that prints the help, the arguments after it) for a command of this
    project's CLIs; None for other programs."""
    if tokens[:1] == ["torchrun"] and "-m" in tokens:
        tokens = ["python", *tokens[tokens.index("-m") :]]
    if tokens[:1] == ["prefast"]:
        tokens = ["python", "-m", "prefast", *tokens[1:]]
    if tokens[:3] in (["python", "-m", "prefast"], ["python", "-m", "store"]):
        if len(tokens) > 3 and re.fullmatch(r"[a-z]+", tokens[3]):
            if tokens[3] == "cache" and len(tokens) > 4 and tokens[4] in ("list", "remove"):
                return tokens[:5], tokens[5:]  # prefast cache list|remove
            return tokens[:4], tokens[4:]
        return None
    if len(tokens) > 1 and tokens[0] == "python" and re.fullmatch(r"benchmarks/\w+\.py", tokens[1]):
        return tokens[:2], tokens[2:]
    return None


_HELP: dict[tuple[str, ...], set[str]] = {}


def help_flags(cli: list[str]) -> set[str]:
    """The flags that ``CLI --help`` prints."""
    key = tuple(cli)
    if key not in _HELP:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            rc = run_command([*cli, "--help"], {})
        assert rc == 0, f"{shlex.join(cli)} --help: exit {rc}\n{out.getvalue()}"
        _HELP[key] = set(_FLAG.findall(out.getvalue()))
    return _HELP[key]


def all_help_flags() -> set[str]:
    from store.__main__ import COMMANDS

    clis = [["python", "-m", "prefast", c] for c in ("train", "verify")]
    clis += [["python", "-m", "prefast", "cache", c] for c in ("list", "remove")]
    clis += [["python", "-m", "store", c] for c in COMMANDS]
    clis += [  # the scripts; the package's shared modules (common, study) have no main
        ["python", str(p.relative_to(ROOT))]
        for p in sorted((ROOT / "benchmarks").glob("*.py"))
        if "\ndef main(" in p.read_text()
    ]
    flags = set()
    for cli in clis:
        flags |= help_flags(cli)
    return flags


def _strip_fences(text: str) -> str:
    """The text outside ```python and ```sh blocks (prose and ```text blocks stay)."""
    return re.sub(r"^\s*```(python|sh)\n.*?^\s*```\s*$", "", text, flags=re.M | re.S)


def test_flags_exist():
    """Every flag in a command of the docs is in that command's --help; a flag in a code span
    that starts with one of the project's commands likewise; any other flag in the prose or in
    ```text blocks is in the --help of one of the project's commands."""
    bad = []
    for c in all_commands():
        cli = _project_cli(shlex.split(c.text))
        if cli is None:
            continue
        known = help_flags(cli[0])
        for arg in cli[1]:
            flag = arg.split("=", 1)[0]
            if _FLAG.fullmatch(flag) and flag not in known:
                bad.append(f"{c.doc}:{c.line}: {flag} is not in `{shlex.join(cli[0])} --help`")
    union = all_help_flags() | EXTERNAL_FLAGS
    for doc in DOCS:
        text = _strip_fences((ROOT / doc).read_text())
        for span in re.findall(r"`([^`\n]+)`", text):
            cli = _project_cli(span.split())
            if cli is not None:
                known = help_flags(cli[0])
                bad += [
                    f"{doc}: `{span}`: {f} is not in `{shlex.join(cli[0])} --help`"
                    for f in _FLAG.findall(" ".join(cli[1]))
                    if f not in known
                ]
        for flag in set(re.findall(r"(?<![\w-])(--[A-Za-z][\w-]*)", text)):
            if flag not in union:
                bad.append(f"{doc}: {flag} is in no --help of prefast, store or benchmarks")
    assert not bad, "\n".join(bad)


def test_write_through_note_is_current(tmp_path):
    """docs/training.md says which sinks take rows (write-through) and which take whole chunks
    only (a cache pass, logged); this fails when the code and the page disagree."""
    import store

    text = (ROOT / "docs/training.md").read_text()
    assert "Raw local stores" in text and "a compressed store takes whole chunks only" in text
    raw = store.create(tmp_path / "raw", sample_shape=(2,), num_samples=4)
    lz4 = store.create(tmp_path / "lz4", sample_shape=(2,), num_samples=4, codec="lz4")
    sinks = {
        "raw": raw,
        "lz4": lz4,
        "ram": store.RamCache.empty(4, 1, (2,)),
        "device": store.DeviceCache.empty(4, 1, (2,)),
    }
    rows = {k for k, s in sinks.items() if getattr(s, "supports_rows", False)}
    for s in sinks.values():
        s.abort()
    assert rows == {"raw", "ram", "device"}


def test_readme_test_command_is_ci():
    ci = (ROOT / ".ci/run").read_text().strip().splitlines()[-1]
    readme = [
        line
        for b in read_blocks("README.md")
        if b.tag == "sh"
        for line in b.text.splitlines()
        if line.startswith("python3 -m venv")
    ]
    assert readme == [ci], "the README's test command must be byte-identical to .ci/run's"


def test_pip_extras_exist():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    named = set()
    for c in all_commands():
        for m in re.finditer(r"\.\[([\w,-]+)\]", c.text):
            named.update(m.group(1).split(","))
    assert named, "no pip install of an extra in the docs"
    assert named <= set(extras), f"extras not in pyproject.toml: {sorted(named - set(extras))}"


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings (outside fenced blocks)."""
    text = re.sub(r"^\s*```.*?^\s*```\s*$", "", path.read_text(), flags=re.M | re.S)
    out = set()
    for h in re.findall(r"^#+\s+(.+?)\s*$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-")
        out.add(slug)
    return out


def test_relative_links_resolve():
    """Relative links point to files that exist, and #anchors into Markdown files to headings,
    in the docs and in the pages beside the committed results."""
    assert RESULT_PAGES
    bad = []
    for doc in DOCS + RESULT_PAGES:
        text = (ROOT / doc).read_text()
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            path = (ROOT / doc).parent / target if target else ROOT / doc
            if not path.exists():
                bad.append(f"{doc}: link to {target} does not exist")
            elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
                bad.append(f"{doc}: link to {target}#{anchor}: no such heading")
    assert not bad, "\n".join(bad)


def test_result_pages_commands_parse(monkeypatch):
    """The ``python benchmarks/NAME.py ...`` commands that the pages beside the committed
    results give for regenerating them are valid arguments of today's scripts."""

    class Parsed(Exception):
        pass

    parse = argparse.ArgumentParser.parse_args

    def parse_only(self, args=None, namespace=None):
        raise Parsed(parse(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    bad, checked = [], 0
    for page in RESULT_PAGES:
        text = re.sub(r"\\\n\s*", " ", (ROOT / page).read_text())  # join continued lines
        for m in re.finditer(r"python3? (benchmarks/\w+\.py)([^`\n]*)", text):
            args = shlex.split(_split_comment(m.group(2))[0])
            mod = importlib.import_module(m.group(1)[:-3].replace("/", "."))
            err = io.StringIO()
            try:
                with contextlib.redirect_stderr(err):
                    mod.main(args)
            except Parsed:
                checked += 1
                continue
            except SystemExit:
                pass
            bad.append(f"{page}: {m.group(0).strip()}: {err.getvalue().strip()[-200:]}")
    assert checked and not bad, "\n".join(bad)


def test_every_option_with_a_default_names_it_in_its_help():
    # --help is where a user looks for a default: --synthetic-shape's (cifar) was only in the
    # option table of docs/training.md
    import store.__main__
    from prefast.cli import build_parser

    def unnamed(p: argparse.ArgumentParser, cmd: str) -> list[str]:
        out = []
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sp in a.choices.items():
                    out += unnamed(sp, f"{cmd} {name}")
            elif (
                a.nargs != 0
                and a.default not in (None, argparse.SUPPRESS)
                and "default" not in (a.help or "")
            ):
                out.append(f"{cmd} {'/'.join(a.option_strings) or a.dest}")
        return out

    assert (
        unnamed(build_parser(), "prefast") + unnamed(store.__main__.build_parser(), "store") == []
    )


def test_readme_stays_short():
    assert len((ROOT / "README.md").read_text().encode()) < 10_000


def test_readme_cpu_saving_ranges_match_the_results():
    """The README's CPU figures for Fashion-MNIST span the committed results: the store's
    saving over the means of every two-round run, and the ideal ("a free cache") over every
    profile that times frozen units as FreezeOut runs them (eval, no_grad)."""
    import json

    text = " ".join((ROOT / "README.md").read_text().split())
    m = re.search(
        r"the store saves ([\d.]+)-([\d.]+) %.*?a free cache would save (\d+)-(\d+) %", text
    )
    assert m, "the README's CPU saving sentence is gone; update this test"
    saved, ideal = [], []
    for path in sorted((ROOT / "benchmarks/results").glob("compare-fmnist-*-cpu.json")):
        d = json.loads(path.read_text())
        run = d["runs"]["t0=0.6"]
        if "frozen_fwd_seconds_per_batch" in d.get("profile", {}):
            ideal.append(100 * run["ideal"]["prefast_vs_freezeout"])
        if d.get("rounds", 1) >= 2:
            zarr = next(v for v in run["variants"] if v["variant"] == "prefast-zarr")
            saved.append(100 * (1 - zarr["vs_freezeout"]))
    assert saved and ideal
    assert (float(m[1]), float(m[2])) == (round(min(saved), 1), round(max(saved), 1))
    assert (int(m[3]), int(m[4])) == (int(min(ideal)), int(max(ideal)))


# ---- the option tables of docs/training.md -------------------------------------------------------
OPTIONS_BEGIN = "<!-- options: generated from prefast.cli.build_parser() by tests/test_docs.py -->"
OPTIONS_END = "<!-- /options -->"


def _cell(s: str) -> str:
    return s.replace("|", "\\|")


def _default(a: argparse.Action) -> str:
    if a.nargs == 0:  # a switch
        return ""
    if a.default is None or a.default == argparse.SUPPRESS:
        return ""
    return f"`{a.default}`"


def _help(a: argparse.Action) -> str:
    h = re.sub(r"\s*\(default %\(default\)s\)", "", a.help or "")
    return " ".join(h.replace("%(default)s", str(a.default)).split())


def options_tables() -> str:
    """Markdown tables of ``prefast train`` and ``prefast verify``'s options, by group."""
    from prefast.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    out = []
    for name in ("train", "verify"):
        p = sub.choices[name]
        for g in p._action_groups:
            actions = [a for a in g._group_actions if not isinstance(a, argparse._HelpAction)]
            if not actions:
                continue
            title = g.title if name == "train" else f"prefast verify {g.title}"
            out += [
                f"**{title}**",
                "",
                "| flag | values | default | meaning |",
                "|---|---|---|---|",
            ]
            for a in actions:
                flag = ", ".join(f"`{s}`" for s in a.option_strings) or f"`{a.dest.upper()}`"
                if a.nargs == 0:
                    values = ""
                elif a.metavar:
                    values = " ".join(f"`{v}`" for v in a.metavar.strip("{}").split(","))
                else:
                    values = getattr(a.type, "__name__", "str")
                out.append(
                    f"| {flag} | {_cell(values)} | {_cell(_default(a))} | {_cell(_help(a))} |"
                )
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def _training_doc() -> tuple[str, str, str]:
    text = (ROOT / "docs/training.md").read_text()
    head, rest = text.split(OPTIONS_BEGIN + "\n", 1)
    body, tail = rest.split(OPTIONS_END, 1)
    return head, body, tail


def test_training_options_are_current():
    _, body, _ = _training_doc()
    assert body == "\n" + options_tables() + "\n", (
        "docs/training.md's option tables differ from prefast.cli.build_parser(); regenerate "
        "them with: python tests/test_docs.py --write-options"
    )


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-options"]:
        head, _, tail = _training_doc()
        (ROOT / "docs/training.md").write_text(
            head + OPTIONS_BEGIN + "\n\n" + options_tables() + "\n" + OPTIONS_END + tail
        )
        print("wrote docs/training.md")
    else:
        sys.exit("usage: python tests/test_docs.py --write-options")
