"""Requests the broker relays to another process and answers only when it has answered.

Two things travel this way: a guest's I/O exit (guest -> broker -> VMM -> broker -> guest,
like KVM_EXIT_MMIO answered by the next KVM_RUN) and a VMM's device configuration
(VMM -> broker -> device process -> broker -> VMM, like vhost-user's reply-ack). Pure
bookkeeping: tokens, who waits, who must answer, and until when.

Invariants
----------
* Every token is answered exactly once: by its responder, by the responder leaving
  (``EPIPE``), or by the deadline passing (``ETIMEDOUT``) -- whichever comes first.
* A token is only accepted from the connection it was relayed to, so a process cannot
  answer (or guess) another process's exits.
* If the requester leaves first the token stays until answered, with no one to reply to.
"""

from __future__ import annotations

import itertools

from hostemu.broker.objects import Forward


class RelayTable:
    def __init__(self) -> None:
        self._tokens = itertools.count(1)
        self.pending: dict[int, Forward] = {}

    def open(self, kind: str, requester: int, seq: int, responder: int,
             deadline: float) -> Forward:
        fwd = Forward(next(self._tokens), kind, requester, seq, responder, deadline)
        self.pending[fwd.token] = fwd
        return fwd

    def answer(self, token: int, responder: int, kind: str) -> Forward | None:
        """The forward ``responder`` answers, or None if it is not theirs to answer."""
        fwd = self.pending.get(token)
        if fwd is None or fwd.responder != responder or fwd.kind != kind:
            return None
        return self.pending.pop(token)

    def requester_gone(self, conn: int) -> None:
        for fwd in self.pending.values():
            if fwd.requester == conn:
                fwd.requester = None

    def responder_gone(self, conn: int) -> list[Forward]:
        gone = [f for f in self.pending.values() if f.responder == conn]
        for f in gone:
            del self.pending[f.token]
        return gone

    def expired(self, now: float) -> list[Forward]:
        late = [f for f in self.pending.values() if f.deadline <= now]
        for f in late:
            del self.pending[f.token]
        return late

    def next_deadline(self) -> float | None:
        return min((f.deadline for f in self.pending.values()), default=None)
