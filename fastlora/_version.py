"""The package version, in one place (imported by the package and by the files it writes)."""

__version__ = "0.1.0"
