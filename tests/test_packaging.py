import os

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_every_package_directory_is_installed():
    """A built wheel holds only the packages pyproject.toml lists: each folder with an
    `__init__.py` under a mapped package must be listed (new kinds' subpackages too)."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        tool = tomllib.load(f)["tool"]["setuptools"]
    listed, mapping = set(tool["packages"]), tool["package-dir"]
    found = set()
    for package, folder in mapping.items():
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, folder)):
            dirnames[:] = [d for d in dirnames if not d.startswith((".", "__"))]
            if "__init__.py" in filenames:
                rel = os.path.relpath(dirpath, os.path.join(ROOT, folder))
                found.add(package if rel == "." else f"{package}.{rel.replace(os.sep, '.')}")
    assert found - listed == set(), "add these to [tool.setuptools] packages"
