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
    for path in (REPO / "storage").glob("*.py"):
        assert not _imports(path) & {"pipeline", "stages"}, path
    for path in (REPO / "stages").glob("*.py"):
        assert "pipeline" not in _imports(path), path


SHARED = {"blocks", "kernels", "compiled", "labels", "reduction", "models", "formulas", "statistics",
          "transforms", "perturb", "__init__"}


def test_a_stage_never_imports_another_stage():
    for path in (REPO / "stages").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("stages."):
                target = node.module.split(".")[1]
                assert target in SHARED, f"{path.name} imports stage module {target}"


def test_scoring_contract_ships_in_step_with_the_design():
    """docs/SEMANTICS.md is the contract the README links; it stays equal to the design's."""
    shared = REPO.parent / "shared" / "SEMANTICS.md"
    ours = REPO / "docs" / "SEMANTICS.md"
    assert ours.is_file()
    assert "docs/SEMANTICS.md" in (REPO / "README.md").read_text()
    if shared.is_file():
        assert ours.read_text() == shared.read_text()
