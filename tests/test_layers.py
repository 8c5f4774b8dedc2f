"""The package's layering, checked statically (CONTRIBUTING, "Layers"): no import cycle in model/, no upward
import, the hf and vllm engines never import each other, apps never import each other, no `_private` name crosses a
module, no model/ file over 500 lines, and sprm_kernels/ never imports model/. Imports inside functions count.

The graph is read from the source with `ast` (nothing is imported), so a violation fails here before it can
hide behind a lazy import."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "model"
KERNELS = ROOT / "sprm_kernels"
PACKAGE = "sprm_kernels.model"
MAX_LINES = 500

# Layer of each module (by dotted prefix under sprm_kernels.model; longest prefix wins). A module may import its own
# layer or a lower one; a few same-layer pairs are forbidden below.
LAYERS = {
    "core": 1,
    "shipped": 1,  # task definition, tokenizer files, tiny models: data and rules below every engine
    "engines.base": 2,
    "engines.common": 2,
    "engines.hf": 3,
    "engines.vllm": 3,
    "engines.registry": 4,
    "engines": 4,  # the package __init__ re-exports the registry
    "serving": 5,
    "evaluation": 5,
    "training": 5,
    "ray": 6,
    "shipped.build": 7,  # the builder trains and evaluates the shipped model: a top-level tool
    "cli": 7,
    "": 8,  # sprm_kernels.model itself: the public re-exports, above everything
}
# Same-layer siblings that must stay apart: the two engines, and the three apps.
APART = [("engines.hf", "engines.vllm"), ("serving", "evaluation"), ("serving", "training"), ("evaluation", "training")]
# Third-party private attributes we must read (transformers' config and attention choice); nothing of ours.
THIRD_PARTY_PRIVATE = {"_name_or_path", "_attn_implementation", "_seen_tokens", "_asdict", "_fields", "_replace"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(MODEL).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def model_files() -> list[Path]:
    return sorted(MODEL.rglob("*.py"))


def resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str | None:
    """The absolute dotted name an ImportFrom refers to (relative imports resolved against `module`)."""
    if node.level == 0:
        return node.module
    base = f"{PACKAGE}.{module}".rstrip(".").split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, imported names) for every import statement, at any depth."""
    module = module_name(path)
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = resolve(node, module, path.name == "__init__.py")
            if target:
                found.append((node.lineno, target, [alias.name for alias in node.names]))
    return found


def internal(target: str, names: list[str]) -> list[str]:
    """The sprm_kernels.model modules an import statement reaches (a `from pkg import submodule` reaches it)."""
    if target != PACKAGE and not target.startswith(PACKAGE + "."):
        return []
    relative = target[len(PACKAGE) + 1 :] if target != PACKAGE else ""
    reached = [relative]
    for name in names:
        candidate = f"{relative}.{name}".lstrip(".")
        if (MODEL / Path(*candidate.split("."))).with_suffix(".py").exists() or (
            MODEL / Path(*candidate.split(".")) / "__init__.py"
        ).exists():
            reached.append(candidate)
    return reached


def layer_key(module: str) -> str:
    keys = [key for key in LAYERS if key == "" or module == key or module.startswith(key + ".")]
    return max(keys, key=len)


def graph() -> dict[str, set[str]]:
    edges = {}
    for path in model_files():
        module = module_name(path)
        targets = set()
        for _, target, names in imports_of(path):
            targets.update(internal(target, names))
        targets.discard(module)
        edges[module] = targets
    return edges


def is_ancestor_package(module: str, target: str) -> bool:
    """Importing `a.b.c` runs `a/__init__` and `a/b/__init__`: a package's own __init__ is not an upward edge."""
    return target == "" or module.startswith(target + ".")


def test_no_upward_import_and_siblings_stay_apart():
    problems = []
    for path in model_files():
        module = module_name(path)
        for line, target, names in imports_of(path):
            for reached in internal(target, names):
                if reached == module or (is_ancestor_package(module, reached) and reached in ("", "engines")):
                    continue
                if is_ancestor_package(module, reached):
                    continue  # a subpackage reading its own package's __init__ (e.g. engines.vllm.model -> .vllm)
                mine, theirs = layer_key(module), layer_key(reached)
                if LAYERS[theirs] > LAYERS[mine]:
                    problems.append(f"model/{path.relative_to(MODEL)}:{line}: {module} ({mine}) imports {reached}")
                for a, b in APART:
                    if {mine, theirs} == {a, b} or (
                        (mine.startswith(a) and theirs.startswith(b)) or (mine.startswith(b) and theirs.startswith(a))
                    ):
                        problems.append(
                            f"model/{path.relative_to(MODEL)}:{line}: {module} imports {reached} ({a} / {b})"
                        )
    assert not problems, "upward or sibling imports:\n" + "\n".join(problems)


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every back edge of a depth-first walk, as the cycle it closes."""
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if target not in edges:
                continue
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target) :] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return cycles


def test_no_import_cycle():
    # Package __init__ re-exports are edges too; a cycle through them is still a cycle.
    cycles = find_cycles(graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def private_uses(source: str, module: str = "", is_package: bool = False) -> list[str]:
    """`from x import _name` of our modules, and `obj._name` on anything but self / cls / a module-local name. A
    `compat` module is where a third-party library's private attributes may be read (its version forks live
    there), so attributes are not checked in one."""
    tree = ast.parse(source)
    local = {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name.startswith("_")
    }
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = resolve(node, module, is_package) or ""
            if target.startswith("sprm_kernels"):
                problems += [
                    f"{node.lineno}: from {target} import {alias.name}"
                    for alias in node.names
                    if alias.name.startswith("_") and not alias.name.startswith("__")
                ]
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            if node.attr in THIRD_PARTY_PRIVATE or node.attr in local or module.endswith("compat"):
                continue
            problems.append(f"{node.lineno}: .{node.attr} on {ast.unparse(owner)}")
    return problems


@pytest.mark.parametrize("path", model_files(), ids=lambda p: str(p.relative_to(MODEL)))
def test_no_private_name_crosses_a_module(path):
    problems = private_uses(path.read_text(), module_name(path), path.name == "__init__.py")
    assert not problems, f"model/{path.relative_to(MODEL)}:\n" + "\n".join(problems)


def test_no_file_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in model_files() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_kernels_never_import_model_nor_the_model_stacks_at_import():
    problems = []
    for path in sorted(KERNELS.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            problems += [f"{path.relative_to(ROOT)}:{node.lineno}: {n}" for n in names if n.startswith(PACKAGE)]
    assert not problems, "sprm_kernels/ imports model/:\n" + "\n".join(problems)


def test_the_checker_sees_planted_violations():
    """The checks above can fail: a planted private import, private call, upward import and cycle are reported."""
    source = "def f(thing):\n    from sprm_kernels.model.engines.hf.engine import _secret\n    return thing._hidden()\n"
    assert private_uses(source, "evaluation.best_of_k") == [
        "2: from sprm_kernels.model.engines.hf.engine import _secret",
        "3: ._hidden on thing",
    ]
    assert LAYERS[layer_key("cli.common")] > LAYERS[layer_key("evaluation.best_of_k")]  # evaluation -> cli is upward
    assert layer_key("engines.hf.engine") == "engines.hf" and layer_key("shipped.build") == "shipped.build"
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
