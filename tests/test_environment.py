"""environment.yml stays in step with pyproject.toml; the lock pins every dependency."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _pyproject_requirements():
    d = tomllib.loads((ROOT / "pyproject.toml").read_text())
    reqs = list(d["project"]["dependencies"])
    for extra in d["project"]["optional-dependencies"].values():
        reqs.extend(r for r in extra if r not in reqs)
    return reqs


def _name(req):
    return re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_lists_exactly_the_pyproject_requirements():
    env = (ROOT / "environment.yml").read_text()
    listed = re.findall(r'^\s+- "([^"]+)"$', env, flags=re.M)
    listed = [r for r in listed if r != "-e ."]
    assert sorted(listed) == sorted(_pyproject_requirements()), (
        "environment.yml is out of step with pyproject.toml: update its pip section")
    assert "python>=3.11" in env


def test_lock_pins_every_requirement_exactly():
    lock = (ROOT / "requirements.lock").read_text()
    pinned = {m.group(1).lower() for m in re.finditer(r"^([A-Za-z0-9_.\-]+)==", lock, flags=re.M)}
    for req in _pyproject_requirements():
        assert _name(req) in pinned, f"{_name(req)} is not pinned in requirements.lock"
