"""Test support: a private copy of this package whose kernels run in Triton's interpreter.

Triton picks interpreter vs compiler when a kernel is *decorated* and checks
``TRITON_INTERPRET`` again when it is *launched*. Setting the variable for a whole pytest
session would send every CPU caller of the dispatchers (engine tests, the CPU server) to
the slow interpreter, and a module imported earlier without it cannot run on CPU tensors.
So kernel tests import an interpreted copy here, leave ``sys.modules`` and the environment
as they found them, and set ``TRITON_INTERPRET=1`` only while each test runs.
"""

from __future__ import annotations

import importlib
import os
import sys
import types

_PKG = __name__.rpartition(".")[0]  # "sglang_reattn.kernels"


def load_interpreted_kernels() -> types.ModuleType:
    """Import a fresh copy of the kernels package with ``TRITON_INTERPRET=1``.

    The returned module is detached: ``sys.modules``, the parent package attribute and the
    environment are restored, so other importers keep getting the normal package.
    """
    parent_name, _, child = _PKG.rpartition(".")
    parent = sys.modules.get(parent_name)
    saved = {n: m for n, m in sys.modules.items() if n == _PKG or n.startswith(_PKG + ".")}
    saved_attr = getattr(parent, child, None) if parent is not None else None
    old_env = os.environ.get("TRITON_INTERPRET")
    for name in saved:
        del sys.modules[name]
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        return importlib.import_module(_PKG)
    finally:
        if old_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old_env
        for name in [n for n in sys.modules if n == _PKG or n.startswith(_PKG + ".")]:
            del sys.modules[name]
        sys.modules.update(saved)
        parent = sys.modules.get(parent_name)
        if parent is not None:
            if saved_attr is not None:
                setattr(parent, child, saved_attr)
            elif hasattr(parent, child):
                delattr(parent, child)
