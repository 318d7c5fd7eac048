"""The house rules of docs/architecture.md that import-linter's contracts (pyproject.toml, run
by ``make test``) cannot state: no import circle between any two modules of fico; only the
family file names its model's modules; no adapter file names a method."""

import ast
import re
from pathlib import Path

import grimp

import fico


def strongly_connected(graph) -> list[set[str]]:
    """Tarjan's components of the module import graph (iterative: the graph is deep)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], 0
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in graph.modules:
                    continue
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    found.append(component)
    return found


def test_no_module_of_fico_imports_itself_through_others():
    graph = grimp.build_graph("fico")  # function-level imports count too
    circles = [sorted(c) for c in strongly_connected(graph) if len(c) > 1]
    assert circles == [], f"import circles: {circles}"


def test_the_circle_finder_finds_circles():
    class Graph:
        modules = {"a", "b", "c", "d"}

        @staticmethod
        def find_modules_directly_imported_by(module):
            return {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}[module]

    assert [sorted(c) for c in strongly_connected(Graph) if len(c) > 1] == [["a", "b", "c"]]


ADAPTERS = Path(fico.__file__).parent / "adapters"
FAMILY_FILES = {ADAPTERS / "families" / name for name in ("llava.py", "llava_next.py", "anyres.py")}


def code_words(path: Path) -> set[str]:
    """Identifiers, attribute names, imported names and non-docstring string constants of a file."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    words = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            words.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            words.add(node.name)
        elif isinstance(node, ast.Attribute):
            words.add(node.attr)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            words.update(alias.name for alias in node.names)
            if isinstance(node, ast.ImportFrom) and node.module:
                words.add(node.module)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            words.add(node.value)
    return words


def test_only_the_family_files_name_llava_or_llama():
    for path in ADAPTERS.rglob("*.py"):
        if path in FAMILY_FILES:
            continue
        named = sorted(w for w in code_words(path) if re.search(r"llava|llama", w, re.IGNORECASE))
        assert named == [], f"{path.relative_to(ADAPTERS)} names {named}"


def test_no_adapter_file_names_a_method():
    methods = {name.split("/")[-1].split("_")[0] for name in fico.bundled_recipes()} - {"random", "pool"}
    for path in ADAPTERS.rglob("*.py"):
        named = sorted(w for w in code_words(path) if any(m in w.lower() for m in methods))
        assert named == [], f"{path.relative_to(ADAPTERS)} names {named}"


def test_the_code_word_reader_sees_code_not_docstrings(tmp_path):
    path = tmp_path / "m.py"
    path.write_text('"""About LLaVA."""\nimport x.llava_stuff\n\ndef f():\n    """FastV."""\n    return "tome"\n')
    words = code_words(path)
    assert {"x.llava_stuff", "tome", "f"} <= words and "About LLaVA." not in words and "FastV." not in words
