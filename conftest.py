"""Collection of the package's doctests (``pytest --doctest-modules sscflow``) without torch.

torch is an optional extra (``sscflow[gpu]``). Without it, the modules that import torch when
they are imported (a module-level ``import torch``, or a module-level import of such a module)
are not collected, and the run's header names them; every other module is imported and its
doctests run. The modules are found from their source, so a new one needs no list here.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

PACKAGE = Path(__file__).parent / "sscflow"


def _torch_importable() -> bool:
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


def _top_level_imports(path: Path) -> set[str]:
    """Modules imported by the statements at a module's top level (functions are not run at
    import, so the imports inside them do not count)."""
    out = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        for sub in ast.walk(node) if not isinstance(node, ast.FunctionDef | ast.ClassDef) else ():
            if isinstance(sub, ast.Import):
                out.update(a.name for a in sub.names)
            elif isinstance(sub, ast.ImportFrom) and sub.module and sub.level == 0:
                out.add(sub.module)
                out.update(f"{sub.module}.{a.name}" for a in sub.names)
    return out


def torch_modules() -> list[Path]:
    """The package's files that cannot be imported without torch."""
    files = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        files[name] = (path, _top_level_imports(path))
    needs = {n for n, (_, imports) in files.items()
             if any(i == "torch" or i.startswith("torch.") for i in imports)}  # fmt: skip
    grown = True
    while grown:
        more = {n for n, (_, imports) in files.items() if n not in needs and imports & needs}
        needs |= more
        grown = bool(more)
    return sorted(files[n][0] for n in needs)


collect_ignore = [] if _torch_importable() else [str(p) for p in torch_modules()]


def pytest_report_header(config):
    if collect_ignore:
        names = ", ".join(str(Path(p).relative_to(PACKAGE.parent)) for p in collect_ignore)
        return f"torch is not importable; not collected (they need torch): {names}"
    return None
