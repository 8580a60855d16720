"""The package's modules import one way: no import circle (imports inside functions count), and the files a saved
model ships import nothing of the package but each other."""

import ast
from pathlib import Path

from conftest import make_tiny_config
from modeling_selfattn import SelfAttnForSequenceClassification

PACKAGE = Path(__file__).resolve().parents[1] / "modeling_selfattn"


def package_imports(path: Path) -> set[str]:
    """The package modules `path` imports, anywhere in the file (module level or inside functions)."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from .x import y / from . import x
                names = [node.module] if node.module else [alias.name for alias in node.names]
                imported.update(name.split(".")[0] for name in names)
            elif node.module and node.module.split(".")[0] == "modeling_selfattn":
                parts = node.module.split(".")
                imported.update([parts[1]] if len(parts) > 1 else [alias.name for alias in node.names])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "modeling_selfattn":
                    imported.add(parts[1] if len(parts) > 1 else "__init__")
    modules = {module.stem for module in PACKAGE.glob("*.py")}
    return {name for name in imported if name in modules and name != path.stem}


def test_no_import_circle():
    graph = {path.stem: package_imports(path) for path in PACKAGE.glob("*.py") if path.stem != "__init__"}
    finished, on_path = set(), []

    def visit(module: str) -> None:
        if module in on_path:
            circle = on_path[on_path.index(module) :] + [module]
            raise AssertionError(f"import circle: {' -> '.join(circle)}")
        if module in finished:
            return
        on_path.append(module)
        for imported in sorted(graph.get(module, ())):
            visit(imported)
        on_path.pop()
        finished.add(module)

    for module in sorted(graph):
        visit(module)


def test_shipped_files_import_only_each_other(tmp_path):
    SelfAttnForSequenceClassification(make_tiny_config("encoder")).save_pretrained(tmp_path)
    shipped = {path.stem for path in tmp_path.glob("*.py")}
    assert {"config", "model"} <= shipped
    for name in sorted(shipped):
        outside = package_imports(PACKAGE / f"{name}.py") - shipped
        assert not outside, f"{name}.py, shipped with saved models, imports package-only modules {sorted(outside)}"
