"""Versions in one place: the package's own (imported by the package and by the files it writes), and the
installed version of another distribution, for the reports that record them."""

from importlib import metadata

__version__ = "0.1.0"


def installed_version(distribution: str) -> str | None:
    """The installed version of ``distribution`` (a name on the package index), or None where it is not installed."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None
