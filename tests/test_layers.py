"""The package's layers point one way and its modules import no cycle, read from the source (ast), not by importing.

Every import counts, those inside functions and under TYPE_CHECKING too: each is a dependency all the same.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mbib"

# lowest first; a module may import its own layer and those below. A module's layer is its longest prefix here.
LAYERS = [
    ("core", ["mbib", "mbib.errors", "mbib.console", "mbib.metrics", "mbib.storelock", "mbib.serving_page",
              "mbib.classifier"]),  # the ONNX model and its preprocessing: numpy, PIL and ONNX Runtime only
    ("data", ["mbib.data", "mbib.config"]),  # config resolves data roots through mbib.data
    ("models", ["mbib.models", "mbib.losses", "mbib.checkpoint"]),  # losses: the pure maths only
    ("methods", ["mbib.methods"]),
    ("train", ["mbib.train", "mbib.raylocal"]),
    # the Ray Train driver (runner) and its summary (report) record runs in MLflow: they sit with tracking
    ("tracking", ["mbib.tracking", "mbib.plots", "mbib.train.runner", "mbib.train.report"]),
    # ONNX export and the MLflow Model around it: the study registers its best trial as one
    ("export", ["mbib.export", "mbib.mlflow_model", "mbib.mlflow_model_code"]),
    ("study", ["mbib.study", "mbib.reproduction", "mbib.analysis"]),
    ("serving", ["mbib.serving", "mbib.ingress", "mbib.serve_app", "mbib.cli"]),
]
RANK = {prefix: rank for rank, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes}


def module_names(root: Path = PACKAGE) -> dict[str, Path]:
    names = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules `path` imports: `from X import a` names the submodule X.a when there is one, else X."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                       for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # a name inside a module: the module
                target = target.rpartition(".")[0]
            if target:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imports(path, modules) - {name} for name, path in modules.items()}


def layer(module: str) -> int:
    prefix = module
    while prefix not in RANK:
        if "." not in prefix:
            raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_layers.py")
        prefix = prefix.rpartition(".")[0]
    return RANK[prefix]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def upward(edges: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} ({LAYERS[layer(m)][0]}) imports {t} ({LAYERS[layer(t)][0]})"
                  for m, targets in edges.items() for t in targets if layer(t) > layer(m))


def test_no_module_imports_a_higher_layer():
    assert upward(graph()) == []


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_nothing_below_the_training_loop_imports_it():
    edges = graph()
    below = [m for m in edges if layer(m) < RANK["mbib.train"]]
    assert "mbib.methods.gml" in below and "mbib.losses.functional" in below
    assert [(m, t) for m in below for t in edges[m] if t.startswith("mbib.train")] == []


def study_reached_from_tracking(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    tracking = [m for m in edges if layer(m) == RANK["mbib.tracking"]]
    return sorted((m, t) for m in tracking for t in edges[m] if layer(t) == RANK["mbib.study"])


def test_tracking_imports_no_study():
    """MLflow recording sits below the study (the study's own record and registration live in mbib.study.record):
    no module of the tracking layer, the MLflow helpers, plots and the Train driver alike, imports the study layer."""
    edges = graph()
    tracking = {m for m in edges if layer(m) == RANK["mbib.tracking"]}
    assert {"mbib.tracking.registry", "mbib.tracking.runs", "mbib.plots", "mbib.train.runner"} <= tracking
    assert layer("mbib.tracking") < layer("mbib.study") == layer("mbib.reproduction") == layer("mbib.analysis")
    assert study_reached_from_tracking(edges) == []


@pytest.mark.parametrize("source, tracked, problem", [
    ("from mbib.train.engine import Engine\n", "", "upward"),  # the methods layer reaching up
    ("import mbib.methods.fake\n", "", "cycle"),  # fake imports registry back: a cycle
    ("", "def best():\n    from mbib.study.record import register\n", "study"),  # tracking reaching up, lazily
])
def test_the_checks_catch_what_they_are_for(tmp_path, source, tracked, problem):
    root = tmp_path / "mbib"
    for name, text in {"__init__.py": "", "methods/__init__.py": "", "train/__init__.py": "",
                       "train/engine.py": "", "methods/registry.py": source,
                       "methods/fake.py": "from mbib.methods import registry\n",
                       "tracking/__init__.py": "", "tracking/registry.py": tracked,
                       "study/__init__.py": "", "study/record.py": ""}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    modules = module_names(root)
    edges = {name: imports(path, modules) - {name} for name, path in modules.items()}
    if problem == "upward":
        assert upward(edges) == ["mbib.methods.registry (methods) imports mbib.train.engine (train)"]
    elif problem == "study":
        assert study_reached_from_tracking(edges) == [("mbib.tracking.registry", "mbib.study.record")]
    else:
        assert cycles(edges) == [["mbib.methods.fake", "mbib.methods.registry"]]
