"""Import structure of the medtune package: no cycles anywhere, and data code draws no charts.

The graph is built from the source (the AST of every module), so imports inside functions count:
they hide a cycle from ``import`` at load time but still tie the modules together. (Modules named
only in a string, such as ``medtune.train.STAGES`` for ``import_module``, are not edges.)
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import medtune

ROOT = Path(medtune.__file__).parent


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """medtune modules ``module`` imports anywhere in its source (top level or inside functions)."""

    def owner(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets |= {owner(alias.name) for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import: resolve against the importing package
                package = module if path.name == "__init__.py" else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}" if base else package
            for alias in node.names:
                # ``from medtune.report import plots`` imports the submodule plots.
                full = f"{base}.{alias.name}"
                targets.add(full if full in known else owner(base))
    targets.discard(None)
    targets.discard(module)
    return targets


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {name: _imports(name, path, known) for name, path in known.items()}


def test_the_graph_sees_function_level_imports():
    graph = _graph()
    # exam.load_exam_file imports the CMExam reader inside the function.
    assert "medtune.data.cmexam" in graph["medtune.data.exam"]
    assert "medtune.report.results" in graph["medtune.report.html"]
    # evaluate_text imports the question parser inside the function; loading imports models inside one.
    assert "medtune.data.exam_xlsx" in graph["medtune.evaluation.text_tasks"]
    assert "medtune.models" in graph["medtune.inference.loading"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_graph_covers_every_module_of_the_package():
    graph = _graph()
    on_disk = set(ROOT.rglob("*.py"))
    assert len(graph) == len(on_disk)
    for name in ("medtune", "medtune.cli", "medtune.inference.server", "medtune.train.rl", "medtune.web"):
        assert any(m == name or m.startswith(name + ".") for m in graph), name


def test_no_import_cycle_in_the_whole_medtune_package():
    """Once data/report only; cycles sat elsewhere: data.exam_xlsx ↔ evaluation.text_tasks,
    adapters ↔ models, inference.loading ↔ inference.predict. Now every module is checked."""
    graph = _graph()
    cycles = _cycles(graph)
    assert cycles == [], f"import cycles: {cycles}"
    # the three that were broken stay broken in the direction chosen
    assert "medtune.evaluation.text_tasks" not in graph["medtune.data.exam_xlsx"]
    assert "medtune.adapters" not in graph["medtune.models"]
    assert "medtune.inference.predict" not in graph["medtune.inference.loading"]


def test_moved_pieces_live_where_their_callers_import_them():
    from medtune import export, models, quickstart
    from medtune.evaluation import text_tasks
    from medtune.inference import loading, predict

    assert quickstart.resolve_run is loading.resolve_run
    assert not hasattr(predict, "resolve_run") and not hasattr(predict, "RunArtifacts")
    assert export._virtual_token_types() is models.VIRTUAL_TOKEN_PEFT_TYPES
    assert text_tasks.evaluate_question_generation.__module__ == "medtune.evaluation.text_tasks"


def test_html_and_markdown_share_one_results_module():
    from medtune.report import html, markdown, results

    assert html.load_eval is markdown.load_eval is results.load_eval
    assert html.COLUMNS is markdown.COLUMNS is results.COLUMNS
    assert "medtune.report.markdown" not in _graph()["medtune.report.html"]


def test_data_quality_does_not_import_matplotlib():
    source = (ROOT / "data" / "quality.py").read_text(encoding="utf-8")
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module or "")
    assert not [n for n in names if n.split(".")[0] == "matplotlib"]
    assert "medtune.report.plots" not in names
    # And at run time: loading the module (and computing statistics) loads no plotting library.
    code = ("import sys, medtune.data.quality as q; q.inspect(sys.argv[1]); "
            "print('matplotlib' in sys.modules)")
    sample = ROOT / "examples" / "medicalgpt" / "grpo_sample.jsonl"
    out = subprocess.run([sys.executable, "-c", code, str(sample)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
