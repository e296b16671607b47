"""The spacecraft subsystem dependency graph: which failures cascade into which, and how strongly.

The correlation engine uses it twice: the *strength* between two subsystems is one term of the
correlation score (a power fault and a thermal alert a minute later are probably one incident), and
*upstream/downstream* order names the root cause (power is upstream of thermal, so the power alert
is the probable cause of the thermal ones).

The graph is data: directed edges ``upstream -> downstream`` with a weight in (0, 1] saying how
likely a fault upstream shows up downstream. `DEFAULT_DEPENDENCY_GRAPH` is a sensible default for a
spacecraft bus; `load_dependency_graph` replaces it from a JSON or YAML file of the form::

    {"edges": [{"from": "power", "to": "thermal", "weight": 0.9}, ...],
     "aliases": {"eps": "power"},
     "subsystems": ["star_tracker"]}          # optional: known subsystems without edges

Names are case-insensitive; surrounding blanks are dropped and inner blanks and hyphens become
underscores ("Data Handling" == "data_handling"). Aliases map other names onto a canonical one
("EPS" -> "power"). A name the graph does not know is an *unknown subsystem*: it has no dependency
on anything (strength 0), so it correlates only by time and satellite.

Everything is precomputed when a graph is built (all-pairs best path strengths and transitive
downstream sets as bit masks), so lookups on the ingest hot path are a list or dict index.
"""

from __future__ import annotations

import heapq
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from aetherops.errors import ConfigError, FieldViolation, ValidationError

__all__ = [
    "DEFAULT_ALIASES",
    "DEFAULT_DEPENDENCY_GRAPH",
    "DEFAULT_EDGES",
    "DependencyGraph",
    "Edge",
    "load_dependency_graph",
    "normalize_name",
    "parse_dependency_graph",
]


@dataclass(frozen=True, slots=True)
class Edge:
    """A directed dependency: a fault in `upstream` tends to show up in `downstream` with `weight`."""

    upstream: str
    downstream: str
    weight: float


# Why these edges: every subsystem draws from the electrical power system; thermal control keeps
# propellant, detectors and electronics in range; the onboard computer runs attitude control,
# commanding and data handling; attitude drives antenna and instrument pointing; thrusters are also
# used for momentum dumping. Payload and comms are deliberately *not* connected (neither causes the
# other's faults), so simultaneous payload and comms faults on different satellites stay separate.
# The default is acyclic, which keeps "upstream" a strict order for root-cause ranking.
DEFAULT_EDGES: tuple[Edge, ...] = (
    Edge("power", "thermal", 0.9),
    Edge("power", "obc", 0.9),
    Edge("power", "propulsion", 0.8),
    Edge("power", "adcs", 0.8),
    Edge("power", "payload", 0.8),
    Edge("power", "comms", 0.7),
    Edge("thermal", "propulsion", 0.6),
    Edge("thermal", "payload", 0.6),
    Edge("thermal", "adcs", 0.4),
    Edge("obc", "adcs", 0.7),
    Edge("obc", "comms", 0.6),
    Edge("obc", "payload", 0.6),
    Edge("obc", "propulsion", 0.5),
    Edge("propulsion", "adcs", 0.5),
    Edge("adcs", "payload", 0.6),
    Edge("adcs", "comms", 0.5),
)

DEFAULT_ALIASES: Mapping[str, str] = {
    "eps": "power",
    "electrical_power": "power",
    "electrical_power_system": "power",
    "electrical": "power",
    "tcs": "thermal",
    "thermal_control": "thermal",
    "prop": "propulsion",
    "attitude": "adcs",
    "attitude_control": "adcs",
    "aocs": "adcs",
    "gnc": "adcs",
    "communications": "comms",
    "communication": "comms",
    "comm": "comms",
    "ttc": "comms",
    "tt&c": "comms",
    "telecom": "comms",
    "cdh": "obc",
    "c&dh": "obc",
    "data_handling": "obc",
    "obdh": "obc",
    "onboard_computer": "obc",
    "flight_computer": "obc",
    "instrument": "payload",
    "instruments": "payload",
}


