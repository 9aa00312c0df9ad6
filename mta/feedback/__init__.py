"""The sender's feedback: what happened to a message, in SparkPost's terms.

:mod:`mta.feedback.classify` turns an SMTP reply into SparkPost's
``bounce_class`` with the name of the rule that decided, from a rules table
that is data (``bounce_rules.toml`` here, plus the operator's own file named
by ``feedback.bounce_rules``, tried first).

For callers: :func:`configure` once per process with the operator's rules
file (the spool shard does, from the validated configuration), then
:func:`classify` per reply.  Without :func:`configure` the shipped rules alone
apply.
"""
from __future__ import annotations

from mta.feedback.classify import (BOUNCE_CLASSES, UNDETERMINED, Classifier, RuleError,
                                   load_rules, shipped_rules)

__all__ = ["BOUNCE_CLASSES", "UNDETERMINED", "Classifier", "RuleError", "classify",
           "configure", "check", "load_rules", "shipped_rules"]

_classifier: Classifier | None = None


def configure(bounce_rules: str | None) -> Classifier:
    """Use the operator's rules file *bounce_rules* (None/"": none) in this process."""
    global _classifier
    _classifier = Classifier.from_file(bounce_rules)
    return _classifier


def check(bounce_rules: str | None) -> str:
    """Validate the shipped table and the operator's file; RuleError naming the bad rule.
    Returns the file's digest (Classifier.digest; "" for none)."""
    return Classifier.from_file(bounce_rules).digest


def classify(code: int, enhanced: str | None, text: str | None) -> tuple[int, str]:
    """``(bounce_class, rule_name)`` for one SMTP reply (see :mod:`mta.feedback.classify`)."""
    c = _classifier
    if c is None:
        c = configure(None)
    return c.classify(code, enhanced, text)
