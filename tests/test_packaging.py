"""The supported-version floors: pyproject.toml's dependencies and the pins of the minimum-versions CI run agree."""
import re
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _dependencies():
    text = (ROOT / 'pyproject.toml').read_text()
    block = re.search(r'^dependencies = \[(.*?)^\]', text, flags=re.M | re.S).group(1)
    reqs = [Requirement(s) for s in re.findall(r'"([^"]+)"', block)]
    return {r.name: r for r in reqs}


def _pins():
    lines = (ROOT / '.ci' / 'min-constraints.txt').read_text().splitlines()
    reqs = [Requirement(line) for line in (raw.split('#')[0].strip() for raw in lines) if line]
    assert all(len(r.specifier) == 1 and next(iter(r.specifier)).operator == '==' for r in reqs), reqs
    return {r.name: Version(next(iter(r.specifier)).version) for r in reqs}


def test_min_constraints_pin_pyproject_floors():
    deps, pins = _dependencies(), _pins()
    assert set(pins) == {'torch', 'torchvision', 'timm'}, pins
    for name in ('torch', 'timm'):
        floors = [Version(s.version) for s in deps[name].specifier if s.operator == '>=']
        assert len(floors) == 1, deps[name]
        floor = floors[0]
        # the pin satisfies the requirement and is the floor's own release (2.5 -> 2.5.x, 1.0.31 -> 1.0.31)
        assert deps[name].specifier.contains(pins[name]), (name, pins[name], deps[name])
        assert pins[name].release[:len(floor.release)] == floor.release, (name, pins[name], floor)
    # torchvision 0.N is built for torch 2.(N - 15): 0.20 for torch 2.5
    assert pins['torchvision'].release[:2] == (0, pins['torch'].minor + 15), pins


def test_ci_run_uses_the_constraints_when_asked():
    script = (ROOT / '.ci' / 'run').read_text()
    assert 'CI_MIN_VERSIONS' in script and '.ci/min-constraints.txt' in script
