"""The README's commands, run as written, in the order shown, from a fresh copy.

Every fenced ```bash and ```python block of README.md is a test; new blocks are picked up
by themselves. The line before a block may mark it:

    <!-- readme-test: slow -->              runs only under ``-m slow`` (make test-slow,
                                            make test-readme): it takes more than ~20 s
    <!-- readme-test: skip: <reason> -->    never runs (needs a hub model, a GPU, data
                                            that is not shipped); the reason is required

A block may use what earlier blocks made (stores, datasets, adapters): when a block runs,
every earlier block that is not skipped has run first, in the same working directory;
for an unmarked block only the earlier unmarked ones, so the default suite stays fast
(an unmarked block must not need a slow one). bash
blocks run under ``bash -e -o pipefail``: every line must succeed. python blocks run
statement by statement as IPython does, printing each expression's value, which must not
be a lazy dask repr where the README promises numbers.

The working directory is a copy of the repository's tracked files (what a clone holds),
with ``.venv/bin/mechhi`` and ``.venv/bin/activate`` standing in for what ``make demo``
installs, so every ``mechhi`` is this checkout's code. Besides, every ``mechhi ...`` line,
skipped blocks' too, must parse against the CLI (commands and options exist), in the
default suite.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer

from mechhi.cli import app

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MARK = re.compile(r"<!--\s*readme-test:\s*(slow|skip)\s*(?::\s*(.*?))?\s*-->")
FENCE = re.compile(r"^```(\w+)\s*$")
BLOCK_TIMEOUT_S = 3600  # the experiment block takes minutes on 2 idle cores


@dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the opening fence
    language: str
    text: str
    mark: str | None  # None, "slow" or "skip"
    reason: str = ""

    @property
    def name(self) -> str:
        return f"line{self.line}-{self.language}" + (f"-{self.mark}" if self.mark else "")


def readme_blocks(text: str) -> list[Block]:
    """The bash and python blocks of a README, with the mark on the line before each."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        mark = MARK.search(lines[i - 1]) if i > 0 else None
        if fence.group(1) in ("bash", "python"):
            blocks.append(Block(i + 1, fence.group(1), "\n".join(lines[i + 1 : end]) + "\n",
                                mark.group(1) if mark else None, (mark.group(2) or "") if mark else ""))  # fmt: skip
        i = end + 1
    return blocks


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))


SHELL_OPERATORS = {"&&", "||", "|", ";", ">", ">>", "2>", "<"}  # a command ends at these (spaced, as README writes them)


def mechhi_lines(block: Block) -> list[list[str]]:
    """The argument lists of every ``mechhi ...`` command in a bash block (one per pipeline
    or ``&&`` part; a redirection's file is not an argument)."""
    joined = block.text.replace("\\\n", " ")
    commands = []
    for line in joined.splitlines():
        part: list[str] = []
        for word in [*shlex.split(line, comments=True), ";"]:
            if word not in SHELL_OPERATORS:
                part.append(word)
                continue
            if part and part[0] == "mechhi":
                commands.append(part[1:])
            part = []
    return commands


def test_readme_marks_are_well_formed():
    assert BLOCKS, "README.md has no bash or python blocks"
    for block in BLOCKS:
        if block.mark == "skip":
            assert block.reason, f"README line {block.line}: a skipped block must say why"
    assert any(b.mark is None or b.mark == "slow" for b in BLOCKS)


def parse_command(args: list[str]) -> None:
    """Parse ``mechhi args`` as click would before running it (commands resolved, options
    and values checked and converted), without running anything; UsageError if it fails."""
    command, name, ctx = typer.main.get_command(app), "mechhi", None
    while True:
        ctx = command.make_context(name, list(args), parent=ctx)
        if not hasattr(command, "resolve_command"):  # a leaf command (typer's groups are not click.Group)
            return
        rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
        name, command, args = command.resolve_command(ctx, rest)


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.language == "bash"], ids=lambda b: b.name)
def test_readme_commands_parse(block):
    """Each mechhi command exists, takes the options it is given and their values parse."""
    for args in mechhi_lines(block):
        try:
            parse_command(args)
        except Exception as error:  # typer's vendored click raises its own UsageError family
            raise AssertionError(f"README line {block.line}: mechhi {' '.join(args)}: {error}") from None


OUTPUT = re.compile(r"(?:--out|--png)[ =](\S+)|(?<![0-9&])>>? (\S+)")  # what a command writes


