"""The README's and the docs pages' commands, run as written, in the order shown, from a fresh copy.

Every fenced ```bash and ```python block of README.md and of the docs pages in ``PAGES`` is a
test; new blocks are picked up by themselves. ``PAGES`` lists the pages in the order their
blocks run (README.md first; later pages use stores that earlier ones made), and a docs page
with a bash or python block that is not in it (or in ``NOT_RUN``, with its reason) fails
``test_every_page_with_commands_is_listed``. A test's id names the page and the line of the
block's opening fence, e.g. ``docs/causal.md:line12-bash-slow``. The line before a block may
mark it:

    <!-- readme-test: slow -->              runs only under ``-m slow`` (make test-slow,
                                            make test-readme): it takes more than ~20 s
    <!-- readme-test: skip: <reason> -->    never runs (needs a hub model, a GPU, data
                                            that is not shipped); the reason is required

A block may use what earlier blocks made (stores, datasets, adapters): when a block runs,
every earlier block (on its page and on the pages before it) that is not skipped has run first,
in the same working directory; for an unmarked block only the earlier unmarked ones, so the
default suite stays fast
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

import functools
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import typer

from cli import app

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
# Every page whose bash and python blocks run, in the order they run: the blocks of one page
# may use what the blocks of the pages before it made (this is the order the README's
# sections had when they were one page).
PAGES = (
    "README.md",
    "docs/command-line.md",  # stores/toy.zarr, stores/toy__vqa.zarr, stores/toy-ranks.zarr
    "docs/ipython.md",  # reads stores/toy.zarr and stores/toy__vqa.zarr
    "docs/fine-tuning.md",  # adapters/top3, experiments/toy
    "docs/figures-and-report.md",  # reads experiments/toy; writes stores/toy-shapes.zarr, experiments/*-small
    "docs/causal.md",  # stores/toy.patch/ (the patching cache docs/flow.md reuses)
    "docs/flow.md",
    "docs/pretrained.md",
    "docs/performance.md",
    "docs/datasets.md",  # the default suite's one unmarked block
)
# Pages with bash or python blocks that are not commands to run, each with the reason.
NOT_RUN = {
    "docs/design.md": (
        "the design card: API sketches with placeholder stores and inputs (a.zarr, inputs, items)"
    ),
}
MARK = re.compile(r"<!--\s*readme-test:\s*(slow|skip)\s*(?::\s*(.*?))?\s*-->")
FENCE = re.compile(r"^```(\w+)\s*$")
BLOCK_TIMEOUT_S = 3600  # the experiment block takes minutes on 2 idle cores


@dataclass(frozen=True)
class Block:
    page: str  # the page's path from the repository root, as in PAGES
    line: int  # 1-based line of the opening fence
    language: str
    text: str
    mark: str | None  # None, "slow" or "skip"
    reason: str = ""

    @property
    def name(self) -> str:
        return f"{self.page}:line{self.line}-{self.language}" + (f"-{self.mark}" if self.mark else "")

    @property
    def where(self) -> str:
        return f"{self.page} line {self.line}"


def readme_blocks(text: str, page: str = "README.md") -> list[Block]:
    """The bash and python blocks of a page, with the mark on the line before each."""
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
            blocks.append(
                Block(
                    page,
                    i + 1,
                    fence.group(1),
                    "\n".join(lines[i + 1 : end]) + "\n",
                    mark.group(1) if mark else None,
                    (mark.group(2) or "") if mark else "",
                )
            )
        i = end + 1
    return blocks


BLOCKS = [block for page in PAGES for block in readme_blocks((ROOT / page).read_text(encoding="utf-8"), page)]


SHELL_OPERATORS = {
    "&&",
    "||",
    "|",
    ";",
    ">",
    ">>",
    "2>",
    "<",
}  # a command ends at these (spaced, as README writes them)


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
            assert block.reason, f"{block.where}: a skipped block must say why"
    assert any(b.mark is None or b.mark == "slow" for b in BLOCKS)


def test_every_page_with_commands_is_listed():
    """A docs page with a bash or python block is in PAGES (its blocks run) or in NOT_RUN
    (with a reason), so a new page's commands cannot escape this module."""
    assert PAGES[0] == "README.md" and len(set(PAGES)) == len(PAGES)
    for page in [*PAGES, *NOT_RUN]:
        assert (ROOT / page).is_file(), f"{page} is listed in tests/test_readme.py but does not exist"
    assert all(NOT_RUN.values()) and not set(NOT_RUN) & set(PAGES)
    pages = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").rglob("*.md"))
    unlisted = [
        p
        for p in pages
        if p not in PAGES and p not in NOT_RUN and readme_blocks((ROOT / p).read_text(encoding="utf-8"), p)
    ]
    assert not unlisted, (
        f"docs pages with bash/python blocks missing from PAGES in tests/test_readme.py: {unlisted}"
    )


