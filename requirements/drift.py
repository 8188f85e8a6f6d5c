"""Print how this environment's packages differ from the lock: the report `make test-latest` opens with.

Run by the environment's own python, so it sees what pip installed there: ``python requirements/drift.py
requirements/lock.txt``. It reports and exits 0; the test suite after it is what passes or fails.
"""

import re
import sys
from importlib.metadata import distributions

from packaging.utils import canonicalize_name


def installed() -> dict[str, str]:
    """Every distribution in this environment by its PEP 503 name (``typing_extensions`` -> ``typing-extensions``)."""
    return {canonicalize_name(d.metadata["Name"]): d.version for d in distributions()}


def pins(lock_path: str) -> dict[str, str]:
    pinned = {}
    with open(lock_path) as lock:
        for line in lock:
            # a name, its extras if any (pip-compile keeps them: math-verify[antlr4-9-3]), its version
            match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^]]*\])?==(\S+)", line)
            if match:
                pinned[canonicalize_name(match[1])] = match[2]
    return pinned


def main(lock_path: str) -> None:
    locked = pins(lock_path)
    present = installed()
    for not_locked in ("g2rpo", "pip"):  # the project itself, and the installer the venv came with
        present.pop(not_locked, None)
    changed = [
        f"  {n}: {locked[n]} -> {v}" for n, v in sorted(present.items()) if n in locked and v != locked[n]
    ]
    added = [f"  {n}: {v} (not in the lock)" for n, v in sorted(present.items()) if n not in locked]
    missing = [f"  {n}: {v} -> not installed" for n, v in sorted(locked.items()) if n not in present]
    print(
        f"Differences from {lock_path}: {len(changed)} changed, {len(added)} added, {len(missing)} not installed"
    )
    for line in changed + added + missing:
        print(line)


if __name__ == "__main__":
    main(sys.argv[1])
