"""The IR's dependency graph: which step defines each object and which steps read it, as one networkx DiGraph.

Nodes are the steps, by position in ``Program.steps`` (ints), and the objects they name, by name (strs). An edge
object -> step is a use, step -> object a def, so a path step -> object -> step is a data dependency. The graph is
built from the steps' ``uses`` and ``defs`` alone, never from what a pass recorded about them (``first_use``,
``last_use``), so the verifier can walk it on an untrusted plan file. Its readers:

* ``lifetimes``: an object's live range is the span of its neighbours, from the first step that defines or reads it
  to the last, extended to the end of each module call it is an argument of (``live_range``, ``module_calls``);
* ``verify``: every name is an object of the plan (``names``); no object is read before the step that first defines
  it, i.e. the plan's step order is a topological order of the graph: each dependency edge runs forward
  (``early_uses``); the recorded live ranges cover the graph's.

Built once per pass that reads it (two per compile, about 10 ms for llama-3-70b's traced program).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import networkx as nx

from memintent.ir.model import Step


def dependency_graph(steps: Sequence[Step]) -> nx.DiGraph:
    """Steps (ints) and the objects they name (strs): object -> step for each use, step -> object for each def."""
    g = nx.DiGraph()
    g.add_nodes_from(range(len(steps)))
    g.add_edges_from((name, i) for i, s in enumerate(steps) for name in s.uses)
    g.add_edges_from((i, name) for i, s in enumerate(steps) for name in s.defs)
    return g


def names(g: nx.DiGraph) -> Iterator[str]:
    """The object names the steps use or define, in the order they first appear."""
    return (n for n in g if isinstance(n, str))


def module_calls(steps: Sequence[Step]) -> list[tuple[tuple[str, int], ...]]:
    """For each step, the module calls it runs inside, outermost first: (module path, the call's last step). A call
    of module M is a maximal run of consecutive steps whose module path is M or lies under it. A container of
    numbered children (a ModuleList such as the decoder layers) is iterated, not called: its path is no call."""
    out: list[tuple[tuple[str, int], ...]] = [()] * len(steps)
    end: dict[str, int] = {}
    after: set[str] = set()
    for i in range(len(steps) - 1, -1, -1):
        parts = steps[i].module.split(".") if steps[i].module else []
        paths = [".".join(parts[:d]) for d in range(1, len(parts) + 1) if d == len(parts) or not parts[d].isdigit()]
        for path in paths:
            if path not in after:
                end[path] = i       # scanning backwards: the run of this call ends here
        out[i] = tuple((path, end[path]) for path in paths)
        after = set(paths)
    return out


def live_range(g: nx.DiGraph, name: str, calls: Sequence[tuple[tuple[str, int], ...]] | None = None
               ) -> tuple[int, int] | None:
    """(first, last) step that defines or reads ``name``; None if no step does. With ``calls``
    (``module_calls``), the range also runs to the end of every module call that reads the object without having
    made it: in eager PyTorch a module's forward holds its arguments until it returns (the caller's variable, the
    callee's parameter), after the last operation that reads them; the model's inputs and the values its root
    forward makes live until the forward returns."""
    if name not in g:
        return None
    touching = [*g.pred[name], *g.succ[name]]   # the steps that define it, then those that read it
    if not touching:
        return None
    first, last = min(touching), max(touching)
    if calls is not None:
        if not g.pred[name] or not calls[min(g.pred[name])]:
            # A model input (the caller holds it) or a value the root forward itself made (its locals: positions,
            # rotary tables, masks) lives until the forward returns.
            return first, len(calls) - 1
        made = set(calls[min(g.pred[name])])
        for u in g.succ[name]:
            for call in calls[u]:
                if call not in made:
                    last = max(last, call[1])
    return first, last


def early_uses(g: nx.DiGraph) -> Iterator[tuple[str, int, int]]:
    """(object, first reading step, first defining step) for each object some step reads before it is defined:
    the dependency edges that run backwards in step order. Yields nothing for a program whose steps are in
    dependency order (an object no step defines, a weight or a model input, is available from the start)."""
    for name in names(g):
        defs, uses = g.pred[name], g.succ[name]
        if defs and uses:
            first_def, first_use = min(defs), min(uses)
            if first_use < first_def:
                yield name, first_use, first_def