def normalize_name(name: str) -> str:
    """The case- and spelling-insensitive form of a subsystem name (before alias resolution)."""
    return "_".join(name.strip().lower().replace("-", " ").split())


class DependencyGraph:
    """An immutable, precomputed subsystem dependency graph.

    Known subsystems get a dense index (0..n-1) so the engine can keep per-cluster subsystem sets as
    bit masks and look strengths up in a matrix.
    """

    __slots__ = ("_aliases", "_down_masks", "_edges", "_index", "_names", "_paths", "_strength")

    def __init__(
        self,
        edges: Iterable[Edge | tuple[str, str, float]],
        aliases: Mapping[str, str] | None = None,
        subsystems: Iterable[str] = (),
    ) -> None:
        alias_map = {normalize_name(k): normalize_name(v) for k, v in (aliases or {}).items()}
        edge_list: list[Edge] = []
        raw_names: set[str] = {normalize_name(s) for s in subsystems}
        for e in edges:
            up, down, weight = (e.upstream, e.downstream, e.weight) if isinstance(e, Edge) else e
            up_n, down_n = normalize_name(up), normalize_name(down)
            raw_names.update((up_n, down_n))
            edge_list.append(Edge(alias_map.get(up_n, up_n), alias_map.get(down_n, down_n), float(weight)))
        names: list[str] = []
        seen: set[str] = set()
        endpoints = [x for e in edge_list for x in (e.upstream, e.downstream)]
        for raw in [*(normalize_name(s) for s in subsystems), *endpoints]:
            name = alias_map.get(raw, raw)
            if name not in seen:
                seen.add(name)
                names.append(name)
        problems = _check_graph(edge_list, alias_map, seen, raw_names)
        if problems:
            raise ValidationError(problems)
        self._names: tuple[str, ...] = tuple(names)
        self._index: dict[str, int] = {n: i for i, n in enumerate(names)}
        # Aliases resolve straight to the index, so one dict lookup canonicalises a name.
        for alias, target in alias_map.items():
            self._index[alias] = self._index[target]
        self._aliases: dict[str, str] = alias_map
        self._edges: tuple[Edge, ...] = tuple(edge_list)
        self._paths: tuple[tuple[float, ...], ...] = _best_paths(len(names), edge_list, self._index)
        n = len(names)
        self._strength: tuple[tuple[float, ...], ...] = tuple(
            tuple(1.0 if i == j else max(self._paths[i][j], self._paths[j][i]) for j in range(n)) for i in range(n)
        )
        # A subsystem is never its own downstream, even on a cycle: the root-cause count is "others".
        self._down_masks: tuple[int, ...] = tuple(
            sum(1 << j for j in range(n) if j != i and self._paths[i][j] > 0.0) for i in range(n)
        )

    # ---- names -----------------------------------------------------------------------------

    @property
    def names(self) -> tuple[str, ...]:
        """Canonical names of the known subsystems, in index order."""
        return self._names

    @property
    def edges(self) -> tuple[Edge, ...]:
        return self._edges

    @property
    def aliases(self) -> Mapping[str, str]:
        return dict(self._aliases)

    def index(self, name: str) -> int | None:
        """The dense index of a known subsystem (aliases resolved), or None if unknown."""
        return self._index.get(normalize_name(name))

    def canonical(self, name: str) -> str:
        """The canonical name: alias resolved for known subsystems, normalised for unknown ones."""
        n = normalize_name(name)
        i = self._index.get(n)
        return n if i is None else self._names[i]

    def is_known(self, name: str) -> bool:
        return self.index(name) is not None

    # ---- relations -------------------------------------------------------------------------

    def path_strength(self, upstream: str, downstream: str) -> float:
        """Best product of weights along a directed path upstream -> downstream (0 if none)."""
        i, j = self.index(upstream), self.index(downstream)
        if i is None or j is None or i == j:
            return 0.0
        return self._paths[i][j]

    def strength(self, a: str, b: str) -> float:
        """Relationship strength in [0, 1]: 1 for the same known subsystem, else the stronger direction.

        Unknown subsystems have strength 0 with everything (including themselves): they correlate
        only by time and satellite.
        """
        i, j = self.index(a), self.index(b)
        if i is None or j is None:
            return 0.0
        return self._strength[i][j]

    def is_upstream(self, a: str, b: str) -> bool:
        """True if a fault in `a` can cascade (transitively) into `b`; a is never upstream of itself."""
        i, j = self.index(a), self.index(b)
        return i is not None and j is not None and bool(self._down_masks[i] >> j & 1)

    def downstream(self, name: str) -> frozenset[str]:
        """Every subsystem a fault in `name` can cascade into (transitively)."""
        i = self.index(name)
        if i is None:
            return frozenset()
        mask = self._down_masks[i]
        return frozenset(n for j, n in enumerate(self._names) if mask >> j & 1)

    def strength_matrix(self) -> tuple[tuple[float, ...], ...]:
        """`strength` for every pair of known subsystem indices."""
        return self._strength

    def downstream_masks(self) -> tuple[int, ...]:
        """Per index, a bit mask of the indices downstream of it."""
        return self._down_masks

    def to_dict(self) -> dict[str, Any]:
        """The file form (what `parse_dependency_graph` accepts)."""
        return {
            "edges": [{"from": e.upstream, "to": e.downstream, "weight": e.weight} for e in self._edges],
            "aliases": dict(self._aliases),
            "subsystems": list(self._names),
        }

    def __repr__(self) -> str:
        return f"DependencyGraph({len(self._names)} subsystems, {len(self._edges)} edges)"


