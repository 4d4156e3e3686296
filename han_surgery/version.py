"""The package version, in one place (``pyproject.toml`` reads it; no module imports the package root for it)."""

__version__ = "0.2.0.dev0"
