"""A VMM that assigns and deassigns irqfds until it is killed (a race test).

``python -m tests.fault.assign_child SOCKET FD WINDOW_US``: connects to the broker at
``SOCKET``, creates a VM and one eventfd, hands the test a guest channel for the VM (over
the SOCK_SEQPACKET socket ``FD``, with SCM_RIGHTS), waits for ``go``, then loops: assign
the eventfd as an irqfd, deassign it. Around each request it reports on ``FD``: ``A n``
(assign n has begun), ``R n binding`` (its reply arrived), ``D n`` (deassign n is about to
be sent), ``E n`` (its reply arrived) -- so the test knows what was in flight when it sent
SIGKILL. Between ``A n`` and sending the request it busy-waits ``WINDOW_US`` microseconds:
the stretch in which a real VMM prepares an ioctl, widened so that a kill can land before
the request leaves as well as after. It runs until it is killed.
"""

from __future__ import annotations

import itertools
import socket
import sys
import time

from shared.channel import Channel
from shared.wire import Scope


def main(argv: list[str]) -> int:
    path, fd, window = argv[0], int(argv[1]), float(argv[2]) * 1e-6
    report = socket.socket(fileno=fd)
    with Channel.connect(path) as ch:
        vm = ch.vm_create(ngsi=4)
        handle = ch.eventfd_create()
        with ch.channel_open(Scope.VM, vm) as guest_channel:
            socket.send_fds(report, [b"vm %d" % vm], [guest_channel.fileno()])
        if report.recv(16) != b"go":
            return 1
        for n in itertools.count(1):
            gsi = n % 4
            report.send(b"A %d" % n)
            end = time.perf_counter() + window
            while time.perf_counter() < end:
                pass
            binding = ch.irqfd_assign(vm, handle, gsi)
            report.send(b"R %d %d" % (n, binding))
            report.send(b"D %d" % n)
            ch.irqfd_deassign(vm, handle, gsi)
            report.send(b"E %d" % n)
    return 1  # not reached: it runs until killed


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
