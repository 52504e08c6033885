"""pyproject.toml uses no deprecated metadata, and its extras match the docs.

The build itself is checked by .ci/run, which fails on any
SetuptoolsDeprecationWarning of the README's install command.
"""

import ast
import os
import re

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def pyproject():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_license_is_an_spdx_expression(pyproject):
    # The table form and the License classifiers are deprecated by
    # setuptools (PEP 639), and builds using them stop working in 2027.
    project = pyproject["project"]
    assert project["license"] == "BSD-3-Clause"
    assert not [c for c in project["classifiers"] if c.startswith("License ::")]
    (setuptools,) = [
        r for r in pyproject["build-system"]["requires"] if r.startswith("setuptools")
    ]
    minimum = re.fullmatch(r"setuptools>=(\d+)(\.\d+)*", setuptools)
    assert minimum and int(minimum.group(1)) >= 77, setuptools


def test_doc_extra_installs_the_theme_of_conf_py(pyproject):
    with open(os.path.join(REPO, "doc", "conf.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    (theme,) = [
        node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and [getattr(t, "id", None) for t in node.targets] == ["html_theme"]
    ]
    extra = pyproject["project"]["optional-dependencies"]["doc"]
    themes = [r for r in extra if "theme" in r]
    # alabaster comes with sphinx; any other theme is a package of its own.
    expected = [] if theme == "alabaster" else [theme.replace("_", "-")]
    assert themes == expected


def test_every_subpackage_is_installed(pyproject):
    # An editable install finds any subpackage, a wheel only those selected:
    # a missing one breaks `pip install .` alone, which the tests do not use.
    from setuptools import find_packages

    selected = pyproject["tool"]["setuptools"].get("packages")
    if isinstance(selected, dict):
        find = selected["find"]
        assert find.get("namespaces", True) is False
        selected = find_packages(
            REPO, include=find.get("include", ["*"]), exclude=find.get("exclude", ())
        )
    on_disk = [
        os.path.relpath(folder, REPO).replace(os.sep, ".")
        for folder, _, files in os.walk(os.path.join(REPO, "annlearn"))
        if "__init__.py" in files
    ]
    assert sorted(selected) == sorted(on_disk)


def test_test_extra_installs_the_dask_extra(pyproject):
    # The README's test command installs the test extra only; CI runs it, and
    # tests/test_dask.py must run there, not skip.
    extras = pyproject["project"]["optional-dependencies"]
    assert set(extras["dask"]) <= set(extras["test"])
