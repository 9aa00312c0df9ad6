"""The servers under test, by the name --targets uses, and the --e2e receiver."""
from .base import Target
from .mta import MtaBaseTarget, MtaTarget
from .postfix import PostfixTarget
from .receiver import Receiver
from .sink import SinkTarget

TARGETS: dict[str, type[Target]] = {"mta": MtaTarget, "mta-base": MtaBaseTarget,
                                    "postfix": PostfixTarget, "sink": SinkTarget}
DEFAULT_TARGETS = ("mta", "postfix", "sink")
E2E_TARGETS = ("mta", "mta-base", "postfix")        # the sink is the receiver with --e2e
E2E_DEFAULT_TARGETS = ("mta", "postfix")
BASE_TARGET = "mta-base"    # only with --mta-base REV

__all__ = ["TARGETS", "DEFAULT_TARGETS", "E2E_TARGETS", "E2E_DEFAULT_TARGETS", "BASE_TARGET",
           "Target", "MtaTarget", "MtaBaseTarget", "PostfixTarget", "SinkTarget", "Receiver"]
