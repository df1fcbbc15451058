"""The layout rules: imports run one way (common <- client_app, server_app <- ops), no import cycles, the
operations package is never imported by the apps and starts a SuperNode without torch, and the docs' map
of the code is the one generated from the modules' docstrings."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "client_app", "server_app", "ops")
APPS = ("client_app", "server_app")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> project modules it imports (at any depth of the file, lazy imports included)."""
    files = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}

    def resolve(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                names = [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                target = resolve(name)
                # a package's __init__ importing its own submodules, or a submodule importing its parent
                # package, is not a dependency between layers
                if target and target != mod and not mod.startswith(target + "."):
                    graph[mod].add(target)
    return graph


def test_common_imports_nothing_above_it_and_apps_do_not_import_each_other():
    """common imports only itself; an app imports itself and common (never the other app, never ops)."""
    allowed = {"common": {"common"}, "client_app": {"client_app", "common"}, "server_app": {"server_app", "common"}}
    upward = [f"{mod} -> {dep}" for mod, deps in import_graph().items() for dep in deps
              if mod.split(".")[0] in allowed and dep.split(".")[0] not in allowed[mod.split(".")[0]]]
    assert not upward, f"imports against the layering: {upward}"


# What a SuperNode host without torch or the apps must be able to import and run (feda2v-supernode).
_NO_TORCH = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchaudio", "transformers", "diffusers", "server_app", "client_app"):
            raise ImportError(f"{name} is not installed on this host")
sys.meta_path.insert(0, Block())
import ops, ops.deploy.prompt_timing as p
sys.argv = ["feda2v-supernode", "--help"]
p.main()
"""


def test_the_supernode_entry_point_starts_without_torch_or_the_apps():
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage" in proc.stdout.lower() and "supernode" in proc.stdout.lower()


def test_common_holds_no_operations_code():
    assert not [p for p in ("cli", "deploy", "launcher.py", "local_run.py") if (ROOT / "common" / p).exists()]


def _package(module: str) -> str:
    """The unit a module belongs to: an app or ops, or a first-level package or module of common/
    (common.render, common.metrics, common.records, ...)."""
    parts = module.split(".")
    return f"common.{parts[1]}" if parts[0] == "common" and len(parts) > 1 else parts[0]


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for mod, deps in import_graph().items():
        graph.setdefault(_package(mod), set()).update(_package(d) for d in deps if _package(d) != _package(mod))
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "active"
        for dep in sorted(graph[node]):
            if state.get(dep) == "active":
                cycles.append(path[path.index(dep):] + [dep] if dep in path else [node, dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_no_import_cycles_between_modules():
    cycles = _cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_import_cycles_between_packages():
    """A package (common.render, common.metrics, the apps, ...) never reaches back to one that imports it:
    the picture scorer lives with the pictures, records do not import the generator bank."""
    cycles = _cycles(package_graph())
    assert not cycles, "package cycles: " + "; ".join(" -> ".join(c) for c in cycles)


# The entry points that read the whole run configuration: the apps' (ServerApp main helpers, the node's
# training sources), the CLI's commands, and the section-level constructors that resolve one object from it.
WHOLE_CONFIG_READERS = {
    "client_app/site.py:NodeSite.of",
    "client_app/sources/base.py:TrainingSource.__init__",
    "client_app/sources/base.py:source_for",
    "common/cache/commands.py:build",
    "common/config/loading.py:config_hash",
    "common/render/generate.py:generate_images",
    "common/render/jobs.py:RenderContext.of",
    "server_app/app.py:class_targets",
    "server_app/app.py:initial_adapters",
    "server_app/pipeline.py:build_pipelines",
}


def functions_taking_the_whole_config() -> set[str]:
    """Functions with a parameter annotated ``FedA2VConfig``, or a ``cfg`` parameter left untyped / ``Any``."""
    found = set()
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            tree = ast.parse(path.read_text(), str(path))
            owners = {child: node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)
                      for child in node.body}
            for node in ast.walk(tree):
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                params = [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]
                if any((p.annotation is not None and "FedA2VConfig" in ast.unparse(p.annotation))
                       or (p.arg == "cfg" and (p.annotation is None or ast.unparse(p.annotation) in ("Any", "object")))
                       for p in params):
                    name = f"{owners[node]}.{node.name}" if node in owners else node.name
                    found.add(f"{path.relative_to(ROOT)}:{name}")
    return found


def test_the_whole_config_stops_at_the_entry_points():
    """Below the entry points code gets its own section or an object built from it (NodeSite, RenderContext):
    a new function that needs the whole FedA2VConfig is a design question, not a free addition."""
    found = functions_taking_the_whole_config()
    assert len(found) <= 15, sorted(found)
    assert found <= WHOLE_CONFIG_READERS, f"new readers of the whole config: {sorted(found - WHOLE_CONFIG_READERS)}"


def test_docs_code_map_is_current():
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "code_map.py"), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
