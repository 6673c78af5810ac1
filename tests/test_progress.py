"""`mechhi.progress`: off a terminal (stderr into a log file), plain lines while the work
runs, every ~5% of it or every ~10 s, and the last state at the end."""

from __future__ import annotations

import re

from mechhi import progress


def test_plain_lines_every_five_percent_while_the_work_runs(capsys):
    with progress.progress_bar("tracing", 100) as bar:
        for done in range(1, 101):
            bar.advance(1, info="loss 0.5")
            if done == 10:  # mid-run, the log already holds what was done
                assert capsys.readouterr().err.splitlines()[-1].startswith("tracing: 10/100 (10%)")
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1].startswith("tracing: 100/100 (100%)") and lines[-1].endswith(" s loss 0.5")
    assert all(re.fullmatch(r"tracing: \d+/100 \(\d+%\) \d+\.\d s loss 0\.5", line) for line in lines), lines
    assert len(lines) == 18  # one every 5 units: 5 and 10 were read mid-run, 15 ... 100 remain


def test_plain_lines_every_ten_seconds_of_slow_steps(capsys, monkeypatch):
    clock = iter([0.0, 4.0, 11.0, 12.0, 30.0])  # began, then one reading per advance
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    lines = progress.PlainLines("fine-tuning", 1000)
    for _ in range(4):
        lines.advance()
    written = capsys.readouterr().err.splitlines()
    assert written == ["fine-tuning: 2/1000 (0%) 11.0 s", "fine-tuning: 4/1000 (0%) 30.0 s"]


def test_a_resumed_run_counts_from_where_it_was_and_an_early_stop_leaves_its_last_state(capsys):
    with progress.progress_bar("training", 10, completed=7) as bar:
        bar.advance(1)
    assert capsys.readouterr().err.splitlines()[0].startswith("training: 8/10 (80%) ")
    with progress.progress_bar("fine-tuning", 100) as bar:
        for _ in range(3):  # stopped early: below the 5% a line waits for
            bar.advance(1)
    written = capsys.readouterr().err.splitlines()
    assert len(written) == 1 and written[0].startswith("fine-tuning: 3/100 (3%) "), written


def test_hidden_progress_writes_nothing(capsys):
    for _ in progress.tracked(range(5), "ablating", show=False):
        pass
    assert capsys.readouterr().err == ""
