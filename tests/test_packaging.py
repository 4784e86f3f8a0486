"""Packaging: declared dependencies and their floors, one version, the license, markers."""

from __future__ import annotations

import ast
import hashlib
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version
from setuptools.config.pyprojecttoml import read_configuration

import lightning_attn

ROOT = Path(__file__).resolve().parents[1]
PROJECT = read_configuration(ROOT / "pyproject.toml")["project"]
REQUIREMENTS = {Requirement(r).name: Requirement(r) for r in PROJECT["dependencies"]}
DIST_OF_IMPORT = {"sklearn": "scikit-learn", "PIL": "pillow", "google_crc32c": "google-crc32c"}
OPTIONAL = {"triton"}  # ships with CUDA builds of torch; imported only where available

# The first release that has what the package uses, with the use. Lowering a floor below
# one of these declares support for a version that cannot run the code.
FLOORS = {
    "torch": ("2.4", "torch.library.custom_op / register_autograd (torch.compiler."
                     "is_compiling: 2.3)"),
    "lightning": ("2.5.3", "ModelCheckpoint(save_on_exception=...) in the CLI"),
    "jsonargparse": ("4.39", "LightningCLI of lightning 2.5.3 passes applied_instantiation_links"),
    "torchmetrics": ("1.6", "Metric.merge_state (the localisation metric's merge test)"),
    "numpy": ("1.22", "first feature release supporting Python 3.10 (requires-python)"),
    "pillow": ("10.1", "ImageFont.load_default(size=...) for the attention-map labels"),
}


def _third_party_imports() -> set[str]:
    """Top-level names of every module the package imports, except optional imports
    (inside ``try: ... except ImportError``) and the standard library."""
    names: set[str] = set()
    for path in (ROOT / "lightning_attn").rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        optional: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Try) and any(
                h.type is not None and "ImportError" in ast.unparse(h.type)
                or h.type is not None and "ModuleNotFoundError" in ast.unparse(h.type)
                for h in node.handlers
            ):
                optional |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if id(node) in optional:
                continue
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"lightning_attn"}


def test_every_imported_package_is_declared() -> None:
    imported = {DIST_OF_IMPORT.get(n, n) for n in _third_party_imports()} - OPTIONAL
    assert "numpy" in imported  # the scan sees what the data module imports
    assert imported <= set(REQUIREMENTS), sorted(imported - set(REQUIREMENTS))


@pytest.mark.parametrize("dist", sorted(FLOORS))
def test_floor_is_the_first_release_with_what_the_code_uses(dist: str) -> None:
    floor, use = FLOORS[dist]
    minimums = [Version(s.version) for s in REQUIREMENTS[dist].specifier if s.operator == ">="]
    assert minimums and min(minimums) >= Version(floor), (
        f"{dist} floor {REQUIREMENTS[dist].specifier} is below {floor}: {use}"
    )


def test_one_source_of_the_version() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    assert "dynamic = [\"version\"]" in text and "\nversion = \"" not in text
    # setuptools reads it from the package, as a build would
    assert PROJECT["version"] == lightning_attn.__version__


def test_license_is_the_full_apache_2_text() -> None:
    assert PROJECT["license"] == "Apache-2.0" and PROJECT["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_bytes()
    # md5 of https://www.apache.org/licenses/LICENSE-2.0.txt
    assert hashlib.md5(text).hexdigest() == "3b83ef96387f14655fc854ddc3c6bd57"


def test_markers_are_registered_and_strict(pytestconfig) -> None:
    assert pytestconfig.getoption("strict_markers")
    assert any(m.startswith("slow:") for m in pytestconfig.getini("markers"))


def test_optional_dependencies_are_extras_that_the_dev_extra_installs() -> None:
    """matplotlib (the report) and scikit-learn (the digits) are extras, not dependencies;
    ``make test`` / ``make demo`` install the dev extra, which includes every extra."""
    from lightning_attn.environment import EXTRAS

    extras = PROJECT["optional-dependencies"]
    for dist, extra in EXTRAS.values():
        assert dist not in REQUIREMENTS, dist
        assert dist in {Requirement(r).name for r in extras[extra]}, (dist, extra)
    (own,) = [r for r in map(Requirement, extras["dev"]) if r.name == PROJECT["name"]]
    assert set(own.extras) == {extra for _, extra in EXTRAS.values()}


def test_the_dev_extra_never_brings_another_torch() -> None:
    """transformers (dev extra) is declared without an extra: the installed release's own
    requirements then hold no torch, so installing it never replaces the CPU or CUDA build
    a user chose."""
    from importlib import metadata

    dev = {Requirement(r).name: Requirement(r) for r in PROJECT["optional-dependencies"]["dev"]}
    assert not dev["transformers"].extras
    requires = metadata.requires("transformers") or []  # the dev extra installs it
    unconditional = [Requirement(r) for r in requires if "extra ==" not in r]
    assert not [r for r in unconditional if r.name in ("torch", "torchvision")], unconditional
