"""The broker pair's state machine (broker/pair.py): every transition, the vote rule, split brain, epochs."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from qmesh.broker.pair import PairCore, PairState, Role

INTERVAL, LIVENESS = 1.0, 3
TTL = INTERVAL * LIVENESS
P, B, A, S = PairState.PRIMARY, PairState.BACKUP, PairState.ACTIVE, PairState.PASSIVE


def core(role: Role, now: float = 0.0) -> PairCore:
    return PairCore(role, now, heartbeat_interval=INTERVAL, liveness=LIVENESS)


def test_both_starting_the_primary_becomes_active_and_the_backup_passive() -> None:
    primary, backup = core(Role.PRIMARY), core(Role.BACKUP)
    assert primary.state is P and backup.state is B and not primary.active
    assert backup.on_peer(P, 0, 0.1) and backup.state is S
    assert primary.on_peer(S, 0, 0.2) and primary.state is A and primary.epoch == 1
    assert not backup.on_peer(A, 1, 0.3) and backup.state is S and backup.epoch == 1


def test_the_primary_hearing_a_starting_backup_takes_over() -> None:
    primary = core(Role.PRIMARY)
    primary.on_peer(B, 0, 0.5)
    assert primary.active and primary.epoch == 1


def test_a_starting_broker_serves_nobody_until_it_has_heard_its_peer_or_waited_out_its_silence() -> None:
    for role, first_epoch in ((Role.PRIMARY, 1), (Role.BACKUP, 2)):
        alone = core(role)
        assert not alone.on_vote(TTL - 0.1)
        assert alone.on_vote(TTL) and alone.active and alone.epoch == first_epoch


def test_a_restarted_primary_comes_back_passive_while_the_backup_is_active() -> None:
    primary = core(Role.PRIMARY, now=100.0)
    assert primary.on_peer(A, 4, 100.5) and primary.state is S and primary.epoch == 4
    assert not primary.on_vote(101.0)  # the backup serves: a client that asks here is sent there


def test_the_passive_takes_over_only_on_a_vote_after_the_peers_silence() -> None:
    backup = core(Role.BACKUP)
    backup.on_peer(A, 1, 0.0)
    assert not backup.on_vote(TTL - 0.5), "the peer is alive: no takeover"
    assert not backup.active and backup.tick(TTL + 5) is True
    assert not backup.active, "silence alone (a broken HA link) never makes it active"
    assert backup.on_vote(TTL + 5) and backup.active and backup.epoch == 2


def test_a_closed_ha_link_counts_as_a_dead_peer_at_once() -> None:
    backup = core(Role.BACKUP)
    backup.on_peer(A, 1, 0.0)
    backup.on_peer_gone(0.5)  # the peer's process died: its socket closed
    assert backup.on_vote(0.6) and backup.epoch == 2


def test_two_actives_resolve_to_the_higher_epoch() -> None:
    stale = core(Role.PRIMARY)
    stale.on_peer(S, 0, 0.0)  # active at epoch 1, then frozen while the backup took over at epoch 2
    assert stale.on_peer(A, 2, 50.0) and stale.state is S and stale.epoch == 2
    backup = core(Role.BACKUP)
    backup.on_vote(TTL)  # a partition: each side took over
    assert backup.epoch == 2 and not backup.on_peer(A, 1, TTL + 0.1) and backup.active  # it keeps the newer epoch
    assert backup.on_peer(A, 3, TTL + 0.2) and backup.state is S


def test_two_actives_of_one_epoch_resolve_to_the_primary() -> None:
    """Only a misconfigured pair (two primaries, or two backups) can reach one epoch twice."""
    first, second = core(Role.PRIMARY), core(Role.PRIMARY)
    first.on_peer(S, 0, 0.0)
    second.on_vote(TTL)
    assert first.epoch == second.epoch == 1
    assert not first.on_peer(A, 1, TTL) and first.active  # a primary never yields a tie...
    backup = core(Role.BACKUP)
    backup.on_vote(TTL)
    assert backup.on_peer(A, 2, TTL) and backup.state is S  # ...a backup does


def test_two_passives_resolve_to_the_primary() -> None:
    primary, backup = core(Role.PRIMARY), core(Role.BACKUP)
    primary.on_peer(A, 3, 0.0)  # both passive, each believing the other active
    backup.on_peer(A, 3, 0.0)
    assert not backup.on_peer(S, 3, 1.0) and backup.state is S
    assert primary.on_peer(S, 3, 1.0) and primary.active and primary.epoch == 5  # the primary's epochs are odd


def test_a_passive_whose_peer_restarted_takes_over() -> None:
    for starting in (P, B):
        passive = core(Role.BACKUP if starting is P else Role.PRIMARY)
        passive.on_peer(A, 5, 0.0)
        assert passive.on_peer(starting, 0, 10.0) and passive.active
        assert passive.epoch == (7 if passive.role is Role.PRIMARY else 6)


def test_a_late_announcement_of_a_starting_peer_is_not_a_restart() -> None:
    backup = core(Role.BACKUP)
    backup.on_peer(P, 0, 0.0)  # the primary is starting: the backup waits, passive
    assert not backup.on_peer(P, 0, 0.1) and backup.state is S  # its next (or delayed) announcement, the same
    assert not backup.active


def test_it_publishes_every_interval_and_at_once_after_a_takeover() -> None:
    backup = core(Role.BACKUP)
    assert backup.tick(0.0) and not backup.tick(0.5) and backup.tick(1.0)
    backup.on_vote(TTL)
    assert backup.tick(TTL), "a takeover is announced at once"


class PairNetwork(RuleBasedStateMachine):
    """Two brokers, a link between them that may be cut, clients voting at either side, crashes, restarts.

    Whatever happens, epochs only grow, no two takeovers share an epoch (even on both sides of a partition), and once
    the link carries both ways again, one exchange leaves at most one broker active."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.brokers = {Role.PRIMARY: core(Role.PRIMARY), Role.BACKUP: core(Role.BACKUP)}
        self.link_up = True
        self.epochs = {role: 0 for role in Role}
        self.actives_at: dict[int, set[Role]] = {}

    def exchange(self) -> None:
        if not self.link_up:
            return
        for role, broker in self.brokers.items():
            peer = self.brokers[Role.BACKUP if role is Role.PRIMARY else Role.PRIMARY]
            peer.on_peer(broker.state, broker.epoch, self.now)

    @rule(seconds=st.sampled_from([0.1, 1.0, 3.0, 10.0]))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds
        self.exchange()

    @rule(role=st.sampled_from(list(Role)))
    def vote(self, role: Role) -> None:
        self.brokers[role].on_vote(self.now)

    @rule()
    def cut_link(self) -> None:
        self.link_up = False

    @rule()
    def heal_link(self) -> None:
        self.link_up = True
        self.exchange()
        self.exchange()
        assert not all(b.active for b in self.brokers.values()), "two active brokers once they hear each other"

    @rule(role=st.sampled_from(list(Role)))
    def restart(self, role: Role) -> None:
        self.brokers[role] = core(role, self.now)
        self.epochs[role] = 0

    @invariant()
    def epochs_grow_and_each_epoch_has_one_active(self) -> None:
        for role, broker in self.brokers.items():
            assert broker.epoch >= self.epochs[role]
            self.epochs[role] = broker.epoch
            if broker.active:
                self.actives_at.setdefault(broker.epoch, set()).add(role)
                assert len(self.actives_at[broker.epoch]) == 1, "two brokers took over at the same epoch"


TestPairNetwork = PairNetwork.TestCase
TestPairNetwork.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)


@pytest.mark.parametrize("role", list(Role))
def test_a_broker_alone_serves_after_waiting_out_the_silence(role: Role) -> None:
    alone = core(role)
    alone.tick(0.0)
    assert not alone.on_vote(1.0) and alone.on_vote(TTL + 1.0)
