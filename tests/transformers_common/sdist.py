"""Fetch transformers' common test mixins for the installed transformers version and import them.

`load_common_tests()`:
1. downloads the source distribution of `transformers==<transformers.__version__>` from PyPI
   (`pip download --no-binary :all: --no-deps`) the first time, and keeps only its `tests/` folder, in
   `<repo>/.cache/transformers-sdist/<version>/tests` (git-ignored);
2. imports that folder as the package `hf_transformers_tests` (by file location, never through `sys.path`), so
   its relative imports (`from .generation.test_utils import ...`) work and this repository's own `tests/` is not
   touched;
3. puts our stand-ins in place of the three modules the sdist lacks but its common files import (see STANDINS).

A failed download raises CommonTestsUnavailable: the test modules turn it into a failing test (not a skip, which
would hide the suite), and the rest of the test run goes on. Setting SELFATTN_SKIP_TRANSFORMERS_COMMON=1 skips
them on purpose instead (offline work).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

import pytest
import transformers

PACKAGE = "hf_transformers_tests"
REPO_ROOT = Path(__file__).resolve().parents[2]
SKIP_ENV = "SELFATTN_SKIP_TRANSFORMERS_COMMON"
DOWNLOAD_TIMEOUT_S = 600

# module of the sdist's tests package that the common files import -> our stand-in (a sibling module here)
STANDINS = {
    "exporters.test_export": "standin_export",  # ExportTesterMixin, base class of ModelTesterMixin
    "generation.test_utils": "standin_generation",  # GenerationTesterMixin
    "utils.test_configuration_utils": "standin_configuration_utils",  # config_common_kwargs, for ConfigTester
}
# the sdist's modules we use; test_training_mixin only exists in recent versions
REQUIRED_MODULES = ("test_modeling_common", "test_configuration_common")
OPTIONAL_MODULES = ("test_training_mixin",)


class CommonTestsUnavailable(Exception):
    """The common tests could not be fetched or imported; `skip` is True only when the user asked to skip them."""

    def __init__(self, message: str, skip: bool = False):
        super().__init__(message)
        self.skip = skip


def cache_root() -> Path:
    return REPO_ROOT / ".cache" / "transformers-sdist"


def sdist_tests_folder(version: str) -> Path:
    """The `tests/` folder of the transformers `version` sdist, downloaded and extracted on first use."""
    version_dir = cache_root() / version
    target = version_dir / "tests"
    if (target / ".complete").exists():
        return target
    version_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=version_dir, prefix="download-") as scratch:
        command = [
            sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
            "--disable-pip-version-check", "--quiet", f"transformers=={version}", "--dest", scratch,
        ]  # fmt: skip
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise CommonTestsUnavailable(f"`{' '.join(command)}` took over {DOWNLOAD_TIMEOUT_S} s") from None
        archives = sorted(Path(scratch).glob("transformers-*.tar.gz"))
        if result.returncode != 0 or not archives:
            raise CommonTestsUnavailable(
                f"Could not download the transformers {version} sdist, which holds the common model tests "
                f"(`{' '.join(command)}` exited {result.returncode}):\n{result.stderr[-3000:]}\n"
                f"Set {SKIP_ENV}=1 to skip these tests on purpose when offline."
            )
        extracted = Path(scratch) / "tests"
        extract_tests_folder(archives[0], extracted)
        missing = [name for name in REQUIRED_MODULES if not (extracted / f"{name}.py").exists()]
        if missing:
            raise CommonTestsUnavailable(f"The transformers {version} sdist has no tests/{missing[0]}.py.")
        # The folder becomes a package (its files use relative imports); ConfigTester also loads this file.
        (extracted / "__init__.py").write_text('"""transformers\' tests/ folder from its sdist (generated)."""\n')
        (extracted / ".complete").write_text(f"transformers {version} sdist: {archives[0].name}\n")
        try:
            os.replace(extracted, target)
        except OSError:  # another run extracted it meanwhile
            if not (target / ".complete").exists():
                raise
    return target


def extract_tests_folder(archive: Path, destination: Path) -> None:
    """Extract `<top>/tests/**` of the sdist `archive` into `destination` (without the `<top>/tests` prefix)."""
    destination.mkdir()
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if len(parts) < 3 or parts[1] != "tests" or not member.isfile() or ".." in parts:
                continue
            path = destination.joinpath(*parts[2:])
            path.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as source, open(path, "wb") as target:
                shutil.copyfileobj(source, target)


def install_package(folder: Path) -> types.ModuleType:
    """Import `folder` as the package PACKAGE, with our stand-ins as the submodules it lacks."""
    if PACKAGE in sys.modules:
        return sys.modules[PACKAGE]
    spec = importlib.util.spec_from_file_location(
        PACKAGE, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = package
    spec.loader.exec_module(package)
    for dotted, standin_name in STANDINS.items():
        if (folder / (dotted.replace(".", "/") + ".py")).exists():
            continue  # a later sdist that ships the real module: use it
        parent = package
        for part in dotted.split(".")[:-1]:
            name = f"{parent.__name__}.{part}"
            if name not in sys.modules:
                sub = types.ModuleType(name, f"Stand-in package for the sdist's missing tests/{part}/ folder.")
                sub.__path__ = []
                sys.modules[name] = sub
                setattr(parent, part, sub)
            parent = sys.modules[name]
        standin = importlib.import_module(f"{__package__}.{standin_name}")
        sys.modules[f"{PACKAGE}.{dotted}"] = standin
        setattr(parent, dotted.split(".")[-1], standin)
    return package


_loaded: types.SimpleNamespace | CommonTestsUnavailable | None = None


def load_common_tests() -> types.SimpleNamespace:
    """The sdist's common test modules for the running transformers, as a namespace of their names (once per
    process). Raises CommonTestsUnavailable if they cannot be had."""
    global _loaded
    if _loaded is None:
        try:
            _loaded = _load()
        except CommonTestsUnavailable as error:
            _loaded = error
    if isinstance(_loaded, CommonTestsUnavailable):
        raise _loaded
    return _loaded


def _load() -> types.SimpleNamespace:
    if os.environ.get(SKIP_ENV, "").lower() in ("1", "true", "yes"):
        raise CommonTestsUnavailable(f"{SKIP_ENV} is set: transformers' common model tests are not run", skip=True)
    try:
        import parameterized  # noqa: F401  (test_modeling_common imports it)
    except ImportError:
        raise CommonTestsUnavailable(
            "transformers' test_modeling_common.py needs the `parameterized` package: pip install parameterized "
            "(it belongs in the project's dev extras)."
        ) from None
    version = transformers.__version__
    folder = sdist_tests_folder(version)
    install_package(folder)
    namespace = types.SimpleNamespace(version=version, folder=folder)
    for name in REQUIRED_MODULES + OPTIONAL_MODULES:
        if name in OPTIONAL_MODULES and not (folder / f"{name}.py").exists():
            continue
        module = importlib.import_module(f"{PACKAGE}.{name}")
        for attribute in dir(module):
            if not attribute.startswith("_"):
                setattr(namespace, attribute, getattr(module, attribute))
    namespace.has_training_mixin = hasattr(namespace, "TrainingTesterMixin")
    return namespace


def unavailable_test(error: CommonTestsUnavailable):
    """A test standing for a whole module whose common tests could not be loaded: it fails (or skips, when asked
    to) with the reason, so that the rest of the run is collected and runs as usual."""

    def test_transformers_common_tests_available():
        if error.skip:
            pytest.skip(str(error))
        pytest.fail(str(error), pytrace=False)

    return test_transformers_common_tests_available
