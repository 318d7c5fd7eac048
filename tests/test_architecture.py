"""The house rules of docs/architecture.md that import-linter's contracts (pyproject.toml, run
by ``make test``) do not state: no import circle between any two modules of fico."""

import grimp


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
