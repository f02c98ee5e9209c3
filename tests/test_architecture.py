"""The package's layers, read from its source: which module imports which.

    core  <-  nn  <-  workdir  <-  decode  <-  train  <-  cli, configs
    data  ->  workdir (its names only)

The rules (BUILD_NOTES.md, "Architecture"): no import cycle between modules or between
layers; `core/` imports nothing else of the package and never Flax; `nn/` imports only the
core; `data/` never reaches the model; `decode/` never imports `train/`. Imports are read
with `ast` (every `import` statement, at module level or inside a function), so a lazy
import counts like any other; `if TYPE_CHECKING:` blocks are skipped (not run).
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "attention_jax"

# layer -> the layers it may import (besides itself). "workdir" is the package's __init__
# (file names, the lock: no JAX); "workdir.*" its other modules; "multihost" the one leaf
# module of barriers every layer may use.
ALLOWED = {
    "core": set(),
    "nn": {"core"},
    "multihost": set(),
    "data": {"workdir", "multihost"},
    "workdir": set(),
    "workdir.*": {"workdir", "nn", "core", "multihost"},
    "decode": {"core", "nn", "data", "workdir", "workdir.*", "multihost"},
    "train": {"core", "nn", "data", "workdir", "workdir.*", "decode", "multihost"},
    "visualize": set(),
    "cli": {"*"},
    "configs": {"*"},
    "__init__": {"core", "nn"},
    "__main__": {"cli"},
}
# Third-party libraries a layer must not import.
FORBIDDEN_LIBRARIES = {"core": {"flax", "optax", "orbax"}, "data": {"flax", "optax", "orbax"}}


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: pathlib.Path, module: str, modules=()) -> set[str]:
    """Every module `path` imports (absolute names; relative imports resolved). With
    `modules` (the package's), ``from pkg import name`` counts as importing ``pkg.name`` when
    that is a module, else ``pkg``."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()

    def visit(node):
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                # `from attention_jax.nn import model` imports the module attention_jax.nn.model.
                name = f"{base}.{alias.name}"
                found.add(name if name in modules else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        graph[name] = {m for m in _imports(path, name, modules) if m in modules and m != name}
    return graph


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__"
    if parts[1] == "workdir" and len(parts) > 2:
        return "workdir.*"
    return parts[1]


GRAPH = _graph()


def _third_party(module: str) -> set[str]:
    path = PACKAGE.joinpath(*module.split(".")[1:])
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    return {m.split(".")[0] for m in _imports(path, module)} - {"attention_jax"}


def test_the_import_graph_was_read():
    # A parser that silently found nothing would pass every rule below.
    assert len(GRAPH) >= 30
    assert "attention_jax.core.attention" in GRAPH["attention_jax.nn.layers"]
    assert "attention_jax.train.step" in GRAPH["attention_jax.train.loop"]
    assert set(ALLOWED) >= {_layer(m) for m in GRAPH}, "a new layer needs its rule here"


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path [a, b, ..., a], or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_module_imports_itself_through_others():
    assert _cycle(GRAPH) is None, " -> ".join(_cycle(GRAPH))


def test_no_cycle_between_layers():
    layers = {}
    for module, deps in GRAPH.items():
        layers.setdefault(_layer(module), set()).update(
            _layer(d) for d in deps if _layer(d) != _layer(module)
        )
    assert _cycle(layers) is None, " -> ".join(_cycle(layers))


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_each_module_imports_only_the_layers_below_it(module):
    allowed = ALLOWED[_layer(module)]
    if "*" in allowed:
        return
    wrong = sorted(d for d in GRAPH[module] if _layer(d) not in allowed | {_layer(module)})
    assert not wrong, f"{module} ({_layer(module)}) may import {sorted(allowed)}, not {wrong}"


@pytest.mark.parametrize("layer", sorted(FORBIDDEN_LIBRARIES))
def test_the_pure_layers_do_not_import_the_framework(layer):
    for module in GRAPH:
        if _layer(module) == layer:
            found = _third_party(module) & FORBIDDEN_LIBRARIES[layer]
            assert not found, f"{module} imports {sorted(found)}"


def _closure(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in GRAPH[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if _layer(m) == "data"))
def test_data_never_reaches_the_model(module):
    reached = sorted(m for m in _closure(module) if _layer(m) not in ALLOWED["data"] | {"data"})
    assert not reached, f"{module} reaches {reached}"


# `import attention_jax as aj` before the layers were made (issue 15); names may be added,
# never removed.
PUBLIC_BEFORE_LAYERS = (
    "IMPLEMENTATIONS", "Transformer", "TransformerConfig", "TransformerLM",
    "apply_rotary_embedding", "causal_mask", "combine_masks", "dot_product_attention",
    "init_multi_head_attention", "multi_head_attention", "padding_mask",
    "scaled_dot_product_attention", "segment_mask", "shift_right",
    "sinusoidal_positional_encoding",
)  # fmt: skip


def test_the_public_api_keeps_every_name():
    import attention_jax as aj

    assert set(PUBLIC_BEFORE_LAYERS) | {"attention_weights"} <= set(aj.__all__)
    for name in aj.__all__:
        assert getattr(aj, name) is not None, name


def test_readme_layout_names_every_module_where_it_is():
    """README's Layout lists each subpackage's files; it must match the tree."""
    import re

    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("## Layout") :]
    block = block[block.index("```\n") + 4 :]
    block = block[: block.index("```")]
    listed, package = {}, None
    for line in block.splitlines():
        if m := re.match(r"^  (\w+)/ ", line):
            package = m.group(1)
        elif not line.startswith("   "):
            package = None
        if package:
            listed.setdefault(package, set()).update(re.findall(r"(\w+)\.py", line))
    assert set(listed) >= {"core", "nn", "data", "workdir", "decode", "train", "cli"}
    for package, names in listed.items():
        if package == "configs":  # listed by config name
            continue
        present = {p.stem for p in (PACKAGE / package).glob("*.py") if not p.stem.startswith("_")}
        present |= {"__init__"} & names
        assert names == present, (
            f"README Layout, {package}/: lists {sorted(names)}, has {sorted(present)}"
        )
