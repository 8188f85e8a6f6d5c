"""The committed lock is what `make install` puts in .venv: it must cover pyproject.toml and be what ran."""

from __future__ import annotations

import re
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from requirements.drift import installed, pins

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock.txt"


def declared() -> list[Requirement]:
    """The dependencies and every extra `make lock` resolves ([tool.pip-tools] extra: dev, docs)."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = pyproject["project"]
    extras = pyproject["tool"]["pip-tools"]["extra"]
    assert "dev" in extras, "make test needs the dev extras in the lock"
    return [Requirement(r) for r in project["dependencies"]] + [
        Requirement(r) for extra in extras for r in project["optional-dependencies"][extra]
    ]


def test_every_declared_dependency_is_pinned_within_its_range():
    """Fails after a dependency edit in pyproject.toml without `make lock`."""
    locked = pins(str(LOCK))
    for requirement in declared():
        name = canonicalize_name(requirement.name)
        assert name in locked, (
            f"{requirement.name} is in pyproject.toml but not in {LOCK.name}: run `make lock`"
        )
        version = Version(locked[name])
        assert requirement.specifier.contains(version, prereleases=True), (
            f"{LOCK.name} pins {requirement.name}=={version}, outside pyproject.toml's {requirement}: run `make lock`"
        )


def test_the_lock_resolves_against_the_cpu_torch_make_installs():
    """pip-compile on a machine without the CPU wheel resolves PyPI's CUDA build, whose nvidia-* and triton
    pins would then install gigabytes on every CPU machine."""
    locked = pins(str(LOCK))
    torch_pin = re.search(r"^torch==(\S+)", (ROOT / "requirements" / "torch.txt").read_text(), re.M)[1]
    assert Version(locked["torch"]).public == torch_pin
    assert Version(locked["torch"]).local == "cpu"
    assert [name for name in locked if name.startswith("nvidia-") or name == "triton"] == []


def test_the_lock_names_no_machine_specific_index():
    """pip-compile copies this machine's find-links and index URLs unless told not to (pyproject's [tool.pip-tools])."""
    options = [line for line in LOCK.read_text().splitlines() if line.startswith("-")]
    assert options == []


def test_the_environment_is_the_lock():
    """The suite ran on the locked versions, so the lock is a set that passed. torch is left out: `make
    TORCH=...` chooses it (a CUDA build on GPU machines). `make test-latest` deselects this test."""
    present = installed()
    differing = {
        name: (version, present.get(name))
        for name, version in pins(str(LOCK)).items()
        if name != "torch" and present.get(name) != version
    }
    assert differing == {}, (
        f"installed versions differ from {LOCK.name} (locked, installed): {differing}; run `make install`"
    )
