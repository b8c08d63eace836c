"""The controller addresses a heartbeat client uses in turn: ``Rotation``.

A worker may be given several controllers (replicas of one logical controller, or
stand-ins for one another). It talks to one at a time; when that one cannot be reached it
moves on to the next, round robin, wrapping, and stays there while it answers. No I/O, no
clock; standard library only.
"""

from __future__ import annotations

import logging

from .tokens import redact_urls

__all__ = ["Rotation"]

log = logging.getLogger(__name__)


class Rotation:
    """Which of ``addresses`` is in use, and the move to the next when it cannot be reached.

    ``move_on`` tells its caller whether some address of the round is still untried (try
    it at once) or every one has failed in turn since a controller last answered (back
    off); ``answered`` starts a new round.
    """

    def __init__(self, addresses: tuple[str, ...]) -> None:
        if not addresses:
            raise ValueError("a rotation needs at least one controller address")
        self.addresses = addresses
        self._at = 0
        #: addresses found unreachable in a row since a controller last answered
        self._unreachable_in_a_row = 0
        #: how many times the client moved on to the next address
        self.switches = 0

    @property
    def address(self) -> str:
        """The controller in use: the one the next call goes to."""
        return self.addresses[self._at]

    @property
    def where(self) -> str:
        """The controller in use as logs show it: credentials in its URL redacted."""
        return redact_urls(self.address)

    @property
    def several(self) -> bool:
        """Whether there is another controller to move on to."""
        return len(self.addresses) > 1

    def move_on(self, reason: str, *, quiet: bool) -> bool:
        """The controller in use could not be reached (``reason``): use the next one.

        Logs the move at WARNING, naming both, unless ``quiet`` (the client already said
        that no controller answers). Returns ``True`` while some address has not failed
        since a controller last answered, ``False`` once every one has, in turn.
        """
        old = self.where
        self._at = (self._at + 1) % len(self.addresses)
        self.switches += 1
        self._unreachable_in_a_row += 1
        untried = self._unreachable_in_a_row < len(self.addresses)
        if not untried:
            self._unreachable_in_a_row = 0
        elif quiet:
            log.debug("Controller %s still unreachable (%s); trying %s", old, reason, self.where)
        else:
            log.warning(
                "Cannot reach controller %s (%s): moving to controller %s", old, reason, self.where
            )
        return untried

    def answered(self) -> None:
        """A controller answered: the next failure starts a new round."""
        self._unreachable_in_a_row = 0
