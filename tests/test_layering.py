"""The package's import layering: data flows models → nn → functional → ops → backends, never back up.

Every module of the fastresnet package (the top-level `kernels/` folder included, installed as fastresnet.kernels) is
parsed with `ast`; every `import` / `from … import` it contains counts, also those inside functions (a late import
still runs, it only hides the dependency). A module may import modules of its own rank or below, and the import
graph has no cycle. `LAYERS` places every module explicitly, so a new module fails here until it is given a rank.

Not seen: imports by a string at run time (the backend registry's `importlib.import_module` of its backends, the
console script's commands), and the implicit import of a module's parent package, which Python finds already in
`sys.modules` when a package's `__init__` imports its own submodules.
"""
import ast
import importlib.util
from pathlib import Path
from typing import Dict, List, Set

import fastresnet

# rank: (name, module prefixes). A module may import only modules of its own rank or lower ones.
LAYERS = {
    0: ("backends", ("fastresnet.backends", "fastresnet.kernels", "fastresnet._C", "fastresnet.reference")),
    1: ("ops", ("fastresnet.ops",)),
    # sync: the synchronised-BN statistics math; sync_functional: the synchronised fused ops; recompute: the
    # statistics tape that functional.bn_statistics reads during a recomputed unit's replay
    2: ("functional", ("fastresnet.functional", "fastresnet.sync", "fastresnet.sync_functional",
                       "fastresnet.recompute")),
    3: ("nn", ("fastresnet.nn",)),
    # whole-model code: the zoo, and what converts or configures a built model (fused <-> eager, synchronised BN,
    # recomputation modes)
    4: ("models", ("fastresnet.models", "fastresnet.convert", "fastresnet.distributed", "fastresnet.memory")),
    5: ("package API", ("fastresnet",)),
    6: ("applications", ("fastresnet.checkpoint", "fastresnet.cli", "fastresnet.data", "fastresnet.info",
                         "fastresnet.numerics", "fastresnet.profile", "fastresnet.reproduce", "fastresnet.train")),
}

# (importer, imported) pairs that break the layering today, each with its reason; the test also fails when one of
# them no longer occurs, so this list cannot go stale
KNOWN_UPWARD: set = set()  # (importer, imported) pairs allowed against the order, each with its reason


def rank(module: str) -> int:
    """The rank of `module`: the longest prefix in LAYERS that names it or a package above it."""
    best, found = -1, None
    for r, (_, prefixes) in LAYERS.items():
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, found = len(p), r
    if found is None:
        raise AssertionError(f"{module}: not placed in LAYERS; give it a rank in tests/test_layering.py")
    return found


def package_sources() -> Dict[str, str]:
    """{module name: source} for every .py file of the fastresnet package, kernels/ included."""
    roots = {"fastresnet": Path(fastresnet.__file__).parent}
    spec = importlib.util.find_spec("fastresnet.kernels")
    roots["fastresnet.kernels"] = Path(spec.origin).parent
    sources = {}
    for prefix, root in roots.items():
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            sources[".".join([prefix] + parts)] = path.read_text()
    return sources


def imports_of(module: str, source: str, modules: Set[str], is_package: bool) -> Set[str]:
    """The package modules that `module` imports anywhere in its source. `from P import name` counts as an import of
    the module P.name when that is a module of the package, else of P."""
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against the importing module's package
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        found.update(n for n in names if n == "fastresnet" or n.startswith("fastresnet."))
    found.discard(module)
    return found


def import_graph(sources: Dict[str, str]) -> Dict[str, Set[str]]:
    modules = set(sources) | {"fastresnet._C"}  # the compiled extension: imported, has no Python source
    packages = {m for m in sources if any(o.startswith(m + ".") for o in sources)}
    return {m: imports_of(m, src, modules, m in packages) for m, src in sources.items()}


def upward_imports(graph: Dict[str, Set[str]]) -> Set[tuple]:
    return {(m, t) for m, targets in graph.items() for t in targets if rank(t) > rank(m)}


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found = []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _describe(edges) -> str:
    return "\n".join(f"  {m} ({LAYERS[rank(m)][0]}) imports {t} ({LAYERS[rank(t)][0]})" for m, t in sorted(edges))


def test_every_module_is_ranked():
    for module in import_graph(package_sources()):
        rank(module)


def test_no_upward_imports():
    upward = upward_imports(import_graph(package_sources()))
    new = upward - KNOWN_UPWARD
    assert not new, "imports against the layering (models → nn → functional → ops → backends):\n" + _describe(new)
    gone = KNOWN_UPWARD - upward
    assert not gone, "no longer imported; remove from KNOWN_UPWARD:\n" + _describe(gone)


def test_no_import_cycles():
    graph = import_graph(package_sources())
    # the known upward imports are late imports that may not close a circle either
    assert cycles(graph) == [], f"import cycles: {cycles(graph)}"


def test_checker_sees_late_and_relative_imports_and_cycles():
    """The checker on a made-up package: a function-level upward import and a relative one form a cycle."""
    sources = {
        "fastresnet.functional": "def f():\n    from fastresnet.nn.layers import X\n",
        "fastresnet.nn.layers": "from .. import functional\n",
        "fastresnet.nn": "from fastresnet.nn.layers import X\n",
    }
    graph = import_graph(sources)
    assert graph["fastresnet.nn.layers"] == {"fastresnet.functional"}
    assert upward_imports(graph) == {("fastresnet.functional", "fastresnet.nn.layers")}
    assert cycles(graph) == [["fastresnet.functional", "fastresnet.nn.layers"]]
