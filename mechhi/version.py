"""mechhi's version, in one place below every stage (stores and runs record it)."""

__version__ = "0.1.0"
