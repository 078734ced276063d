"""Build hooks only (all metadata is in pyproject.toml): ship ``timm_convnn-autoload.pth`` at the site-packages root.

pyproject.toml has no way to put a file at the root of a wheel, so:
- ``build_py`` writes the .pth into the build tree (regular wheels, sdists built into wheels);
- ``editable_wheel`` adds it to the editable wheel (``pip install -e .``), whose contents setuptools otherwise
  reduces to its own path hooks.
The .pth runs ``_timm_convnn_autoload.install()`` at interpreter start (see that module: nothing heavy is imported).
"""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = 'timm_convnn-autoload.pth'
# a .pth line that starts with "import" is executed by site.py; a missing module (package removed by hand while the
# .pth stayed behind) must not print a traceback at every interpreter start
PTH_LINE = ("import sys; exec('try: import _timm_convnn_autoload as hook\\nexcept ImportError: hook = None\\n"
            "if hook: hook.install()')\n")


class BuildPyWithAutoload(build_py):
    def run(self):
        super().run()
        if not self.editable_mode:
            target = Path(self.build_lib, PTH_NAME)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(PTH_LINE)

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        if not self.editable_mode:
            outputs.append(str(Path(self.build_lib, PTH_NAME)))
        return outputs


cmdclass = {'build_py': BuildPyWithAutoload}

try:
    from setuptools.command.editable_wheel import editable_wheel
except ImportError:  # setuptools < 64: no PEP 660 editable wheels
    editable_wheel = None

if editable_wheel is not None and hasattr(editable_wheel, '_select_strategy'):
    class _StrategyWithAutoload:
        """Delegates to setuptools' editable strategy and also writes the .pth into the editable wheel."""

        def __init__(self, strategy):
            self.strategy = strategy

        def __enter__(self):
            self.strategy.__enter__()
            return self

        def __exit__(self, *exc):
            return self.strategy.__exit__(*exc)

        def __call__(self, wheel, files, mapping):
            self.strategy(wheel, files, mapping)
            wheel.writestr(PTH_NAME, PTH_LINE.encode())

    class EditableWheelWithAutoload(editable_wheel):
        def _select_strategy(self, *args, **kwargs):
            return _StrategyWithAutoload(super()._select_strategy(*args, **kwargs))

    cmdclass['editable_wheel'] = EditableWheelWithAutoload

setup(cmdclass=cmdclass)
