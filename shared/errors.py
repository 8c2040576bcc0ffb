"""The one exception hierarchy of vbusemu.

Every error raised by vbusemu code derives from :class:`VbusError`. The subclasses say
*whose fault* it is, because that decides what happens next:

* :class:`UsageError` -- this process misused the API (closed fd, wrong state, bad
  argument). Nothing was sent; fix the caller.
* :class:`ProtocolError` -- the peer broke the wire protocol (corrupt frame, wrong fd
  count, truncated ancillary data). The connection is no longer trustworthy: the
  receiver closes every fd that came with the message and drops the connection.
* :class:`PeerGoneError` -- the other end went away (EOF, ECONNRESET, timeout on a
  required acknowledgement). Treat exactly like a leave: release what it held.
* :class:`BrokerError` -- the broker refused a well-formed request with an errno
  (``EINVAL``, ``EBADF``, ``EBUSY`` ...). Nothing changed on the broker; the connection
  stays usable.
* :class:`MemoryAccessError` -- a guest-physical address range is not backed by guest
  memory (or overflows). The access did not happen.
* :class:`ConfigError` -- user-supplied configuration is invalid; nothing was started.
"""

from __future__ import annotations

import errno as _errno
import os


class VbusError(Exception):
    """Root of every vbusemu error."""


class UsageError(VbusError):
    """This process used the API wrongly; nothing was sent or changed."""


class ProtocolError(VbusError):
    """The peer broke the protocol; the connection must be dropped."""


class PeerGoneError(VbusError):
    """The peer closed, crashed or stopped answering; treat it as a leave."""


class MemoryAccessError(VbusError):
    """A guest-physical range is outside guest memory or overflows."""


class ConfigError(VbusError):
    """User configuration is invalid; nothing was started."""


class BrokerError(VbusError):
    """The broker refused a request with an errno; its state is unchanged.

    ``errno`` is the numeric value (Linux numbering) and ``name`` its symbolic name
    (``"EBUSY"``), so callers can match on either.
    """

    def __init__(self, errno: int, message: str) -> None:
        self.errno = errno
        self.name = errno_name(errno)
        self.message = message
        super().__init__(f"{self.name}: {message}")

    @classmethod
    def named(cls, name: str, message: str) -> BrokerError:
        """Build an error from a symbolic errno name such as ``"EINVAL"``."""
        return cls(errno_value(name), message)


def errno_name(value: int) -> str:
    """Symbolic name of an errno value, ``"E?<n>"`` if unknown."""
    return _errno.errorcode.get(value, f"E?{value}")


def errno_value(name: str) -> int:
    """Numeric value of a symbolic errno name; raises :class:`UsageError` if unknown."""
    value = getattr(_errno, name, None)
    if not isinstance(value, int):
        raise UsageError(f"unknown errno name {name!r}")
    return value


def describe_errno(value: int) -> str:
    """``"EBUSY (Device or resource busy)"`` -- for log lines."""
    return f"{errno_name(value)} ({os.strerror(value)})"
