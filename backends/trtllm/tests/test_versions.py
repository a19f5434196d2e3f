"""The version check at engine load: ranges read from tensorgate's metadata, clear errors."""

from __future__ import annotations

from importlib import metadata
from types import SimpleNamespace

import pytest

from tensorgate.executor import versions
from tensorgate.executor.engine import EngineError
from tensorgate.executor.versions import (
    UnsupportedVersionError,
    check_versions,
    declared_ranges,
)

REQUIRES = [
    "torch>=2.6",
    "transformers<6,>=5.18",
    "grpcio>=1.85.1",
    "pytest>=8; extra == 'test'",
]


def installed(versions_by_name: dict[str, str]):
    def version(name: str) -> str:
        if name not in versions_by_name:
            raise metadata.PackageNotFoundError(name)
        return versions_by_name[name]

    return version


def test_ranges_are_the_runtime_requirements_only():
    ranges = declared_ranges(REQUIRES)
    assert set(ranges) == {"torch", "transformers", "grpcio"}
    assert "5.18.0" in ranges["transformers"]
    assert "5.17.0" not in ranges["transformers"]
    assert "6.0.0" not in ranges["transformers"]


def test_installed_tensorgate_declares_torch_and_transformers_ranges():
    ranges = declared_ranges()
    assert ranges is not None, "tensorgate is not installed: its metadata cannot be read"
    assert str(ranges["torch"]), "torch has no declared range"
    assert str(ranges["transformers"]), "transformers has no declared range"
    # The environment the tests run in is one tensorgate supports.
    check_versions(("torch", "transformers"), ranges=ranges)


@pytest.mark.parametrize(
    "found",
    ["5.18.0", "5.24.0", "5.99.1", "5.30.0rc1", "5.20.0.dev0"],
)
def test_a_version_inside_the_range_passes(found):
    check_versions(
        ["transformers"],
        ranges=declared_ranges(REQUIRES),
        installed=installed({"transformers": found}),
    )


def test_a_local_build_label_does_not_count():
    check_versions(
        ["torch"], ranges=declared_ranges(REQUIRES), installed=installed({"torch": "2.15.0+cu132"})
    )


@pytest.mark.parametrize("found", ["5.17.0", "4.57.6", "6.0.0", "6.1.0rc1"])
def test_a_version_outside_the_range_names_both(found):
    with pytest.raises(UnsupportedVersionError) as err:
        check_versions(
            ["transformers"],
            ranges=declared_ranges(REQUIRES),
            installed=installed({"transformers": found}),
        )
    message = str(err.value)
    assert f"transformers {found} is installed" in message
    assert "transformers<6,>=5.18" in message
    assert isinstance(err.value, EngineError)  # the executor prints it and exits 1


def test_a_missing_library_is_named():
    with pytest.raises(UnsupportedVersionError, match=r"torch is not installed.*torch>=2\.6"):
        check_versions(["torch"], ranges=declared_ranges(REQUIRES), installed=installed({}))


def test_an_unreadable_version_is_an_error_not_a_crash():
    with pytest.raises(UnsupportedVersionError, match="torch banana is installed"):
        check_versions(
            ["torch"], ranges=declared_ranges(REQUIRES), installed=installed({"torch": "banana"})
        )


def test_no_metadata_means_no_check():
    check_versions(["torch"], ranges=None, installed=installed({}))


def test_the_transformers_engine_refuses_an_unsupported_transformers(monkeypatch):
    """The check runs before the engine module is imported: an old transformers would fail that
    import itself (a class it lacks), far from any useful message."""
    from tensorgate.executor.engines import load_engine

    def fake(name: str) -> str:
        return {"transformers": "5.17.0", "torch": "2.6.0"}[name]

    monkeypatch.setattr(versions.metadata, "version", fake)
    monkeypatch.setattr(
        versions, "declared_ranges", lambda requires=None: declared_ranges(REQUIRES)
    )
    config = SimpleNamespace(engine="transformers")  # the check comes before anything else
    with pytest.raises(UnsupportedVersionError, match=r"transformers 5\.17\.0 is installed"):
        load_engine(config)
