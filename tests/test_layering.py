"""The package's layers import one way: runtime <- export <- calibration <- engines <- reference <- command line.

Read from the source (AST), so a backward import fails here even on a path no other test runs: every import of a
``sparse_context`` module counts, at module level or inside a function. Heavy dependencies stay out of module-level
imports wherever the torch-free engine path can reach.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "sparse_context"
LAYERS = ("runtime", "export", "calibration", "engines", "reference", "cli")
HEAVY = ("torch", "diffusers", "transformers", "onnx", "onnxscript", "onnxruntime", "tensorrt", "cuda", "safetensors",
         "peft", "modelopt", "polygraphy")
# Modules the torch-free engine runtime loads; with everything they import at module level, none may import a
# heavy dependency at module level (each backend imports its own lazily, on use).
TORCH_FREE_ENTRIES = ("sparse_context.engines.runtime", "sparse_context.engines.index",
                      "sparse_context.engines.ort.backend", "sparse_context.engines.trt.backend",
                      "sparse_context.engines.pipeline", "sparse_context.engines.ort.parts",
                      "sparse_context.engines.trt.parts", "sparse_context.engines.model_files")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([PACKAGE, *parts])


def layer(module: str) -> str:
    """The layer of a module: its sub-package, or ``cli`` for the command-line modules (the top-level scripts and
    any ``cli.py``: they parse, validate and call everything below). The package root only holds the version, so
    it sits at the bottom."""
    parts = module.split(".")[1:]
    if not parts:
        return LAYERS[0]
    if len(parts) == 1 or parts[-1] == "cli":
        return "cli"
    return parts[0]


def package_modules() -> dict[str, Path]:
    skip = {"tests", ".venv", ".git"}
    paths = [p for p in ROOT.rglob("*.py") if not skip & set(p.relative_to(ROOT).parts)
             and not any(part.startswith(".") for part in p.relative_to(ROOT).parts)]
    return {module_name(p): p for p in paths}


def imports(path: Path, module: str, top_level_only: bool = False) -> list[tuple[int, str]]:
    """(line, imported module) for every import in ``path``; relative imports resolved against ``module``."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = _top_level(tree.body) if top_level_only else ast.walk(tree)
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".")[: -node.level] if not path.name == "__init__.py" else \
                    module.split(".")[: len(module.split(".")) - node.level + 1]
                base = ".".join([*package, base] if base else package)
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]  # `from pkg import module`
    return found


def _top_level(body: list[ast.stmt]):
    """Statements that run on import: the module body and the bodies of its top-level if/try blocks."""
    for node in body:
        yield node
        if isinstance(node, ast.If):
            yield from _top_level(node.body + node.orelse)
        elif isinstance(node, ast.Try):
            yield from _top_level(node.body + node.orelse + node.finalbody
                                  + [n for h in node.handlers for n in h.body])


def test_every_module_has_a_layer():
    modules = package_modules()
    assert "sparse_context.runtime.core" in modules and "sparse_context.cli" in modules
    unknown = sorted(m for m in modules if layer(m) not in LAYERS)
    assert not unknown, f"modules outside the layers {LAYERS}: {unknown}"


def test_imports_run_one_way():
    modules = package_modules()
    backward = []
    for module, path in sorted(modules.items()):
        source = LAYERS.index(layer(module))
        for line, imported in imports(path, module):
            if imported.split(".")[0] != PACKAGE or imported not in modules:
                continue  # a third-party module, or a name (`from pkg.module import name`)
            target = LAYERS.index(layer(imported))
            if target > source:
                backward.append(f"{path.relative_to(ROOT)}:{line} ({layer(module)}) imports {imported} "
                                f"({layer(imported)})")
    assert not backward, "imports against the layer order " + " <- ".join(LAYERS) + ":\n" + "\n".join(backward)


def test_runtime_imports_no_heavy_dependency_at_module_level():
    modules = package_modules()
    heavy = [f"{path.relative_to(ROOT)}:{line} imports {imported}"
             for module, path in sorted(modules.items()) if layer(module) == "runtime"
             for line, imported in imports(path, module, top_level_only=True)
             if imported.split(".")[0] in HEAVY]
    assert not heavy, "runtime/ must import without torch and the engine libraries:\n" + "\n".join(heavy)


def test_engine_path_imports_no_heavy_dependency_at_module_level():
    modules = package_modules()
    seen, todo, heavy = set(), list(TORCH_FREE_ENTRIES), []
    while todo:
        module = todo.pop()
        if module in seen or module not in modules:
            continue
        seen.add(module)
        for line, imported in imports(modules[module], module, top_level_only=True):
            if imported.split(".")[0] in HEAVY:
                heavy.append(f"{modules[module].relative_to(ROOT)}:{line} imports {imported}")
            elif imported in modules:
                todo.append(imported)
                parent = imported.rsplit(".", 1)[0]
                todo.append(parent)  # a package's __init__ runs too
    assert "sparse_context.runtime.core" in seen and "sparse_context.export.spec" in seen
    assert not heavy, "the engine runtime must import without torch:\n" + "\n".join(heavy)


@pytest.mark.parametrize("source, expected", [
    ("from sparse_context.reference.generator import SparseContextGenerator\n", "reference"),
    ("def f():\n    import sparse_context.engines.index\n", "engines"),
])
def test_the_checker_sees_backward_imports(tmp_path, source, expected):
    """The check itself: a function-level import is found, and its layer is the one the order rejects."""
    path = tmp_path / "bad.py"
    path.write_text(source)
    found = [name for _, name in imports(path, "sparse_context.export.bad") if name in package_modules()]
    assert found and layer(found[0]) == expected
    assert LAYERS.index(layer(found[0])) > LAYERS.index("export")
