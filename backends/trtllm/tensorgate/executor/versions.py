"""The installed versions of the libraries an engine is built on, against the ranges tensorgate
declares for them.

The ranges are written once, in pyproject.toml's dependencies, and read back here from the
installed distribution's metadata. An engine whose library is outside its range fails to load
with an error that names the installed version and the supported range, instead of a TypeError
from deep inside the library (a renamed keyword, a moved class).

Without tensorgate's metadata (the source tree on `sys.path`, not installed) there is nothing
to check against, and nothing is checked.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from importlib import metadata

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from tensorgate.executor.engine import EngineError

DISTRIBUTION = "tensorgate"


class UnsupportedVersionError(EngineError):
    """A library an engine needs is missing or outside the range tensorgate supports."""


def declared_ranges(requires: Iterable[str] | None = None) -> dict[str, SpecifierSet] | None:
    """The version range of each runtime dependency (extras left out), by canonical name; None
    when tensorgate is not installed, so that its metadata cannot be read."""
    if requires is None:
        try:
            requires = metadata.requires(DISTRIBUTION) or []
        except metadata.PackageNotFoundError:
            return None
    ranges: dict[str, SpecifierSet] = {}
    for line in requires:
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if req.marker is not None and "extra" in str(req.marker):
            continue  # an optional extra ([test]), not what serving needs
        ranges[canonicalize_name(req.name)] = req.specifier
    return ranges


def check_versions(
    names: Iterable[str],
    *,
    ranges: dict[str, SpecifierSet] | None,
    installed: Callable[[str], str] | None = None,
) -> None:
    """Raises UnsupportedVersionError for the first library in `names` that is not installed or
    whose version is outside its declared range. A name without a declared range, or no ranges
    at all, passes. `installed` gives a library's installed version (default: its metadata)."""
    if ranges is None:
        return
    installed = installed or metadata.version
    for name in names:
        spec = ranges.get(canonicalize_name(name))
        if spec is None:
            continue
        wanted = f"{name}{spec}" if str(spec) else name
        try:
            found = installed(name)
        except metadata.PackageNotFoundError:
            raise UnsupportedVersionError(
                f"{name} is not installed; tensorgate supports {wanted}: pip install '{wanted}'"
            ) from None
        try:
            version = Version(found)
        except InvalidVersion:
            raise UnsupportedVersionError(
                f"{name} {found} is installed, a version tensorgate cannot read; "
                f"tensorgate supports {wanted}"
            ) from None
        # Pre-releases (nightlies, NVIDIA's "a0" builds) are judged by their number; a local
        # label such as torch's "+cu132" does not count.
        if not spec.contains(version, prereleases=True):
            raise UnsupportedVersionError(
                f"{name} {found} is installed, but tensorgate supports {wanted}: "
                f"pip install '{wanted}'"
            )


def require_supported(*names: str) -> None:
    """Checks the installed `names` against tensorgate's declared ranges (see the module doc)."""
    check_versions(names, ranges=declared_ranges())
