"""The servers under test, by the name --targets uses, and the --e2e receiver."""
from .base import Target
from .mta import MtaTarget
from .postfix import PostfixTarget
from .receiver import Receiver
from .sink import SinkTarget

TARGETS: dict[str, type[Target]] = {"mta": MtaTarget, "postfix": PostfixTarget,
                                    "sink": SinkTarget}
DEFAULT_TARGETS = ("mta", "postfix", "sink")
E2E_TARGETS = ("mta", "postfix")        # the sink is the receiver with --e2e
E2E_DEFAULT_TARGETS = ("mta", "postfix")

__all__ = ["TARGETS", "DEFAULT_TARGETS", "E2E_TARGETS", "E2E_DEFAULT_TARGETS",
           "Target", "MtaTarget", "PostfixTarget", "SinkTarget", "Receiver"]
