"""The layering docs/design.md draws, read from the source (every import, at the top of a file or inside a
function): no import circle; the library never imports the stages, the CLI or the shapes world; a stage imports
the library, never another stage."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The stages, each with the modules that are its own parts; pipeline.config and pipeline.executors serve them all.
STAGES = {"encode": {"encode"}, "label": {"label"}, "init": {"init"}, "inspect": {"inspect"},
          "sample": {"sample"}, "verify": {"verify"}, "eval": {"evaluate", "eval_samples"},
          "train": {"train", "train_run", "train_monitor"}}
SHARED = {"pipeline", "pipeline.config", "pipeline.executors"}


def _modules() -> dict[str, Path]:
    files = [*ROOT.glob("sdit/**/*.py"), *ROOT.glob("pipeline/**/*.py"), ROOT / "cli.py"]
    names = {}
    for path in files:
        parts = path.relative_to(ROOT).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


MODULES = _modules()


def _imports(name: str) -> set[str]:
    """The project's modules that `name` imports (a `from package import module` counts as the module)."""
    path, found = MODULES[name], set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, `level - 1` packages up
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in MODULES and t != name}
    return found


GRAPH = {name: _imports(name) for name in MODULES}


def test_the_reader_sees_every_kind_of_import():
    assert {"sdit.config", "sdit.errors"} <= GRAPH["sdit.sources"] | GRAPH["sdit.perturb"]
    assert "sdit.sampling" in GRAPH["sdit.pipeline_sdit"]  # `from .sampling import ...`
    assert "pipeline.inspect" in GRAPH["cli"]  # inside a function


def test_no_import_circle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for other in sorted(GRAPH[name]):
            if state.get(other) == 1:
                pytest.fail("import circle: " + " -> ".join(path[path.index(other):] + [name, other]))
            if other not in state:
                visit(other, path + [name])
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [])


def test_the_library_imports_no_stage_and_the_sd_path_no_shapes_world():
    for name, imported in GRAPH.items():
        if name.startswith("sdit") and name != "sdit.__main__":  # `python -m sdit` runs the CLI
            assert not {m for m in imported if m.startswith("pipeline") or m == "cli"}, name
        if name.startswith("sdit") and not name.startswith("sdit.shapes"):
            assert not {m for m in imported if m.startswith("sdit.shapes")}, name


def test_a_stage_imports_no_other_stage():
    owner = {f"pipeline.{module}": stage for stage, modules in STAGES.items() for module in modules}
    assert set(owner) | SHARED == {m for m in MODULES if m.startswith("pipeline") and m.count(".") <= 1
                                   and m not in ("pipeline.bench", "pipeline.experiments")}, "a stage STAGES lacks"
    for name, stage in owner.items():
        others = {m for m in GRAPH[name] if m.startswith("pipeline") and m not in SHARED and owner.get(m) != stage}
        assert not others, f"{name} imports {others}"
