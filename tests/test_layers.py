"""The package layers of docs/architecture.md, enforced on the source.

Every `import` and `from ... import` in every module of every wanps package (found by
parsing, so imports inside functions count too) is checked against the rules below:
- a package imports only the packages its layer allows (the three services never each
  other, never linkem, deploy or bench);
- no cycle between packages;
- `wanps.rpc` and everything the controller imports stay free of torch (a controller
  process must not load torch, and the rpc layer serves processes that have none).

import-linter would state the same contracts, but its graph builder cannot find packages
laid out with setuptools' `package-dir` in an editable install (it reported "Module
'wanps.controller' does not exist"), so this test reads the files itself.
"""
from __future__ import annotations

import ast
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Which packages each package may import (besides itself). Bottom up; see docs/architecture.md.
ALLOWED: dict[str, frozenset[str]] = {
    "proto": frozenset(),
    "rpc": frozenset({"proto"}),
    "server": frozenset({"proto", "rpc"}),
    "worker": frozenset({"proto", "rpc"}),
    "controller": frozenset({"proto", "rpc"}),
    "linkem": frozenset({"rpc"}),
    "deploy": frozenset({"proto", "rpc", "server", "worker", "controller", "linkem"}),
    "bench": frozenset({"proto", "rpc", "server", "worker", "controller", "linkem", "deploy"}),
}
# Third-party packages a package must never import, directly or through wanps modules it imports.
FORBIDDEN_EXTERNAL: dict[str, frozenset[str]] = {
    "rpc": frozenset({"torch", "numpy"}),
    "controller": frozenset({"torch"}),
}


def package_dirs() -> dict[str, Path]:
    """`wanps.X` -> its folder, as pyproject.toml maps them."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    mapping = config["tool"]["setuptools"]["package-dir"]
    return {name.removeprefix("wanps."): ROOT / folder for name, folder in mapping.items()}


def module_name(package: str, path: Path, base: Path) -> str:
    parts = path.relative_to(base).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(("wanps", package, *parts))


def imports_of(path: Path, module: str) -> Iterator[tuple[str, int]]:
    """(imported module, line) for every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield target, node.lineno
            for alias in node.names:  # `from wanps.proto import codec` imports wanps.proto.codec
                yield f"{target}.{alias.name}", node.lineno


def wanps_modules() -> dict[str, tuple[str, Path, list[tuple[str, int]]]]:
    """module name -> (package, file, imports)."""
    found = {}
    for package, folder in package_dirs().items():
        for path in sorted(folder.rglob("*.py")):
            name = module_name(package, path, folder)
            found[name] = (package, path, list(imports_of(path, name)))
    return found


MODULES = wanps_modules()


def package_of(imported: str) -> str | None:
    parts = imported.split(".")
    return parts[1] if parts[0] == "wanps" and len(parts) > 1 else None


def test_every_package_is_laid_out() -> None:
    assert set(package_dirs()) == set(ALLOWED), "a package without a layer rule (add it to ALLOWED and the docs)"


def test_packages_import_only_the_layers_below() -> None:
    violations = []
    for name, (package, path, imports) in MODULES.items():
        for imported, line in imports:
            target = package_of(imported)
            if target is not None and target != package and target not in ALLOWED[package]:
                violations.append(f"{path.relative_to(ROOT)}:{line}: {package} imports {imported}")
    assert not violations, "imports across layers:\n" + "\n".join(sorted(set(violations)))


def test_no_cycle_between_packages() -> None:
    edges: dict[str, set[str]] = {package: set() for package in ALLOWED}
    for package, _path, imports in MODULES.values():
        for imported, _line in imports:
            target = package_of(imported)
            if target is not None and target != package and target in edges:
                edges[package].add(target)

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(nxt == goal or (nxt not in seen and not seen.add(nxt) and reaches(nxt, goal, seen))
                   for nxt in edges[start])

    cycles = [package for package in edges if reaches(package, package, set())]
    assert not cycles, f"packages on an import cycle: {cycles} ({edges})"


def closure(start: list[str]) -> set[str]:
    """Every wanps module reachable from `start` through imports."""
    seen: set[str] = set()
    todo = list(start)
    while todo:
        name = todo.pop()
        if name in seen or name not in MODULES:
            continue
        seen.add(name)
        # Importing wanps.a.b runs wanps.a's __init__ too.
        todo.extend(imported for imported, _ in MODULES[name][2])
        todo.extend(".".join(name.split(".")[:i]) for i in range(2, len(name.split("."))))
    return seen


@pytest.mark.parametrize("package", sorted(FORBIDDEN_EXTERNAL))
def test_forbidden_third_party_imports(package: str) -> None:
    reached = closure([name for name, (pkg, _p, _i) in MODULES.items() if pkg == package])
    violations = []
    for name in sorted(reached):
        _pkg, path, imports = MODULES[name]
        for imported, line in imports:
            if imported.split(".")[0] in FORBIDDEN_EXTERNAL[package]:
                violations.append(f"{path.relative_to(ROOT)}:{line}: imports {imported}")
    assert not violations, f"{package} reaches {sorted(FORBIDDEN_EXTERNAL[package])}:\n" + "\n".join(violations)


def test_the_checks_can_fail(tmp_path: Path) -> None:
    """The parser sees a function-level and a relative import, so a violation there is caught."""
    source = tmp_path / "mod.py"
    source.write_text("def f():\n    from wanps.server import core\n    from . import sibling\n")
    found = {imported for imported, _ in imports_of(source, "wanps.worker.mod")}
    assert "wanps.server.core" in found and "wanps.worker.sibling" in found
    assert package_of("wanps.server.core") not in ALLOWED["worker"]


def test_controller_process_loads_no_torch() -> None:
    """The same rule, at run time: starting the controller's CLI module imports no torch."""
    import subprocess

    code = "import sys, wanps.controller.cli, wanps.rpc.health; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
