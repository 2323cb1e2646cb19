"""Repository contracts: the README's commands, import direction."""

from __future__ import annotations

import ast
import re

from tests.conftest import REPO


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text)[:2]


def test_readme_opens_with_two_commands_and_ci_runs_the_test_one():
    main, tests = readme_commands()
    assert main.endswith("python -m pipeline.run stage=all")
    assert "pytest" in tests
    assert tests in (REPO / ".ci" / "run").read_text().splitlines()


def _imports(path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_imports_run_pipeline_to_stages_to_storage():
    for path in (REPO / "storage").rglob("*.py"):
        assert not _imports(path) & {"pipeline", "stages"}, path
    for path in (REPO / "stages").rglob("*.py"):
        assert "pipeline" not in _imports(path), path


def _stage_imports(path) -> list[list[str]]:
    """Every ``stages.…`` module a file imports, split at the dots."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module.split("."))
        elif isinstance(node, ast.Import):
            found += [a.name.split(".") for a in node.names]
    return [parts for parts in found if parts[0] == "stages"]


def test_stages_layout_stages_on_top_shared_pieces_in_packages():
    """Top-level modules of stages/ are the stages; the pieces they share live in
    sub-packages named for what they compute.  A stage never imports another stage, and a
    shared piece never imports a stage: every ``stages.`` import names a package module."""
    packages = {p.name for p in (REPO / "stages").iterdir()
                if p.is_dir() and (p / "__init__.py").is_file()}
    assert {"engine", "thresholds", "tally", "signatures"} <= packages
    for path in (REPO / "stages").rglob("*.py"):
        for parts in _stage_imports(path):
            assert len(parts) == 3 and parts[1] in packages, (
                f"{path.relative_to(REPO)} imports {'.'.join(parts)}: only modules of the "
                f"shared packages ({', '.join(sorted(packages))}) may be imported in stages/")
    for init in (REPO / "stages").glob("*/__init__.py"):
        assert not init.read_text().strip(), f"{init}: no re-exports (import from the module)"


def test_the_project_documents_its_own_contract_and_layout():
    """docs/SEMANTICS.md is the project's contract (the README links it); docs/ARCHITECTURE.md
    maps every SEMANTICS section to the module that implements it, and every module it names
    exists."""
    readme = (REPO / "README.md").read_text()
    assert "docs/SEMANTICS.md" in readme and "docs/ARCHITECTURE.md" in readme
    semantics = (REPO / "docs" / "SEMANTICS.md").read_text()
    architecture = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    sections = re.findall(r"^## (\d+)\. ", semantics, re.M)
    assert sections
    for number in sections:
        assert re.search(rf"^\| §{number}\b", architecture, re.M), f"§{number} has no row"
    for module in re.findall(r"`((?:stages|pipeline|storage)/[\w/]+\.py)`", architecture):
        assert (REPO / module).is_file(), module


COMPILED_LOOPS = {"stages/tally/compiled.py", "stages/tally/classes.py", "stages/tally/counts.py"}


def test_no_module_over_about_400_lines():
    """One idea per module: apart from the numba loops, none grows past about 400 lines."""
    for folder in ("pipeline", "stages", "storage"):
        for path in (REPO / folder).rglob("*.py"):
            name = str(path.relative_to(REPO))
            if name not in COMPILED_LOOPS:
                assert len(path.read_text().splitlines()) <= 425, name


def test_no_import_circle():
    """No module reaches itself through imports, function-level ones included."""
    modules = {}
    for folder in ("pipeline", "stages", "storage"):
        for path in (REPO / folder).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            modules[name] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found = {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                found = {a.name for a in node.names}
            else:
                continue
            graph[name] |= found & modules.keys()
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph[name]):
            assert state.get(target) != 1, " -> ".join([*path[path.index(target):], target])
            if target not in state:
                visit(target, [*path, target])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