def _kept_out_of_git(path: str) -> bool:
    """True for a path git ignores or one the repository tracks on purpose (docs/figures)."""
    ignored = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT)
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", path], cwd=ROOT, capture_output=True)
    return ignored.returncode == 0 or tracked.returncode == 0


@pytest.mark.skipif(not (ROOT / ".git").exists() or shutil.which("git") is None, reason="needs the git checkout")
def test_readme_outputs_stay_out_of_git():
    """A file a README command writes inside the clone must be ignored (or tracked), so that
    following the README leaves `git status` clean."""
    written = {m.group(1) or m.group(2) for b in BLOCKS if b.language == "bash"
               for m in OUTPUT.finditer(b.text.replace("\\\n", " "))}  # fmt: skip
    inside = sorted(p for p in written if not Path(p).is_absolute() and not p.startswith(("~", "$")))
    assert inside, "no output paths found in the README's commands"
    untracked = [p for p in inside if not _kept_out_of_git(p)]
    assert not untracked, f"README commands write files git would show as untracked: {untracked}"


class ReadmeRun:
    """One working directory for the whole module; blocks run in README order."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.done: set[int] = set()
        self.env = {k: v for k, v in os.environ.items() if k != "MECHHI_DEBUG"}
        self.env.update(PATH=f"{workdir / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(workdir))

    def upto(self, index: int) -> None:
        """Run the earlier blocks ``index`` may need that have not run yet, then ``index``:
        every one not skipped, or for an unmarked block the unmarked ones."""
        needed = (None,) if BLOCKS[index].mark is None else (None, "slow")
        for i in range(index + 1):
            if i not in self.done and BLOCKS[i].mark in needed:
                self.done.add(i)
                self.run(BLOCKS[i])

    def run(self, block: Block) -> None:
        if block.language == "bash":
            command = ["bash", "-e", "-o", "pipefail", "-c", block.text]
        else:
            command = [sys.executable, "-c", IPYTHON_LIKE]
        result = subprocess.run(command, cwd=self.workdir, env=self.env, input=block.text if block.language == "python"
                                else None, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)  # fmt: skip
        where = f"README line {block.line} ({block.language})"
        assert result.returncode == 0, f"{where} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        assert "Traceback" not in result.stderr, f"{where}:\n{result.stderr[-3000:]}"
        if block.language == "python":
            assert "dask.array<" not in result.stdout, f"{where} prints a lazy dask array:\n{result.stdout}"


# Runs python source from stdin one top-level statement at a time in "single" mode, so an
# expression statement prints its value, as it does at an IPython prompt.
IPYTHON_LIKE = """
import ast, sys
source = sys.stdin.read()
namespace = {"__name__": "__main__"}
for node in ast.parse(source).body:
    exec(compile(ast.Interactive([node]), "<README>", "single"), namespace)
"""


def fresh_copy(target: Path) -> Path:
    """The repository's tracked files (as a clone has them), plus the stand-in venv."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    bin_dir = target / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    # What `source .venv/bin/activate` puts on PATH: mechhi, this python, torchrun.
    for name, run in (("mechhi", "-m mechhi"), ("python", ""), ("torchrun", "-m torch.distributed.run")):
        shim = bin_dir / name
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" {run} "$@"\n')
        shim.chmod(0o755)
    (bin_dir / "activate").write_text(f'export PATH="{bin_dir}:$PATH"\n')
    return target


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory) -> ReadmeRun:
    return ReadmeRun(fresh_copy(tmp_path_factory.mktemp("clone")))


def _param(index: int, block: Block):
    marks = {"slow": [pytest.mark.slow], "skip": [pytest.mark.skip(reason=f"README: {block.reason}")]}
    return pytest.param(index, marks=marks.get(block.mark or "", []), id=block.name)


@pytest.mark.parametrize("index", [_param(i, b) for i, b in enumerate(BLOCKS)])
def test_readme_block(index, readme_run):
    readme_run.upto(index)


@pytest.mark.slow
def test_make_demo_twice_from_a_clone(tmp_path):
    """`make demo && make demo` from a clone of the committed tree: the second run finds the
    store finished and says so. Creates a virtualenv and installs the pinned packages."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    for attempt in (1, 2):
        result = subprocess.run(["make", "demo"], cwd=clone, env=env, capture_output=True, text=True, timeout=3600)
        assert result.returncode == 0, f"make demo #{attempt}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert "nothing to trace" in result.stderr
