"""What one connection may hold, and how the broker keeps fds in reserve. Pure data and
arithmetic; the server measures, the table asks.

Theory of operation
-------------------
The broker is one process with one fd table shared by every client. Two mechanisms keep
any one client from exhausting it (and so from ending every VM):

* **Quotas** (:class:`Quotas`) bound what a single connection holds: handles, VMs,
  devices, bindings (in its VMs and devices) and memory slots. Over quota a request gets
  ``EMFILE`` (handles) or ``ENOSPC`` (everything else) and changes nothing.
* **The reserve** (:class:`FdBudget`): the broker raises its soft ``RLIMIT_NOFILE`` to the
  hard limit at start and refuses to create a new fd-holding object (eventfd, imported fd,
  connection) while fewer than ``reserve`` fds would stay free, so that accepting,
  replying, handing out dups and introspection keep working at the limit. The budget is
  an account, not a probe: the broker's fds are its fixed ones (measured at start), one
  per kernel object, one per connection and one per fd waiting in a send queue. An
  ``EMFILE`` the account did not foresee (a leak, another thread) is still answered as
  an errno to the requester -- the account only makes it rare.
"""

from __future__ import annotations

import dataclasses
import resource
from dataclasses import dataclass

from shared.errors import ConfigError

DEFAULT_FD_RESERVE = 64


@dataclass(frozen=True)
class Quotas:
    """Per-connection limits. The defaults fit a VMM with a few dozen VMs, each with a
    handful of devices, inside a default fd limit; ``vbusemu broker --quota`` changes them."""

    handles: int = 4096
    vms: int = 64
    devices: int = 512
    bindings: int = 16384
    memslots: int = 1024

    @classmethod
    def parse(cls, specs: list[str], base: Quotas | None = None) -> Quotas:
        """``["vms=8", "handles=100"]`` -> Quotas; a bad item raises :class:`ConfigError`
        naming it."""
        names = [f.name for f in dataclasses.fields(cls)]
        values: dict[str, int] = {}
        for spec in specs:
            name, sep, raw = spec.partition("=")
            if not sep or name not in names:
                raise ConfigError(
                    f"--quota {spec!r}: expected NAME=N with NAME one of {', '.join(names)}"
                )
            try:
                value = int(raw, 0)
            except ValueError:
                raise ConfigError(f"--quota {spec!r}: {raw!r} is not an integer") from None
            if value < 1:
                raise ConfigError(f"--quota {spec!r}: must be at least 1")
            values[name] = value
        return dataclasses.replace(base or cls(), **values)


class FdBudget:
    """The broker's fd account: ``limit`` (the soft RLIMIT_NOFILE), ``fixed`` fds it holds
    whatever the clients do, and the variable part the server reports through
    ``in_use``."""

    def __init__(self, limit: int, fixed: int, reserve: int = DEFAULT_FD_RESERVE) -> None:
        self.limit = limit
        self.fixed = fixed
        self.reserve = reserve
        self.variable = 0

    def free(self) -> int:
        return self.limit - self.fixed - self.variable

    def room_for(self, n: int) -> bool:
        """Whether ``n`` more long-lived fds leave the reserve intact."""
        return self.free() - n >= self.reserve


def raise_nofile_limit() -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; return the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # a hard limit above nr_open: keep what we have
            pass
    return soft