def _check_graph(
    edges: list[Edge], aliases: dict[str, str], names: set[str], raw_names: set[str]
) -> list[FieldViolation]:
    """Every problem of a graph (`names` are canonical, `raw_names` as written before alias resolution)."""
    problems: list[FieldViolation] = []
    pairs: set[tuple[str, str]] = set()
    for k, e in enumerate(edges):
        if not e.upstream:
            problems.append(FieldViolation(f"edges[{k}].from", "must be a non-empty subsystem name"))
        if not e.downstream:
            problems.append(FieldViolation(f"edges[{k}].to", "must be a non-empty subsystem name"))
        if not (math.isfinite(e.weight) and 0.0 < e.weight <= 1.0):
            problems.append(FieldViolation(f"edges[{k}].weight", f"must be in (0, 1], got {e.weight!r}"))
        if e.upstream and e.upstream == e.downstream:
            problems.append(FieldViolation(f"edges[{k}]", f"self-dependency of {e.upstream!r}"))
        if (e.upstream, e.downstream) in pairs:
            problems.append(FieldViolation(f"edges[{k}]", f"duplicate edge {e.upstream!r} -> {e.downstream!r}"))
        pairs.add((e.upstream, e.downstream))
    for alias, target in aliases.items():
        if not alias:
            problems.append(FieldViolation("aliases", "alias names must be non-empty"))
        elif alias in raw_names:
            problems.append(FieldViolation(f"aliases.{alias}", "is itself a subsystem name, not an alias"))
        if target not in names or target in aliases:
            problems.append(FieldViolation(f"aliases.{alias}", f"points to unknown subsystem {target!r}"))
    return problems


def _best_paths(n: int, edges: list[Edge], index: Mapping[str, int]) -> tuple[tuple[float, ...], ...]:
    """All-pairs best (maximum) product of weights along directed paths; 0 where no path exists.

    Weights are in (0, 1], so a product never grows along a path and Dijkstra on -log(weight) finds
    the best one even when the graph has cycles.
    """
    adj: list[list[tuple[int, float]]] = [[] for _ in range(n)]
    for e in edges:
        adj[index[e.upstream]].append((index[e.downstream], e.weight))
    result: list[tuple[float, ...]] = []
    for src in range(n):
        best = [0.0] * n
        heap: list[tuple[float, int]] = [(-1.0, src)]
        done = [False] * n
        while heap:
            neg, node = heapq.heappop(heap)
            if done[node]:
                continue
            done[node] = True
            if node != src:
                best[node] = -neg
            for nxt, w in adj[node]:
                cand = -neg * w
                if not done[nxt] and cand > best[nxt]:
                    best[nxt] = cand
                    heapq.heappush(heap, (-cand, nxt))
        # A path back to the source (a cycle) does not make a subsystem its own dependency.
        best[src] = 0.0
        result.append(tuple(best))
    return tuple(result)


