"""mechhi's command line, at the top of the tree as the design card draws it.

`python cli.py ...` from a clone, the installed `mechhi` console script and
`python -m mechhi` all run this one typer ``app``. The commands are written per pipeline
stage in `mechhi/commands/` (each parses options, calls one engine function, prints its
result); this file is the entry point that puts them together.
"""

from __future__ import annotations

from mechhi.commands import app, main

__all__ = ["app", "main"]

if __name__ == "__main__":
    main()
