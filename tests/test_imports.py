"""The package's import structure: vital.llm has no import circle and each of its modules imports alone; every
module a stage runs is a dependency of that stage in dvc.yaml (the lists are hand-written)."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, package: str, top_only: bool = False) -> set[str]:
    """The vital modules a file imports, at the top or inside a function (a lazy import is still an edge)."""
    out = set()
    tree = ast.parse(path.read_text())
    for node in (tree.body if top_only else ast.walk(tree)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out |= {n for n in names if n.startswith("vital") and (SRC / (n.replace(".", "/") + ".py")).exists()
                or (SRC / n.replace(".", "/") / "__init__.py").exists()}
    return out


def graph() -> dict[str, set[str]]:
    g = {}
    for path in sorted((SRC / "vital").rglob("*.py")):
        name = module_name(path)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        g[name] = imports(path, package) - {name}
    return g


def cycle(g: dict[str, set[str]], nodes: set[str]) -> list[str] | None:
    """One import circle among `nodes`, as a path, or None."""
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(g.get(n, ()) & nodes):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        state[n] = "done"
        stack.pop()
        return None

    for n in sorted(nodes):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_the_circle_check_finds_a_circle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycle(g, set(g)) == ["a", "b", "c", "a"] and cycle(g, {"a", "b", "d"}) is None


def test_the_llm_package_has_no_import_circle_and_imports_no_stage_module_at_load_time():
    g = graph()
    llm = {n for n in g if n.startswith("vital.llm")}
    assert llm >= {"vital.llm.client", "vital.llm.backends", "vital.llm.batch", "vital.llm.offline", "vital.llm.fakeapi"}
    assert cycle(g, llm) is None, f"import circle: {' -> '.join(cycle(g, llm))}"
    for path in (SRC / "vital/llm").glob("*.py"):  # only the fake server reads stage prompts, when it answers
        top = [n.module for n in ast.parse(path.read_text()).body if isinstance(n, ast.ImportFrom) and n.level == 2]
        assert set(top) <= {"schema"}, f"{path.name} imports vital.{top} at load time (only the data contract)"


@pytest.mark.parametrize("module", ["client", "backends", "batch", "offline", "fakeapi"])
def test_each_llm_module_imports_alone(module):
    p = subprocess.run([sys.executable, "-c", f"import vital.llm.{module}"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]


def _stage_modules(script: Path, g: dict[str, set[str]]) -> set[str]:
    """The vital modules a stage script runs, transitively: its own imports, stages/common.py's at load time, and
    the model client when the stage opens one (common.model_client)."""
    common = ROOT / "stages/common.py"
    todo = imports(script, "stages") | imports(common, "stages", top_only=True)
    if "model_client" in script.read_text():
        todo |= {"vital.llm.client", "vital.llm.backends"}
    seen = set()
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo |= g.get(n, set())
    return seen


# params.py checks params.yaml before a stage starts: it stops a stage or lets it run, never changes an output
CHECK_ONLY = {"src/vital/params.py"}


def test_every_module_a_stage_runs_is_one_of_its_dvc_deps():
    g = graph()
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    missing = {}
    for name, stage in stages.items():
        script = ROOT / "stages" / f"{name}.py"
        if not script.exists():
            continue
        deps = [d for d in stage.get("deps", []) if isinstance(d, str)]
        for module in _stage_modules(script, g):
            path = (SRC / module.replace(".", "/")).with_suffix(".py")
            path = path if path.exists() else SRC / module.replace(".", "/") / "__init__.py"
            rel = path.relative_to(ROOT).as_posix()
            if path.name == "__init__.py" or rel in CHECK_ONLY:
                continue  # package markers (vital/__init__.py is empty) and the params check
            if not any(rel == d or rel.startswith(d.rstrip("/") + "/") for d in deps):
                missing.setdefault(name, []).append(rel)
    assert not missing, f"modules a stage runs that are not among its deps in dvc.yaml: {missing}"