_TOP_KEYS = frozenset({"edges", "aliases", "subsystems"})
_EDGE_KEYS = frozenset({"from", "to", "weight"})


def parse_dependency_graph(data: object) -> DependencyGraph:
    """A graph from its file form, checking everything and reporting every problem at once."""
    problems: list[FieldViolation] = []
    if not isinstance(data, Mapping):
        raise ValidationError.single("", "a dependency graph must be a mapping with an 'edges' list")
    for key in sorted(str(k) for k in data if k not in _TOP_KEYS):
        problems.append(FieldViolation(key, f"unknown key (expected one of {sorted(_TOP_KEYS)})"))
    raw_edges = data.get("edges")
    edges: list[Edge] = []
    if not isinstance(raw_edges, list):
        problems.append(FieldViolation("edges", "required: a list of {from, to, weight}"))
        raw_edges = []
    for k, raw in enumerate(raw_edges):
        if not isinstance(raw, Mapping):
            problems.append(FieldViolation(f"edges[{k}]", "must be a mapping with from, to and weight"))
            continue
        for key in sorted(str(x) for x in raw if x not in _EDGE_KEYS):
            problems.append(FieldViolation(f"edges[{k}].{key}", "unknown key (expected from, to, weight)"))
        up, down, weight = raw.get("from"), raw.get("to"), raw.get("weight")
        ok = True
        for name, value in (("from", up), ("to", down)):
            if not isinstance(value, str) or not value.strip():
                problems.append(FieldViolation(f"edges[{k}].{name}", "required: a subsystem name"))
                ok = False
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            problems.append(FieldViolation(f"edges[{k}].weight", "required: a number in (0, 1]"))
            ok = False
        if ok:
            assert isinstance(up, str) and isinstance(down, str) and isinstance(weight, int | float)
            edges.append(Edge(up, down, float(weight)))
    raw_aliases = data.get("aliases", {})
    aliases: dict[str, str] = {}
    if not isinstance(raw_aliases, Mapping):
        problems.append(FieldViolation("aliases", "must be a mapping of alias -> subsystem"))
    else:
        for alias, target in raw_aliases.items():
            if not isinstance(alias, str) or not isinstance(target, str) or not target.strip():
                problems.append(FieldViolation(f"aliases.{alias}", "must map a name to a subsystem name"))
            else:
                aliases[alias] = target
    raw_subsystems = data.get("subsystems", [])
    subsystems: list[str] = []
    if not isinstance(raw_subsystems, list) or not all(isinstance(s, str) and s.strip() for s in raw_subsystems):
        problems.append(FieldViolation("subsystems", "must be a list of non-empty subsystem names"))
    else:
        subsystems = list(raw_subsystems)
    if problems:
        # Structural problems first; building would only add noise about half-parsed edges.
        raise ValidationError(problems)
    return DependencyGraph(edges, aliases, subsystems)


def load_dependency_graph(path: str | Path) -> DependencyGraph:
    """Reads a graph from a ``.json`` file or a YAML file (any other suffix).

    Raises ConfigError if the file cannot be read or parsed, ValidationError if its content is not a
    valid graph (unknown keys, weights outside (0, 1], aliases to unknown subsystems, ...).
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"dependency_graph_file: cannot read {p}: {exc.strerror or exc}") from exc
    try:
        data = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"dependency_graph_file: {p} is not valid {p.suffix.lstrip('.') or 'YAML'}: {exc}") from exc
    return parse_dependency_graph(data)


DEFAULT_DEPENDENCY_GRAPH: DependencyGraph = DependencyGraph(DEFAULT_EDGES, DEFAULT_ALIASES)
"""The default spacecraft-bus graph (immutable, so sharing it is safe)."""
