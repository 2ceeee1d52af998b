"""The tail of a `sitecustomize` hook that patches one module when it is first imported.

`cache_keys.py` and `ray_turns.py` install a `sitecustomize.py` for the runs they start (Ray's
worker processes inherit it through PYTHONPATH). Each defines `_patch(module)`; `on_import(name)`
appends a meta-path finder that runs the module's own code, then `_patch` on it, so a process
that never imports the module pays nothing. `installed(folder, code)` writes the hook and gives the
PYTHONPATH that loads it.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FINDER = r'''

class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _Finder())
'''


def on_import(module: str) -> str:
    """Hook code (after the code that defines `_patch` and imports importlib.abc,
    importlib.machinery and sys) that calls `_patch` on `module` once it is imported."""
    return f"\nMODULE = {module!r}\n" + FINDER


def installed(folder: Path, code: str) -> str:
    """Writes `code` as `folder`/sitecustomize.py (creating `folder`); the PYTHONPATH that puts it
    first, then the repository, then any PYTHONPATH already set."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(code)
    return os.pathsep.join(filter(None, [str(folder), str(ROOT), os.environ.get("PYTHONPATH")]))
