"""Routing: load and check `rules/*.toml`, then decide where each message goes (pure)."""

from gateway.routing.engine import AssignmentState, Decision, TraceEntry, evaluate
from gateway.routing.facts import MessageFacts
from gateway.routing.loader import Problem, RulesError, check_rules, load_rules
from gateway.routing.model import (
    Defaults,
    EscalationStep,
    Match,
    Person,
    Route,
    Rules,
    SlaPolicy,
)

__all__ = [
    "AssignmentState",
    "Decision",
    "Defaults",
    "EscalationStep",
    "Match",
    "MessageFacts",
    "Person",
    "Problem",
    "Route",
    "Rules",
    "RulesError",
    "SlaPolicy",
    "TraceEntry",
    "check_rules",
    "evaluate",
    "load_rules",
]
