"""The release artefacts: what ``python -m build`` puts in the wheel and the sdist.

``.ci/run`` builds the wheel and sdist once (``python -m build``, then ``twine check``) and
points ``MASKSD_DIST_DIR`` at them; run alone, this module builds them itself into a temporary
folder (``--no-isolation`` when setuptools >= 77 is installed, a few seconds; otherwise an
isolated build, which needs the package index).
"""

from __future__ import annotations

import ast
import datetime
import email
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
CORE_REQUIREMENTS = {"torch", "einops", "numpy"}
RELEASE_HEADING = re.compile(r"^## \[(\d+\.\d+\.\d+)\] - (\d{4}-\d{2}-\d{2})\s*$", re.MULTILINE)


def _source_version() -> str:
    """``masksd.__version__`` read from the source file (the one place the version lives)."""
    tree = ast.parse((ROOT / "masksd" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__version__"
                                                for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("masksd/__init__.py defines no __version__")


def _setuptools_is_recent() -> bool:
    try:
        import setuptools
    except ImportError:
        return False
    return int(setuptools.__version__.split(".")[0]) >= 77


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    given = os.environ.get("MASKSD_DIST_DIR")
    if given:
        return Path(given)
    pytest.importorskip("build", reason="building the wheel needs the 'build' package (extra 'dev')")
    out = tmp_path_factory.mktemp("dist")
    command = [sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)]
    if _setuptools_is_recent():
        command.insert(3, "--no-isolation")
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def _one(dist: Path, pattern: str) -> Path:
    version = _source_version()
    found = sorted(dist.glob(pattern.format(version=version)))
    assert len(found) == 1, f"expected one {pattern} for version {version} in {dist}, found {found}"
    return found[0]


def _floor_pins() -> dict[str, str]:
    """``name -> version`` of requirements-floor.txt (names normalised as pip does)."""
    pins = {}
    for line in (ROOT / "requirements-floor.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_every_declared_floor_is_the_version_ci_tests_it_on():
    """A ``>=`` floor in pyproject.toml is true only when .ci/run's floor environment installs
    exactly that version; open_clip's [examples] floor (3.0) is the one exception, since it needs a
    newer timm than the [timm] floor (requirements-floor.txt says so)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"])
    for extra in ("clip", "hf", "timm", "test", "examples"):
        declared += project["optional-dependencies"][extra]
    pins, checked = _floor_pins(), []
    for requirement in declared:
        name, floor = re.match(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", requirement).groups()
        name = re.sub(r"[-_.]+", "-", name).lower()
        if requirement in project["optional-dependencies"]["examples"] and name == "open-clip-torch":
            continue
        pinned = pins.get(name)
        assert pinned is not None, f"{name} (>= {floor}) is not installed by requirements-floor.txt"
        assert ([int(p) for p in pinned.split(".")][: len(floor.split("."))]
                == [int(p) for p in floor.split(".")]), (
            f"{name}: pyproject says >= {floor}, the floor environment installs {pinned}")
        checked.append(name)
    assert {"torch", "numpy", "einops", "open-clip-torch", "timm", "transformers"} <= set(checked)


def test_version_lives_in_one_place():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "masksd.__version__"}
    import masksd

    releases = [(datetime.date.fromisoformat(day), version)
                for version, day in RELEASE_HEADING.findall((ROOT / "CHANGELOG.md").read_text())]
    assert releases, "CHANGELOG.md has no dated release heading '## [x.y.z] - YYYY-MM-DD'"
    newest = max(releases, key=lambda release: release[0])[1]  # a tie: the upper one
    assert masksd.__version__ == _source_version() == newest, (
        f"masksd.__version__ is {masksd.__version__} but the newest dated CHANGELOG section is {newest}"
    )


def test_wheel_holds_only_the_package_and_its_metadata(dist):
    version = _source_version()
    wheel = _one(dist, "masksd-{version}-py3-none-any.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = email.message_from_bytes(archive.read(f"masksd-{version}.dist-info/METADATA"))
    info = f"masksd-{version}.dist-info/"
    strays = [name for name in names if not name.startswith(("masksd/", info))]
    assert not strays, f"files outside masksd/ and {info}: {strays}"
    assert "masksd/py.typed" in names
    for module in ("__init__.py", "towers.py", "wrapper.py", "adapters/open_clip.py",
                   "adapters/hf_clip.py", "adapters/timm.py"):
        assert f"masksd/{module}" in names, module
    assert not any("__pycache__" in name or name.endswith(".pyc") for name in names)
    assert f"{info}licenses/LICENSE" in names
    assert metadata["Name"] == "masksd" and metadata["Version"] == version
    # unconditional requirements are the core three; everything else sits behind an extra
    unconditional = {
        requirement.split(">")[0].split("=")[0].split("<")[0].strip()
        for requirement in metadata.get_all("Requires-Dist")
        if "extra ==" not in requirement
    }
    assert unconditional == CORE_REQUIREMENTS
    assert {"clip", "hf", "timm", "dev"} <= set(metadata.get_all("Provides-Extra"))


def test_sdist_builds_the_same_package(dist):
    sdist = _one(dist, "masksd-{version}.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    for required in ("pyproject.toml", "README.md", "LICENSE", "PKG-INFO", "masksd/py.typed",
                     "masksd/__init__.py", "masksd/adapters/timm.py"):
        assert required in names, required
    assert not any(name.startswith(("tests/", "examples/", "benchmarks/")) for name in names)
