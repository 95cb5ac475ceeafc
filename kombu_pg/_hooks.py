"""Register kombu-pg with Kombu and Flower when (and only if) the process imports them.

Kombu resolves a URL scheme through the dict ``kombu.transport.TRANSPORT_ALIASES`` and
loads no plugins for transports; Flower picks its broker client by URL scheme in
``flower.utils.broker.Broker``.  An import hook adds kombu-pg to each right after the
module is executed, so a process that never imports Kombu or Flower pays one dict lookup
per import and nothing else.  This module imports only ``sys``: it runs at every
interpreter start-up through the ``.pth`` file, so the annotations are strings and
``typing`` is not imported (it alone costs ~10 ms).
"""

import sys

TYPE_CHECKING = False  # mypy reads this name as typing.TYPE_CHECKING
if TYPE_CHECKING:
    from types import ModuleType
    from typing import Callable

TRANSPORT_PATH = "kombu_pg.transport:Transport"
SCHEMES = ("postgresql", "postgres")


def _register_transport(module: "ModuleType") -> None:
    for scheme in SCHEMES:
        module.TRANSPORT_ALIASES[scheme] = TRANSPORT_PATH


def _register_flower_broker(module: "ModuleType") -> None:
    from .contrib.flower import install

    install(module)


_HOOKS: "dict[str, Callable[[ModuleType], None]]" = {
    "kombu.transport": _register_transport,
    "flower.utils.broker": _register_flower_broker,
}


class _AfterImport:
    """A meta-path finder that finds nothing itself: for a hooked module it asks the
    finders after it for the spec and runs the hook once the module has executed."""

    def find_spec(self, name: str, path=None, target=None):
        hook = _HOOKS.get(name)
        if hook is None:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(name, path, target)
            if spec is not None:
                break
        else:
            return None
        if not hasattr(spec.loader, "exec_module") or not hasattr(spec.loader, "__dict__"):
            return spec  # nothing to wrap: a namespace package or a loader with __slots__
        loader = spec.loader
        own = vars(loader).get("exec_module")
        run = loader.exec_module

        def exec_module(module: "ModuleType") -> None:
            # Undo the patch first: some loaders (pytest's rewriting hook) serve many modules.
            if own is None:
                del loader.exec_module
            else:
                loader.exec_module = own
            run(module)
            hook(module)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install() -> None:
    """Register now with the modules already imported, and later with the others."""
    for name, hook in _HOOKS.items():
        module = sys.modules.get(name)
        if module is not None:
            hook(module)
    if not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
