"""The repository layout the foundation promises: six distributions, their dependencies, no core→plugin imports.

These are the properties that keep "install kt-core + kt-ops-torch + one model plugin"
a working system: kt-core never imports a plugin (it finds them through entry points),
plugins depend on kt-core only, and torch is pinned so pip never resolves a CUDA build.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PLUGINS = {
    "kt_ops_torch": "kt-ops-torch",
    "kt_ops_cpuinfer": "kt-ops-cpuinfer",
    "kt_ops_marlin": "kt-ops-marlin",
    "kt_models_deepseek": "kt-models-deepseek",
    "kt_models_qwen": "kt-models-qwen",
}
PLUGIN_PACKAGES = (*PLUGINS, "kt_dummy_plugin")


def project(folder: str) -> dict:
    return tomllib.loads((ROOT / folder / "pyproject.toml").read_text())["project"]


def requirement_names(requirements: list[str]) -> dict[str, str]:
    """``{"torch": "torch==2.13.0", ...}`` keyed by the normalized distribution name."""
    out = {}
    for req in requirements:
        name = req.split(";")[0].strip()
        for sep in ("=", "<", ">", "!", "~", "[", " "):
            name = name.split(sep)[0]
        out[name.lower().replace("_", "-").replace(".", "-")] = req
    return out


def test_root_pyproject_only_configures_tooling():
    root = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "project" not in root
    assert {"pytest", "ruff"} <= set(root["tool"])


def test_kt_core_dependencies():
    core = project("kt_core")
    assert core["name"] == "kt-core"
    deps = requirement_names(core["dependencies"])
    assert deps["torch"].replace(" ", "") == "torch==2.13.0"
    assert {"transformers", "pluggy", "pydantic", "ruamel-yaml", "gguf", "importlib-metadata"} <= set(deps)
    assert ">=2" in deps["pydantic"]
    assert not set(deps) & set(PLUGINS.values())
    assert core["scripts"]["kt"] == "kt_core.cli.main:main"


@pytest.mark.parametrize(("folder", "dist"), sorted(PLUGINS.items()))
def test_plugins_depend_on_kt_core_only_and_register_by_entry_point(folder, dist):
    meta = project(folder)
    assert meta["name"] == dist
    assert list(requirement_names(meta["dependencies"])) == ["kt-core"]
    assert meta["entry-points"]["kt"] == {dist: f"{folder}.plugin"}


def test_kt_core_imports_no_plugin():
    offenders = []
    for path in sorted((ROOT / "kt_core" / "src" / "kt_core").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno}: {n}" for n in names if n.split(".")[0] in PLUGIN_PACKAGES]
    assert offenders == []


def test_plugins_import_no_other_plugin():
    """A model plugin may use another plugin's operators by registry name, never by import."""
    offenders = []
    for folder in PLUGINS:
        others = set(PLUGIN_PACKAGES) - {folder}
        for path in sorted((ROOT / folder / "src").rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                elif isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                else:
                    continue
                offenders += [f"{path.relative_to(ROOT)}:{node.lineno}: {n}" for n in names if n.split(".")[0] in others]
    assert offenders == []


def test_ci_runs_exactly_the_readme_test_command():
    """README's first two commands set up and run (1) the main job, (2) the tests; CI runs (2) as written."""
    readme = (ROOT / "README.md").read_text()
    blocks = [b.split("```", 1)[0].strip() for b in readme.split("```bash\n")[1:3]]
    assert blocks[0].startswith("bash scripts/setup.sh && .venv/bin/kt ")
    assert blocks[1] == "bash scripts/setup.sh && .venv/bin/python -m pytest"
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == blocks[1]
    assert "rm -rf .venv" in ci  # from a clean state, as a fresh clone has it
