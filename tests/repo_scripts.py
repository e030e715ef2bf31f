"""The repository's scripts (benchmarks/, experiments/) imported as modules, for the tests that call them."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def load(relative_path: str) -> ModuleType:
    """The script at ROOT/relative_path as a module named after its file (registered in sys.modules, which a
    dataclass defined in it needs). Its folder goes on sys.path, as `python SCRIPT` puts it there, so that a script
    can import the one beside it."""
    path = ROOT / relative_path
    if str(path.parent) not in sys.path:
        sys.path.append(str(path.parent))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
