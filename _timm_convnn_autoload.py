"""Zero-touch registration: timm-convnn's models appear in timm's registry as soon as ``timm`` is imported.

Installed next to the package as ``timm_convnn-autoload.pth`` (a one-line start-up file that imports this module),
so any program, script or notebook that calls ``timm.create_model`` sees the ConvNN models without
``import timm_convnn``. At interpreter start this only puts a small finder at the front of ``sys.meta_path``
(stdlib ``sys`` and ``os`` only, both already loaded: nothing heavy). When ``timm`` is imported for the first time,
the finder lets timm's own loader run unchanged, gives the module its loader back, and then imports ``timm_convnn``
once. If that import fails, timm still works and one ``RuntimeWarning`` names the cause.

``TIMM_CONVNN_AUTOLOAD=0`` (or ``false`` / ``no`` / ``off``) turns it off; ``import timm_convnn``, the
``python -m timm_convnn.run`` launcher and ``train.py --device-modules timm_convnn`` work either way.
"""
import os
import sys

ENV_VAR = 'TIMM_CONVNN_AUTOLOAD'
PLUGIN = 'timm_convnn'
TARGET = 'timm'
_OFF = ('0', 'false', 'no', 'off')


def enabled() -> bool:
    return os.environ.get(ENV_VAR, '1').strip().lower() not in _OFF


def register() -> None:
    """Import the plugin (registers its models); on failure, warn once and leave timm working."""
    if PLUGIN in sys.modules or not enabled():
        return  # already imported (or being imported: it is what imported timm), or switched off
    try:
        __import__(PLUGIN)
    except Exception as exc:  # a plugin must never crash someone else's program
        import warnings
        warnings.warn(
            f'timm-convnn is installed but could not register its models with timm: {type(exc).__name__}: {exc}. '
            f'timm works without them; set {ENV_VAR}=0 to skip this step.', RuntimeWarning, stacklevel=2)


class _RegisterAfterExec:
    """Wraps timm's loader: runs it, restores it on the module, then registers the plugin."""

    def __init__(self, loader, hook: '_TimmImportHook') -> None:
        self.loader = loader
        self.hook = hook

    def create_module(self, spec):
        create = getattr(self.loader, 'create_module', None)
        return create(spec) if create is not None else None

    def exec_module(self, module) -> None:
        self.hook.uninstall()
        try:
            self.loader.exec_module(module)
        finally:
            module.__loader__ = self.loader
            if getattr(module, '__spec__', None) is not None:
                module.__spec__.loader = self.loader
        register()

    def __getattr__(self, name):
        return getattr(self.loader, name)


class _TimmImportHook:
    """A meta-path finder that only answers for ``timm`` and only until timm has been loaded once.

    ``importlib.util.find_spec('timm')`` (libraries probing whether timm is installed) does not consume it: the hook
    is removed when timm's module is actually executed.
    """

    def find_spec(self, fullname, path=None, target=None):
        if fullname != TARGET or not enabled():
            return None
        for finder in sys.meta_path:
            find = getattr(finder, 'find_spec', None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, 'exec_module'):
            spec.loader = _RegisterAfterExec(spec.loader, self)
        return spec

    def uninstall(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)


def install() -> None:
    """Called by the .pth file at interpreter start."""
    if not enabled():
        return
    if TARGET in sys.modules:  # timm already imported (install() called late, e.g. by hand): register now
        register()
        return
    if not any(isinstance(f, _TimmImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _TimmImportHook())
