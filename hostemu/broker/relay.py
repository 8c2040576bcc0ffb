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
* A requester has at most one token of a kind in :data:`ONE_IN_FLIGHT` open at a time
  (:meth:`RelayTable.in_flight`): a vCPU is blocked in ``KVM_RUN`` until its exit is
  answered, so it cannot have a second one. The mark goes with the token -- answered,
  failed, timed out -- or when the requester leaves.
"""

from __future__ import annotations

import itertools

from hostemu.broker.objects import Forward

ONE_IN_FLIGHT = frozenset({"ioexit"})
"""Kinds a requester may have only one of open at a time (the caller refuses a second)."""


class RelayTable:
    def __init__(self) -> None:
        self._tokens = itertools.count(1)
        self.pending: dict[int, Forward] = {}
        self._single: dict[tuple[int, str], int] = {}  # (requester, kind) -> open token

    def in_flight(self, requester: int, kind: str) -> Forward | None:
        """The open token of a :data:`ONE_IN_FLIGHT` ``kind`` ``requester`` has, if any."""
        token = self._single.get((requester, kind))
        return None if token is None else self.pending.get(token)

    def open(self, kind: str, requester: int, seq: int, responder: int, deadline: float) -> Forward:
        if kind in ONE_IN_FLIGHT and (requester, kind) in self._single:
            raise ValueError(f"connection {requester} already has a {kind} in flight")
        fwd = Forward(next(self._tokens), kind, requester, seq, responder, deadline)
        self.pending[fwd.token] = fwd
        if kind in ONE_IN_FLIGHT:
            self._single[(requester, kind)] = fwd.token
        return fwd

    def _close(self, fwd: Forward) -> Forward:
        del self.pending[fwd.token]
        if fwd.requester is not None and self._single.get((fwd.requester, fwd.kind)) == fwd.token:
            del self._single[(fwd.requester, fwd.kind)]
        return fwd

    def answer(self, token: int, responder: int, kind: str) -> Forward | None:
        """The forward ``responder`` answers, or None if it is not theirs to answer."""
        fwd = self.pending.get(token)
        if fwd is None or fwd.responder != responder or fwd.kind != kind:
            return None
        return self._close(fwd)

    def requester_gone(self, conn: int) -> None:
        for fwd in self.pending.values():
            if fwd.requester == conn:
                self._single.pop((conn, fwd.kind), None)
                fwd.requester = None

    def responder_gone(self, conn: int) -> list[Forward]:
        return [self._close(f) for f in list(self.pending.values()) if f.responder == conn]

    def expired(self, now: float) -> list[Forward]:
        return [self._close(f) for f in list(self.pending.values()) if f.deadline <= now]

    def next_deadline(self) -> float | None:
        return min((f.deadline for f in self.pending.values()), default=None)
