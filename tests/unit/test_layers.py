"""The package layers hold (docs/architecture.md, "Layers"): the pure SLA planning imports
nothing with side effects, and no package reaches back up into the daemon's composition
root, and no package is part of a runtime import cycle."""

from __future__ import annotations

from tests.support.imports import ROOT, cycles, graph, imports, module_name, node

#: What the pure planning may use at run time besides itself (and the standard library).
SLA_MAY_IMPORT = {"gateway.sla"}
#: ... and for annotations only: the rules model it plans with.
SLA_MAY_ANNOTATE_WITH = {"gateway.routing.model"}


def test_the_sla_package_is_pure() -> None:
    found = []
    for path in sorted((ROOT / "sla").glob("*.py")):
        for name, typing_only in imports(path):
            allowed = SLA_MAY_IMPORT | (SLA_MAY_ANNOTATE_WITH if typing_only else set())
            if not any(name == a or name.startswith(a + ".") for a in allowed):
                found.append(f"{module_name(path)} imports {name}")
    assert found == []


def test_nothing_imports_the_composition_root_but_the_commands() -> None:
    importers = {
        module_name(path)
        for path in ROOT.rglob("*.py")
        for name, _ in imports(path)
        if node(name) == "gateway.app"
    } - {"gateway.app"}
    assert importers <= {"gateway.cli"}


def test_no_package_is_in_a_runtime_cycle() -> None:
    assert cycles(graph().edges()) == []


def test_the_only_cycle_through_annotations_is_the_plan_naming_the_rules_model() -> None:
    # gateway.sla plans with routing.model types; it imports them under TYPE_CHECKING only.
    assert cycles(graph().edges(with_typing=True)) == [["gateway.routing", "gateway.sla"]]


def test_the_cycle_finder_finds_a_cycle() -> None:
    # The check above must be able to fail: a two-package loop and a self-contained tail.
    edges = {"a": {"b"}, "b": {"a", "c"}, "c": set()}
    assert cycles(edges) == [["a", "b"]]
