"""The package's layers run one way. Every ``import medlvr...`` in medlvr/ (at module level or
inside a function: both run) must point to the importer's own layer or one below, and the
module graph has no cycle. The order is written once, here."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "medlvr"

# Bottom to top. A part is medlvr's first-level module or package.
LAYERS = [
    {"_C", "_backend", "capture", "progress", "imageio", "flags", "devices", "registry"},  # plumbing: no model, no op
    {"models"},  # the one contact with transformers; the model families' facts
    {"reference"},  # plain-PyTorch specification of every op and rule (tests compare against it)
    {"kernels"},  # Triton kernels
    {"ops"},  # the public differentiable ops
    {"engine"},  # latent-step decoding (exit rules, sampling, the plain-HF loop backend)
    {"policy", "dropin"},  # the latent policy; the drop-in API for other models
    {"data"},  # records, collate, answers and scoring, converters, the synthetic set
    {"train", "eval"},  # the two stages in the shared loop; evaluation (neither imports the other)
    {"cli", "__init__"},  # one module per command, and the package's face
]
RANK = {part: i for i, layer in enumerate(LAYERS) for part in layer}


def _module(path: Path) -> str:
    mod = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return mod[: -len(".__init__")] if mod.endswith(".__init__") else mod


def _imports(path: Path) -> set[str]:
    """Absolute names of the medlvr modules that ``path`` imports (a name imported from a package
    counts as its submodule when one exists)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "medlvr"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and \
                node.module.split(".")[0] == "medlvr":
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                rel = Path(*sub.split("."))
                is_module = ((ROOT / rel).with_suffix(".py").is_file() or (ROOT / rel / "__init__.py").is_file()
                             or any((ROOT / rel).parent.glob(rel.name + ".*.so")))  # the built extension
                out.add(sub if is_module else node.module)
    return out


def _part(mod: str) -> str:
    parts = mod.split(".")
    if len(parts) == 1:
        return "__init__"
    return parts[1] if parts[1] in RANK else "__version__" if parts[1] == "__version__" else parts[1]


def _graph() -> dict[str, set[str]]:
    return {_module(p): _imports(p) for p in PKG.rglob("*.py")}


def test_every_part_has_a_layer():
    parts = {p.stem if p.is_file() else p.name for p in PKG.iterdir()
             if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").is_file()))}
    parts = {("__init__" if p == "__init__" else p) for p in parts}
    assert parts - RANK.keys() == set(), "add these parts of medlvr/ to LAYERS"


def test_no_import_runs_up_a_layer():
    upward = []
    for mod, targets in _graph().items():
        for t in targets:
            src, dst = _part(mod), _part(t)
            if dst in RANK and RANK[dst] > RANK[src]:
                upward.append(f"{mod} -> {t}")
    assert not upward, "imports that run up a layer:\n" + "\n".join(sorted(upward))


def test_train_and_eval_stay_apart():
    """The two rooms of one floor: evaluation reads trained runs (policy), training never
    evaluates (the demo, a command, does both)."""
    crossing = [f"{m} -> {t}" for m, ts in _graph().items() for t in ts
                if {_part(m), _part(t)} == {"train", "eval"}]
    assert not crossing, "imports between train and eval:\n" + "\n".join(sorted(crossing))


def test_no_import_cycle():
    graph = {m: {t for t in ts if t in _graph_keys()} for m, ts in _graph().items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    # A package's __init__ re-exporting its submodules is not a cycle a reader has to untangle.
    cycles = [c for c in cycles if not _through_own_init(c)]
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def _graph_keys() -> set[str]:
    return {_module(p) for p in PKG.rglob("*.py")}


def _through_own_init(cycle: str) -> bool:
    mods = cycle.split(" -> ")
    return any(b.startswith(a + ".") or a.startswith(b + ".") for a, b in zip(mods, mods[1:]))
