"""The supported-version floors: pyproject.toml's dependencies and the pins of the minimum-versions CI run agree;
``.ci/run`` installs with those pins when asked and fails when pytest does."""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

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


def _run_ci(tmp_path, **env):
    """Runs .ci/run from a copy of .ci/ with stand-ins for python3 (its venv) and the venv's python, which record
    each command line and its working directory; the stand-in pytest exits with FAKE_PYTEST_RC."""
    repo, shims, log = tmp_path / 'repo', tmp_path / 'shims', tmp_path / 'commands.log'
    (repo / '.ci').mkdir(parents=True)
    for name in ('run', 'min-constraints.txt'):
        shutil.copy(ROOT / '.ci' / name, repo / '.ci' / name)
    shims.mkdir()
    python = shims / 'venv-python'
    python.write_text('#!/usr/bin/env bash\n'
                      'echo "$PWD|python $*" >> "$CI_LOG"\n'
                      'if [ "$1 $2" = "-m pytest" ]; then exit "${FAKE_PYTEST_RC:-0}"; fi\n')
    python3 = shims / 'python3'
    python3.write_text('#!/usr/bin/env bash\n'
                       'echo "$PWD|python3 $*" >> "$CI_LOG"\n'
                       '[ "$1 $2" = "-m venv" ] || exit 1\n'
                       'mkdir -p "$3/bin" && cp "$SHIM_PYTHON" "$3/bin/python"\n'
                       'echo "PATH=\\"$3/bin:\\$PATH\\"" > "$3/bin/activate"\n')
    for shim in (python, python3):
        shim.chmod(0o755)
    scratch = tmp_path / 'tmp'
    scratch.mkdir()
    environ = dict(os.environ, PATH=f'{shims}{os.pathsep}{os.environ["PATH"]}', CI_LOG=str(log),
                   SHIM_PYTHON=str(python), TMPDIR=str(scratch))
    environ.pop('CI_MIN_VERSIONS', None)
    environ.update(env)
    out = subprocess.run(['bash', str(repo / '.ci' / 'run')], env=environ, capture_output=True, text=True,
                         timeout=60)
    commands = [line.split('|', 1) for line in log.read_text().splitlines()]
    # the venv is made under TMPDIR and removed on exit, whatever pytest returned
    assert list(scratch.iterdir()) == [], list(scratch.iterdir())
    return out, repo, commands


def _installs(commands):
    return [(cwd, line.split()) for cwd, line in commands if line.startswith('python -m pip install')]


def test_ci_run_installs_the_test_extra_and_runs_pytest(tmp_path):
    out, repo, commands = _run_ci(tmp_path)
    assert out.returncode == 0, out.stderr
    assert commands[0][1].startswith('python3 -m venv '), commands
    (cwd, args), = _installs(commands)
    assert cwd == str(repo) and '.[test]' in args and '--constraint' not in args, (cwd, args)
    # the README's test command: pytest on two workers, a file per worker
    assert any(line.startswith('python -m pytest -n 2 --dist loadfile') for _, line in commands), commands


def test_ci_run_uses_the_constraints_when_asked(tmp_path):
    out, repo, commands = _run_ci(tmp_path, CI_MIN_VERSIONS='1')
    assert out.returncode == 0, out.stderr
    (cwd, args), = _installs(commands)
    constraint = args[args.index('--constraint') + 1]
    assert (Path(cwd) / constraint).resolve() == (repo / '.ci' / 'min-constraints.txt').resolve(), (cwd, args)


@pytest.mark.parametrize('pytest_rc, ci_rc', [(1, 1), (5, 1), (0, 0)])
def test_ci_run_fails_when_pytest_fails_or_collects_nothing(tmp_path, pytest_rc, ci_rc):
    out, _, _ = _run_ci(tmp_path, FAKE_PYTEST_RC=str(pytest_rc))
    assert out.returncode == ci_rc, (out.returncode, out.stderr)
    assert ('collected no tests' in out.stderr) == (pytest_rc == 5), out.stderr
