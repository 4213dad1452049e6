"""Which broker of a primary/backup pair is active: the ZeroMQ Guide's Binary Star, as a pure state machine.

Both brokers publish their state and epoch to each other every heartbeat interval over the HA link (PUB/SUB). A
broker starts as ``PRIMARY`` or ``BACKUP`` (waiting to hear its peer) and settles as ``ACTIVE`` (serving) or
``PASSIVE`` (answering every client and worker "not active, try the other"). The rules:

* A passive broker takes over only when its peer has been silent for ``liveness`` intervals (or its HA link closed
  when the peer's process died) *and* a client or worker asks it for service: the *vote*. A broken link between the
  brokers alone never makes a second active broker: clients and workers that still reach the active broker do not
  vote for the other.
* A starting broker serves nobody until it has heard its peer or waited out the same silence: a restarted primary
  that finds the backup active comes back passive (failing back is an operator's decision, README "A broker pair").
* Every takeover starts a new *epoch*, above any epoch either broker has announced (odd for the primary, even for the
  backup, so that no two takeovers ever share one). Clients and workers
  follow the broker of the highest epoch they have seen; two actives (after a partition heals, or a frozen broker
  that wakes) resolve to the one of the higher epoch (the primary on a tie), two passives to the primary.

Events come with the monotonic time; each returns True when the broker's state changed (to log and publish at once).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import Enum

log = logging.getLogger(__name__)


class Role(Enum):
    PRIMARY = "primary"
    BACKUP = "backup"


class PairState(Enum):
    PRIMARY = "primary"  # starting as the primary: waiting to hear the peer
    BACKUP = "backup"  # starting as the backup: waiting to hear the peer
    ACTIVE = "active"
    PASSIVE = "passive"


@dataclass(slots=True)
class PairCore:
    role: Role
    now: float
    heartbeat_interval: float = 2.5
    liveness: int = 3
    state: PairState = PairState.PRIMARY
    epoch: int = 0  # of the last takeover either broker announced
    peer_state: PairState | None = None  # as the peer last announced it
    peer_expires: float = 0.0  # the peer counts as dead once silent until then
    next_publish: float = 0.0
    peer_link_closed: bool = False  # the HA link to the peer dropped since it last spoke

    def __post_init__(self) -> None:
        self.state = PairState.PRIMARY if self.role is Role.PRIMARY else PairState.BACKUP
        self.peer_expires = self.now + self.ttl  # a starting broker waits to hear its peer this long

    @property
    def ttl(self) -> float:
        return self.heartbeat_interval * self.liveness

    @property
    def active(self) -> bool:
        return self.state is PairState.ACTIVE

    # ------------------------------------------------------------------------------------------ events

    def on_peer(self, state: PairState, epoch: int, now: float) -> bool:
        """The peer announced its state and epoch over the HA link."""
        self.now = now
        before, mine, previous = self.state, self.epoch, self.peer_state
        self.peer_state, self.peer_expires, self.peer_link_closed = state, now + self.ttl, False
        self.epoch = max(self.epoch, epoch)
        if state is PairState.ACTIVE:
            wins = self.active and (mine > epoch or mine == epoch and self.role is Role.PRIMARY)
            if not wins:
                if self.active:
                    log.error("two active brokers (epochs %d and %d): this one steps down", mine, epoch)
                self.state = PairState.PASSIVE
        elif state is PairState.PASSIVE:
            if self.state is PairState.PRIMARY:
                self._take_over("the backup is up and passive")
            elif self.state is PairState.PASSIVE and self.role is Role.PRIMARY:
                log.error("two passive brokers: the primary takes over")
                self._take_over("both brokers were passive")
        elif self.state is PairState.PASSIVE:
            if previous is PairState.ACTIVE:  # it served, and now it is starting: it restarted, and lost all of it
                self._take_over("the peer restarted")
        elif self.state.value == state.value:
            log.error("both brokers of the pair are configured as %s: give one --ha backup", state.value)
        elif self.state is PairState.PRIMARY:
            self._take_over("the backup is up")
        elif self.state is PairState.BACKUP:
            self.state = PairState.PASSIVE  # the primary takes over when it hears a passive backup
        if self.state is PairState.PASSIVE and before is not PairState.PASSIVE:
            log.info("this broker (%s) is passive: the peer is %s, epoch %d", self.role.value, state.value, self.epoch)
        return self.state is not before

    def on_peer_gone(self, now: float) -> None:
        """The HA link to the peer dropped (its process died, or it missed the link's heartbeats): it is dead now."""
        self.now = now
        self.peer_expires, self.peer_link_closed = min(self.peer_expires, now), True

    def on_vote(self, now: float) -> bool:
        """A client or worker asks for service; True if this broker serves it (it may take over now)."""
        self.now = now
        if not self.active and now >= self.peer_expires:
            # The link drops when the peer's process dies, or when it misses its link's heartbeats (a frozen or cut off
            # peer): either way it is gone.
            gone = "its HA link dropped" if self.peer_link_closed else f"it has been silent for {self.ttl:g} s"
            self._take_over(f"the peer is gone ({gone}) and a client or worker asked")
        return self.active

    def tick(self, now: float) -> bool:
        """True when it is time to publish our state to the peer."""
        self.now = now
        if now >= self.next_publish:
            self.next_publish = now + self.heartbeat_interval
            return True
        return False

    def next_wakeup(self) -> float:
        return self.next_publish

    # ------------------------------------------------------------------------------------------ rules

    def _take_over(self, why: str) -> None:
        # The next epoch of this broker's parity (odd: primary, even: backup): two brokers that take over on each side
        # of a partition never share an epoch, so whoever sees both can tell them apart.
        self.epoch += 1 if self.epoch % 2 != (self.role is Role.PRIMARY) else 2
        self.state = PairState.ACTIVE
        self.next_publish = self.now  # tell the peer at once
        log.warning("this broker (%s) is active, epoch %d: %s", self.role.value, self.epoch, why)
