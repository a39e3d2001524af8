"""shared/ and kernels/ run in Pyodide, which has only the standard library: prove they import without site-packages."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NATIVE_ONLY = {"kernels.device_wgpu"}  # the one module allowed a third-party import (wgpu-py)
PYODIDE_ONLY = {"js", "pyodide"}  # imported lazily, inside functions, by the browser device module


def modules(package: str) -> list[str]:
    return sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in (ROOT / package).rglob("*.py")
    )


@pytest.mark.parametrize("package", ["shared", "kernels"])
def test_every_module_imports_without_site_packages(package):
    if not (ROOT / package).is_dir():
        pytest.skip(f"{package}/ does not exist yet")
    names = [m for m in modules(package) if m not in NATIVE_ONLY]
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\nprint('ok', len(sys.argv) - 1)"
    result = subprocess.run([sys.executable, "-S", "-c", code, *names], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"ok {len(names)}"


@pytest.mark.parametrize("package", ["shared", "kernels"])
def test_top_level_imports_are_standard_library_or_ours(package):
    if not (ROOT / package).is_dir():
        pytest.skip(f"{package}/ does not exist yet")
    allowed = set(sys.stdlib_module_names) | {"shared", "kernels"} | PYODIDE_ONLY
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in allowed and not (module in NATIVE_ONLY and top == "wgpu"):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {name}")
    assert bad == []
