"""The frozen `Finding` type shared by diagnosis (from a trace) and preflight (before training).

A finding says what is wrong (`kind`), where (`layers`, most affected first), since when
(`first_step`), why we think so (`evidence`, the numbers: typed per kind in
:mod:`gradtrace.diagnose.evidence`), what the mechanism is (`explanation`) and what to do
(`fixes`, rows of the stable-training checklist rendered for this model).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from . import evidence as _evidence

#: Every finding kind gradtrace can report, exactly these strings.
KINDS = (
    "vanishing_gradients",
    "exploding_gradients",
    "nonfinite",
    "loss_spike",
    "loss_nonfinite",
    "dead_units",
    "saturated_units",
    "shrinking_activations",
    "growing_activations",
    "vanishing_through_time",
    "exploding_through_time",
    "near_overflow",
)

SEVERITIES = ("warning", "error")
assert set(_evidence.EVIDENCE) == set(KINDS), "every kind needs its evidence class in evidence.py"


@dataclass(frozen=True)
class Fix:
    """One checklist row made concrete: the problem it addresses, what to do, and code.

    Example:
        >>> Fix("Gradients explode", "Clip the total gradient norm before the step",
        ...     "gt.clip_grad_norm_(model.parameters(), max_norm=1.0)").code
        'gt.clip_grad_norm_(model.parameters(), max_norm=1.0)'
    """

    problem: str
    action: str
    code: str = ""

    def to_dict(self) -> dict[str, str]:
        """JSON-ready form: ``{"problem", "action", "code"}``.

        Example:
            >>> Fix("Gradients explode", "Clip the norm").to_dict()
            {'problem': 'Gradients explode', 'action': 'Clip the norm', 'code': ''}
        """
        return asdict(self)


@dataclass(frozen=True)
class Finding:
    """A diagnosed problem (frozen: fixes are added by a new finding, ``dataclasses.replace``).

    ``evidence`` may be given as a dict; it is held as the kind's typed class from
    :mod:`gradtrace.diagnose.evidence` (read ``f.evidence.dead``; ``f.evidence["dead"]``
    works too), and ``to_dict`` gives the dict back.

    Example:
        >>> f = Finding("dead_units", "warning", ["net.1"], 0, 40, {"dead": {"net.1": 12}},
        ...             "12 ReLU units never fired.", [])
        >>> f.to_dict()["kind"], type(f.evidence).__name__, f.evidence.dead
        ('dead_units', 'DeadUnits', {'net.1': 12})
    """

    kind: str
    severity: str
    layers: list[str]
    first_step: int | None
    last_step: int | None
    evidence: _evidence.Evidence | Mapping[str, Any] = field(default_factory=dict)
    explanation: str = ""
    fixes: list[Fix] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r} is not a finding kind; valid: {', '.join(KINDS)}")
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity={self.severity!r}; valid: {', '.join(SEVERITIES)}")
        # The one place a detector's dict becomes its kind's typed evidence.
        object.__setattr__(self, "evidence", _evidence.coerce(self.kind, self.evidence))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the schema of `gradtrace doctor --json`).

        Example:
            >>> Finding("nonfinite", "error", ["fc"], 7, 7).to_dict()["first_step"]
            7
        """
        return {
            "kind": self.kind,
            "severity": self.severity,
            "layers": list(self.layers),
            "first_step": self.first_step,
            "last_step": self.last_step,
            "evidence": _jsonable(self.evidence),
            "explanation": self.explanation,
            "fixes": [f.to_dict() if isinstance(f, Fix) else f for f in self.fixes],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Finding":
        """Rebuild a finding from :meth:`to_dict` output (fix rows become :class:`Fix`).

        Example:
            >>> f = Finding("loss_spike", "warning", [], 10, 12, fixes=[Fix("Loss spikes", "Lower the lr")])
            >>> Finding.from_dict(f.to_dict()) == f
            True
        """
        fixes = [Fix(**f) if isinstance(f, dict) else f for f in d.get("fixes", [])]
        return cls(d["kind"], d["severity"], list(d["layers"]), d.get("first_step"),
                   d.get("last_step"), d.get("evidence", {}), d.get("explanation", ""), fixes)


def _jsonable(x: Any) -> Any:
    """Numbers from numpy/torch become plain Python numbers; NaN/inf become strings."""
    import math

    if isinstance(x, Mapping):        # typed evidence (and nested records) too
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "tolist"):
        return _jsonable(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x
