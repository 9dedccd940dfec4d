"""The package's layers: module-level imports only, no circles, no model importing the evaluator."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def modules() -> dict[str, Path]:
    """Module name -> file of sr_lib and the three scripts."""
    out = {}
    for f in [*REPO.glob("sr_*.py"), *REPO.glob("sr_lib/**/*.py")]:
        parts = f.relative_to(REPO).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def imports(tree: ast.AST, known) -> set[str]:
    """The known modules an AST imports (`from a import b` counts a.b if that is a module)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m in known and m != "sr_lib"}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(ast.parse(f.read_text()), mods) - {m} for m, f in mods.items()}


def test_import_graph_has_no_cycles():
    g, done, path = graph(), set(), []

    def visit(m):
        assert m not in path, f"import cycle: {' -> '.join(path[path.index(m) :] + [m])}"
        if m in done:
            return
        path.append(m)
        for d in g[m]:
            visit(d)
        path.pop()
        done.add(m)

    for m in g:
        visit(m)
    assert "sr_lib.models" in g and len(done) == len(g) >= 25


def test_no_function_level_imports_of_the_package():
    """Every dependency shows at the top of a file (a hidden import once hid a cycle)."""
    inner = []
    for m, f in modules().items():
        for fn in ast.walk(ast.parse(f.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                    if isinstance(node, ast.ImportFrom):
                        names = [node.module or ""]
                    inner += [f"{m}.{fn.name}: {n}" for n in names if n.startswith("sr_lib")]
    assert inner == []


def test_lower_layers_do_not_import_upwards():
    g = graph()
    below_models = ["sr_lib.checkpoint", "sr_lib.weights", "sr_lib.data", "sr_lib.lpips_net"]
    for m in below_models + ["sr_lib.metrics"]:
        assert not any(d.startswith("sr_lib.models") for d in g[m]), (m, g[m])
    for m in (m for m in g if m.startswith("sr_lib")):
        assert not g[m] & {"sr_train", "sr_sample", "sr_eval"}, m
        if m.startswith("sr_lib.models"):  # models share the LPIPS network, not the evaluator
            assert not g[m] & {"sr_lib.metrics", "sr_lib.tiling", "sr_lib.distributed"}, m
