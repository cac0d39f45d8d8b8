"""One import namespace: the wheel holds `blip2_serve` only, and its SDK import stays light outside the checkout."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_holds_only_blip2_serve_and_the_sdk_import_is_light(tmp_path):
    dist = tmp_path / "dist"
    build = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(dist),
        str(ROOT),
    ]
    subprocess.run(build, check=True, capture_output=True, timeout=300)
    wheel = next(dist.glob("blip2_serve-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"blip2_serve", wheel.name.split("-py")[0] + ".dist-info"}
    for module in ("__init__.py", "serve/app.py", "deployments/engine.py", "exporters/triton_models/llm.py"):
        assert f"blip2_serve/{module}" in names
    assert "blip2_serve/clients/sdk.py" in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "blip2-serve = blip2_serve.serve.cli:main" in entry_points

    site = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)]
    subprocess.run(install, check=True, capture_output=True, timeout=300)
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(site)!r})\n"
        "import blip2_serve\n"
        "from blip2_serve import AsyncBlip2Client, Blip2Client\n"
        f"assert blip2_serve.__file__.startswith({str(site)!r}), blip2_serve.__file__\n"
        "heavy = [m for m in ('torch', 'ray', 'fastapi', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "for old in ('serve', 'deployments', 'exporters', 'clients', 'bench'):\n"
        "    try:\n"
        "        __import__(old)\n"
        "    except ImportError:\n"
        "        continue\n"
        "    raise AssertionError(f'{old} is importable')\n"
        "import blip2_serve.serve.config\n"
        f"assert blip2_serve.serve.config.__file__.startswith({str(site)!r})\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def _imports(folder: str) -> dict[str, set[str]]:
    """Every module each .py file under `folder` imports (absolute names)."""
    import ast

    found = {}
    for path in (ROOT / folder).rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        found[str(path.relative_to(ROOT))] = names
    return found


def test_layers_import_downwards_only():
    """exporters/ imports nothing from serve/ (the server's edge); clients/ nothing from serve/ or deployments/."""
    rules = {"exporters": ("blip2_serve.serve",), "clients": ("blip2_serve.serve", "blip2_serve.deployments")}
    for folder, forbidden in rules.items():
        imports = _imports(folder)
        assert imports, folder
        for path, names in imports.items():
            bad = sorted(n for n in names if n.startswith(forbidden))
            assert not bad, (path, bad)