def test_readme_starts_with_the_demo():
    """Right after the title and the short description: the block with `make demo`."""
    first = BLOCKS[0]
    assert first.page == "README.md" and first.line < 15 and first.mark == "skip"
    assert "make demo" in first.text and "make test" in first.text
    head = README.read_text(encoding="utf-8").splitlines()[: first.line - 2]
    assert head[0].startswith("# ") and not any(line.startswith("```") for line in head)


LINK = re.compile(r"\]\(([^)\s]+)\)")  # a markdown link's target


def test_links_resolve():
    """Every relative link of the README and the docs pages names a file that exists, and
    the README links every docs page (its table of contents)."""
    pages = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").rglob("*.md"))]
    broken = []
    for page in pages:
        for target in LINK.findall((ROOT / page).read_text(encoding="utf-8")):
            path = target.split("#", 1)[0]
            if path and not re.match(r"[a-z]+:", path) and not ((ROOT / page).parent / path).exists():
                broken.append(f"{page}: {target}")
    assert not broken, f"links to files that do not exist: {broken}"
    linked = {target.split("#", 1)[0] for target in LINK.findall(README.read_text(encoding="utf-8"))}
    missing = [p for p in pages[1:] if p not in linked]
    assert not missing, f"docs pages the README's contents do not link: {missing}"


OUTSIDE = re.compile(r"\.\./|(?<![\w.:/~])(?:~/|/(?:tmp|home|root|work|mnt|opt|usr|var|shared)\b)")


def test_readme_stays_inside_the_repository():
    """The README names no path outside the clone (a reader's machine has none of them)."""
    text = README.read_text(encoding="utf-8")
    found = [m.group(0) for m in OUTSIDE.finditer(text)]
    assert not found, f"README.md names paths outside the repository: {found}"


@functools.cache
def mechhi_command() -> Any:
    """The click command tree of ``mechhi``, built once (0.1 s a build, ~90 command lines)."""
    return typer.main.get_command(app)


def parse_command(args: list[str]) -> None:
    """Parse ``mechhi args`` as click would before running it (commands resolved, options
    and values checked and converted), without running anything; UsageError if it fails."""
    command, name, ctx = mechhi_command(), "mechhi", None
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
            raise AssertionError(f"{block.where}: mechhi {' '.join(args)}: {error}") from None


OUTPUT = re.compile(r"(?:--out|--png|--figure)[ =](\S+)|(?<![0-9&])>>? (\S+)")  # what a command writes


def _kept_out_of_git(path: str) -> bool:
    """True for a path git ignores or one the repository tracks on purpose (docs/figures)."""
    ignored = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT)
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", path], cwd=ROOT, capture_output=True)
    return ignored.returncode == 0 or tracked.returncode == 0


@pytest.mark.skipif(
    not (ROOT / ".git").exists() or shutil.which("git") is None, reason="needs the git checkout"
)
def test_readme_outputs_stay_out_of_git():
    """A file a README or docs command writes inside the clone must be ignored (or tracked), so
    that following them leaves `git status` clean."""
    written = {
        m.group(1) or m.group(2)
        for b in BLOCKS
        if b.language == "bash"
        for m in OUTPUT.finditer(b.text.replace("\\\n", " "))
    }
    inside = sorted(p for p in written if not Path(p).is_absolute() and not p.startswith(("~", "$")))
    assert inside, "no output paths found in the README's commands"
    untracked = [p for p in inside if not _kept_out_of_git(p)]
    assert not untracked, f"README/docs commands write files git would show as untracked: {untracked}"


class ReadmeRun:
    """One working directory for the whole module; blocks run in PAGES order."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.done: set[int] = set()
        self.env = {k: v for k, v in os.environ.items() if k != "MECHHI_DEBUG"}
        self.env.update(
            PATH=f"{workdir / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(workdir)
        )

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
        result = subprocess.run(
            command,
            cwd=self.workdir,
            env=self.env,
            input=block.text if block.language == "python" else None,
            capture_output=True,
            text=True,
            timeout=BLOCK_TIMEOUT_S,
        )
        where = f"{block.where} ({block.language})"
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
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(
        b"\0"
    )
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
    marks = {"slow": [pytest.mark.slow], "skip": [pytest.mark.skip(reason=f"{block.page}: {block.reason}")]}
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
        result = subprocess.run(
            ["make", "demo"], cwd=clone, env=env, capture_output=True, text=True, timeout=3600
        )
        assert result.returncode == 0, (
            f"make demo #{attempt}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    assert "nothing to trace" in result.stderr
