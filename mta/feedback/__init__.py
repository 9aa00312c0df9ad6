"""The sender's feedback: what happened to a message, in SparkPost's terms.

:mod:`mta.feedback.classify` turns an SMTP reply into SparkPost's
``bounce_class`` with the name of the rule that decided, from a rules table
that is data (``bounce_rules.toml`` here, plus the operator's own file named
by ``feedback.bounce_rules``, tried first).

For callers: :func:`configure` once per process with the operator's rules
file (the spool shard does, from the validated configuration), then
:func:`classify` per reply.  Without :func:`configure` the shipped rules alone
apply.

The daemon's children never read the operator's file itself: the supervisor
keeps a copy of the bytes it validated in its run directory (:func:`keep_copy`,
named by their digest) and a child reads that one (:func:`validated_file`), so
a file saved broken, or deleted, without a reload does not stop a child the
supervisor restarts (a spool shard, an acceptor) -- it runs the rules the
supervisor last validated.
"""
from __future__ import annotations

import os

from mta.feedback.classify import (BOUNCE_CLASSES, UNDETERMINED, Classifier, RuleError,
                                   load_rules, read_rules_raw, shipped_rules)

__all__ = ["BOUNCE_CLASSES", "UNDETERMINED", "Classifier", "RuleError", "classify",
           "configure", "check", "check_raw", "copy_path", "keep_copy", "load_rules",
           "shipped_rules", "validated_file"]

# the copy of a validated operator rules file in the run directory, named by its SHA-256
COPY_PREFIX = "bounce-rules-"
COPY_SUFFIX = ".toml"

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


def check_raw(bounce_rules: str | None) -> tuple[str, bytes | None]:
    """check, and the bytes validated (None without a file): what keep_copy keeps."""
    if not bounce_rules:
        return check(None), None
    rules, digest, raw = read_rules_raw(bounce_rules)
    Classifier(rules, digest=digest)
    return digest, raw


def copy_path(run_dir: str, digest: str) -> str:
    """Where the copy of the validated rules file of SHA-256 *digest* is kept."""
    return os.path.join(run_dir, COPY_PREFIX + digest + COPY_SUFFIX)


def validated_file(run_dir: str, bounce_rules: str | None, digest: str) -> str | None:
    """The rules file a child reads for the operator's *bounce_rules* that the supervisor
    validated with SHA-256 *digest*: the supervisor's copy of it (keep_copy) when there
    is one, else *bounce_rules* itself (a supervisor that keeps no copy: an earlier
    version's, or its run directory could not take it)."""
    if bounce_rules and digest:
        copy = copy_path(run_dir, digest)
        if os.path.exists(copy):
            return copy
    return bounce_rules


def keep_copy(run_dir: str, digest: str, raw: bytes | None, keep: tuple = ()) -> None:
    """Keep the validated rules *raw* (SHA-256 *digest*) in *run_dir* for the children
    (validated_file), written atomically; the copies of other digests than *digest* and
    *keep* (the previous configuration's: a reload that fails goes back to it) are
    removed.  OSError as the write's."""
    from mta import proc

    if digest and raw is not None:
        proc.replace_file(copy_path(run_dir, digest), raw)
    wanted = {COPY_PREFIX + d + COPY_SUFFIX for d in (digest, *keep) if d}
    for name in os.listdir(run_dir):
        if name.startswith(COPY_PREFIX) and name.endswith(COPY_SUFFIX) and \
                name not in wanted:
            try:
                os.unlink(os.path.join(run_dir, name))
            except FileNotFoundError:
                pass


def classify(code: int, enhanced: str | None, text: str | None) -> tuple[int, str]:
    """``(bounce_class, rule_name)`` for one SMTP reply (see :mod:`mta.feedback.classify`)."""
    c = _classifier
    if c is None:
        c = configure(None)
    return c.classify(code, enhanced, text)
