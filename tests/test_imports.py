"""No import cycles between r1reward's modules, counting imports inside functions too
(a function-level import only hides a cycle; it does not remove it)."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "r1reward"


def _imports(path: Path, modules: set) -> set:
    """The r1reward modules ``path`` imports anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 or node.module == "r1reward":  # from . import x / from .x import y
                names = [node.module] if node.level == 1 and node.module else [a.name for a in node.names]
            elif node.module and node.module.startswith("r1reward."):
                names = [node.module.split(".")[1]]
            else:
                continue
            found.update(n.split(".")[0] for n in names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("r1reward."))
    return (found & modules) - {path.stem}


def test_no_import_cycles():
    modules = {p.stem for p in PKG.glob("*.py")}
    graph = {m: _imports(PKG / f"{m}.py", modules) for m in modules}
    assert graph["model"] >= {"tiny", "processor"} and "model" not in graph["tiny"]
    state = {}  # module -> "open" while on the DFS stack, "done" after

    def visit(m, path):
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(d):] + [d]))
            if d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
