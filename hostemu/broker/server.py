"""The broker's server loop: the only code in the broker that touches sockets.

Theory of operation
-------------------
One thread, one ``selectors`` (epoll) loop watching: the listening socket, every client
socket, and a stop eventfd written by the SIGINT/SIGTERM handler. Each readable client
yields whole SOCK_SEQPACKET frames; each frame is decoded (:mod:`shared.wire`) and handed
to the pure :class:`~hostemu.broker.table.ObjectTable`, whose returned actions are
carried out here. Nothing blocks: sends are non-blocking and queue per client; a client
whose queue grows past a bound (it stopped reading) is dropped, never waited for.

Trust boundary
--------------
* A peer is authorized at accept time by ``SO_PEERCRED`` uid (the broker's own uid by
  default) before a single byte or fd is exchanged.
* A frame that does not decode (truncated, oversize, wrong fd count, ...) gets an
  ``EPROTO`` error reply when its header is readable, then the connection is closed;
  every fd that came with it is closed by the codec.
* A well-formed request whose text the table would forward in a message with a larger
  fixed part (:data:`~shared.wire.RELAYED_TEXT`), where it no longer fits, is refused
  with ``EMSGSIZE`` before the table sees it: the broker never builds a frame it cannot
  encode.
* After every request the loop closes whatever fds the table did not take -- before it
  sends the reply, so a client that counts the broker's fds after an error sees them gone.

Exhaustion
----------
The broker never dies of a full fd table (:mod:`hostemu.broker.limits`): it raises its
soft ``RLIMIT_NOFILE`` at start, keeps an fd account (:class:`FdBudget`) that the table
asks before creating a long-lived fd, and answers a failed syscall with its errno to the
one requester. ``accept`` at the limit uses a spare fd to take the connection, tell it
``ENFILE`` and close it, then stops watching the listener until an fd is freed -- so the
loop is idle, not spinning, while it cannot accept. A send that fails for lack of kernel
memory or in-flight fd room (``ENOBUFS``, ``ENOMEM``, ``ETOOMANYREFS``) turns a reply into
an errno reply with its fds closed; a notice that cannot be delivered drops the client
(it would otherwise miss state), as a client that stops reading is dropped.

Filesystem
----------
The socket lives in a private directory (0700, owned by us, not a symlink); the socket
itself is 0600. An existing path is replaced only if it is a *stale* socket (nobody
accepts on it); anything else -- a live broker, a regular file, a symlink -- is refused.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import selectors
import signal
import socket
import stat
import struct
import time
from collections import deque
from dataclasses import dataclass, field
from types import FrameType

from hostemu.broker.limits import DEFAULT_FD_RESERVE, FdBudget, Quotas, raise_nofile_limit
from hostemu.broker.table import Action, Disconnect, ObjectTable, OpenChannel, Send
from shared import wire
from shared.errors import ConfigError, PeerGoneError, ProtocolError
from shared.fds import OwnedFd, close_all, new_eventfd, recv_with_fds, send_with_fds
from shared.lifeline import catch_sigint
from shared.wire import Policy

log = logging.getLogger("vbusemu.broker")

MAX_QUEUED_FRAMES = 4096
MAX_QUEUED_FDS = 1024  # fds waiting in one client's send queue before it counts as stalled
# sendmsg errors that mean "no room in the kernel for this frame now", not "peer gone"
_NO_ROOM = frozenset({errno.ENOBUFS, errno.ENOMEM, errno.ETOOMANYREFS})
SEND_STALL_LIMIT = 5.0  # seconds a client may leave replies unread before it is dropped
MAX_FRAMES_PER_PASS = 64  # fairness: one busy client cannot starve the others
_UCRED = struct.Struct("3i")


def default_socket_path() -> str:
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/vbusemu-{os.getuid()}"
    return (
        os.path.join(base, "vbusemu", "broker.sock")
        if "XDG_RUNTIME_DIR" in os.environ
        else os.path.join(base, "broker.sock")
    )


def prepare_socket_path(path: str) -> bool:
    """Make the private directory and clear a stale socket. Returns True if we made the dir.

    Raises :class:`ConfigError` for anything unsafe: a directory that is a symlink, not
    ours, or open to others; a path that is not a socket; a socket a live broker serves.
    """
    directory = os.path.dirname(os.path.abspath(path))
    created = False
    try:
        os.mkdir(directory, 0o700)
        created = True
    except FileExistsError:
        pass
    st = os.lstat(directory)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{directory} is not a directory (symlinks are refused)")
    if st.st_uid != os.getuid():
        raise ConfigError(f"{directory} belongs to uid {st.st_uid}, not to us")
    if st.st_mode & 0o077:
        raise ConfigError(
            f"{directory} is accessible to others (mode {st.st_mode & 0o777:o}); it must be 0700"
        )
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return created
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # stale: the broker that made it is gone
        return created
    except OSError as e:
        raise ConfigError(f"{path}: cannot tell whether it is stale: {e}") from e
    finally:
        probe.close()
    raise ConfigError(f"a broker is already listening on {path}")


@dataclass(eq=False)
class Client:
    id: int
    sock: socket.socket
    pid: int
    uid: int
    outq: deque[tuple[bytes, list[OwnedFd]]] = field(default_factory=deque)
    queued_fds: int = 0
    writing: bool = False
    stalled_since: float | None = None  # when its socket buffer first refused a frame


class BrokerServer:
    """Owns the listening socket, client sockets and the stop eventfd."""

    def __init__(
        self,
        path: str,
        policy: Policy = Policy.HUP,
        *,
        allowed_uids: frozenset[int] | None = None,
        ack_timeout: float = 2.0,
        quotas: Quotas | None = None,
        fd_reserve: int = DEFAULT_FD_RESERVE,
    ) -> None:
        self.path = os.path.abspath(path)
        self.policy = policy
        self.allowed_uids = allowed_uids if allowed_uids is not None else frozenset({os.getuid()})
        self.table = ObjectTable(
            policy,
            ack_timeout=ack_timeout,
            quotas=quotas,
            process_info=self._info,
            fd_room=self._fd_room,
        )
        self.budget = FdBudget(raise_nofile_limit(), fixed=0, reserve=fd_reserve)
        self.stop_fd = new_eventfd()
        self._sel = selectors.DefaultSelector()
        # One fd kept open to be closed when accept() hits the limit: it makes room to take
        # the waiting connection and refuse it (else the listener stays readable: a spin).
        self._spare = _open_spare()
        self._listening_paused = False
        self._clients: dict[int, Client] = {}
        self._next_id = 1
        self._listener: socket.socket | None = None
        self._made_dir = False
        self._listen_ino = -1
        self.state = "new"  # new -> listening -> stopping -> stopped

    # ------------------------------------------------------------------ life cycle

    def listen(self) -> None:
        self._made_dir = prepare_socket_path(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        old = os.umask(0o177)  # the socket is born 0600: no window with a wider mode
        try:
            sock.bind(self.path)
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        self._listen_ino = os.lstat(self.path).st_ino
        sock.listen(128)
        sock.setblocking(False)
        self._listener = sock
        self._sel.register(sock, selectors.EVENT_READ, "listen")
        self._sel.register(self.stop_fd.fileno(), selectors.EVENT_READ, "stop")
        self.budget.fixed = _count_open_fds() or self.budget.fixed
        self.state = "listening"

    def install_signal_handlers(self) -> None:
        def on_signal(signum: int, frame: FrameType | None) -> None:
            if not self.stop_fd.closed:  # a late signal after the stop changes nothing
                os.eventfd_write(self.stop_fd.fd, 1)

        catch_sigint(on_signal)  # unless ignored: a launched broker leaves Ctrl-C to its parent
        signal.signal(signal.SIGTERM, on_signal)

    def request_stop(self) -> None:
        if not self.stop_fd.closed:
            os.eventfd_write(self.stop_fd.fd, 1)

    def serve_forever(self) -> None:
        while self.state == "listening":
            self.run_once(None)
        self.close()

    def run_once(self, timeout: float | None) -> None:
        deadline = self.table.next_deadline()
        stalls = [
            c.stalled_since + SEND_STALL_LIMIT
            for c in self._clients.values()
            if c.stalled_since is not None
        ]
        if stalls:
            deadline = min([*stalls, *([deadline] if deadline is not None else [])])
        if deadline is not None:
            left = max(0.0, deadline - time.monotonic())
            timeout = left if timeout is None else min(timeout, left)
        for key, events in self._sel.select(timeout):
            if key.data == "stop":
                self.state = "stopping"
                return
            if key.data == "listen":
                self._accept()
                continue
            client = self._clients.get(key.data)
            if client is None:
                continue
            if events & selectors.EVENT_WRITE:
                self._flush(client)
            if events & selectors.EVENT_READ and client.id in self._clients:
                self._read(client)
        now = time.monotonic()
        for client in list(self._clients.values()):
            if client.stalled_since is not None and now - client.stalled_since > SEND_STALL_LIMIT:
                self._drop(client.id, f"stopped reading for {SEND_STALL_LIMIT:.0f} s")
        self._apply(self.table.expire())
        if self._listening_paused:
            self._resume_listening()

    def close(self) -> None:
        """Graceful stop: every client sees EOF, every object's fd is closed."""
        if self.state == "stopped":
            return
        self.state = "stopping"
        # Every client sees EOF ("the broker is gone"), not a teardown of its objects:
        # hang up on all of them first, then release the table without sending anything.
        clients = list(self._clients.values())
        self._clients.clear()
        for client in clients:
            self._sel.unregister(client.sock)
            client.sock.close()
            while client.outq:
                close_all(client.outq.popleft()[1])
        for client in clients:
            for action in self.table.disconnect(client.id):
                if isinstance(action, Send):
                    action.msg.close_fds()
        if self._listener is not None:
            self._sel.unregister(self._listener)
            self._listener.close()
            self._listener = None
            with contextlib.suppress(OSError):
                if os.lstat(self.path).st_ino == self._listen_ino:
                    os.unlink(self.path)
            if self._made_dir:
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.dirname(self.path))
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(self.stop_fd.fileno())
        self._sel.close()
        self.stop_fd.close()
        if self._spare is not None:
            self._spare.close()
        self.state = "stopped"

    def _info(self) -> dict[str, object]:
        self._account()
        return {
            "pid": os.getpid(),
            "open_fds": _count_open_fds(),
            "fd_limit": self.budget.limit,
            "fd_reserve": self.budget.reserve,
            "fds_free": self.budget.free(),
            "socket": self.path,
            "clients": len(self._clients),
        }

    # ------------------------------------------------------------------ fd budget

    def _account(self) -> None:
        # The limit is read again: someone may have changed it (prlimit) under us.
        self.budget.limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.budget.variable = (
            len(self.table.objects)
            + len(self._clients)
            + sum(c.queued_fds for c in self._clients.values())
        )

    def _fd_room(self, n: int) -> bool:
        self._account()
        return self.budget.room_for(n)

    def _pause_listening(self, why: str) -> None:
        assert self._listener is not None
        if not self._listening_paused:
            log.warning("not accepting connections until an fd is freed: %s", why)
            self._sel.unregister(self._listener)
            self._listening_paused = True

    def _resume_listening(self) -> None:
        """After a pass that may have freed fds: get the spare back, then listen again."""
        if self._spare is None:
            self._spare = _open_spare()
        self._account()
        if (
            self._spare is not None
            and self._listener is not None
            and self.budget.free() > self.budget.reserve // 2
        ):
            self._sel.register(self._listener, selectors.EVENT_READ, "listen")
            self._listening_paused = False
            log.warning("accepting connections again")

    # ------------------------------------------------------------------ connections

    def _register(self, sock: socket.socket, pid: int, uid: int) -> Client:
        sock.setblocking(False)
        client = Client(self._next_id, sock, pid, uid)
        self._next_id += 1
        self._clients[client.id] = client
        self._sel.register(sock, selectors.EVENT_READ, client.id)
        return client

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and friends: refuse the waiting one, then idle
                self._refuse_at_limit(e)
                return
            self._account()
            if self.budget.free() < self.budget.reserve // 2:
                # Half the reserve is for connections (ps, a VMM closing things); past
                # that a new connection would eat what replies and dups need.
                _tell_and_close(sock, errno.ENFILE, "the broker is short of fds")
                self._pause_listening(f"{self.budget.free()} fds free")
                return
            try:
                pid, uid, _gid = _UCRED.unpack(
                    sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
                )
            except OSError:  # gone already
                sock.close()
                continue
            if uid not in self.allowed_uids:
                log.warning("refused pid %d: uid %d is not authorized", pid, uid)
                sock.close()
                continue
            client = self._register(sock, pid, uid)
            log.debug("client %d connected (pid %d, uid %d)", client.id, pid, uid)
            self._apply(self.table.connect(client.id, pid=pid, uid=uid))

    def _refuse_at_limit(self, e: OSError) -> None:
        """accept() failed for lack of fds: spend the spare on taking the connection that
        waits (telling it why), then stop watching the listener until fds are freed."""
        assert self._listener is not None
        if e.errno in (errno.EMFILE, errno.ENFILE) and self._spare is not None:
            self._spare.close()
            self._spare = None
            with contextlib.suppress(OSError):
                sock, _ = self._listener.accept()
                _tell_and_close(sock, e.errno, f"the broker is out of fds: {e.strerror}")
            self._spare = _open_spare()
        self._pause_listening(f"accept: {e}")

    def _drop(self, cid: int, reason: str) -> None:
        client = self._clients.pop(cid, None)
        if client is None:
            return
        log.debug("client %d dropped: %s", cid, reason)
        self._sel.unregister(client.sock)
        client.sock.close()
        while client.outq:
            close_all(client.outq.popleft()[1])
        client.queued_fds = 0
        self._apply(self.table.disconnect(cid))

    def _read(self, client: Client) -> None:
        for _ in range(MAX_FRAMES_PER_PASS):
            try:
                got = recv_with_fds(client.sock, wire.MAX_FRAME)
            except (BlockingIOError, InterruptedError):
                return
            except PeerGoneError:
                self._drop(client.id, "connection reset")
                return
            except ProtocolError as e:
                self._reject(client, b"", str(e))
                return
            if got is None:
                self._drop(client.id, "EOF")
                return
            data, fds = got
            try:
                msg = wire.decode(data, fds)
            except ProtocolError as e:
                self._reject(client, data, str(e))
                return
            actions: list[Action] = []
            try:
                if msg.KIND is not wire.Kind.REQUEST:
                    self._reject(client, data, f"{type(msg).__name__} is not a request")
                    return
                too_long = wire.relay_overflow(msg)
                if too_long is not None:  # well-formed, but its notice could not be sent
                    actions = [
                        Send(
                            client.id, wire.Error(seq=msg.seq, errno=errno.EMSGSIZE, text=too_long)
                        )
                    ]
                else:
                    actions = self.table.handle(client.id, msg)
            finally:
                msg.close_fds()  # whatever the table did not take: before any reply goes
            self._apply(actions)
            if client.id not in self._clients:
                return

    def _reject(self, client: Client, data: bytes, why: str) -> None:
        """The peer broke the protocol: say why (if we can), then drop it."""
        log.warning("client %d (pid %d) broke the protocol: %s", client.id, client.pid, why)
        header = wire.peek_header(data)
        seq = header.seq if header is not None else 0
        self._queue(client, wire.Error(seq=seq, errno=errno.EPROTO, text=why))
        self._drop(client.id, why)

    # ------------------------------------------------------------------ actions

    def _apply(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Send):
                client = self._clients.get(action.conn)
                if client is None:
                    action.msg.close_fds()
                else:
                    self._queue(client, action.msg)
            elif isinstance(action, Disconnect):
                self._drop(action.conn, action.reason)
            elif isinstance(action, OpenChannel):
                self._open_channel(action)

    def _open_channel(self, action: OpenChannel) -> None:
        requester = self._clients.get(action.requester)
        if requester is None:
            return
        if not self._fd_room(2):
            self._queue(
                requester,
                wire.Error(
                    seq=action.seq,
                    errno=errno.ENFILE,
                    text="ChannelOpen: the broker is short of fds",
                ),
            )
            return
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError as e:
            self._queue(
                requester,
                wire.Error(seq=action.seq, errno=e.errno or errno.EMFILE, text=f"socketpair: {e}"),
            )
            return
        client = self._register(ours, os.getpid(), os.getuid())
        self._apply(
            self.table.channel_opened(
                action.requester,
                action.seq,
                client.id,
                client.pid,
                client.uid,
                action.scope,
                action.target,
            )
        )
        self._queue(requester, wire.FdReply(seq=action.seq, fds=(OwnedFd(theirs.detach()),)))

    def _queue(self, client: Client, msg: wire.Message) -> None:
        """Queue a frame; ``msg.fds`` now belong to the queue (closed once sent)."""
        data, _ = wire.encode(msg)
        client.outq.append((data, list(msg.fds)))
        client.queued_fds += len(msg.fds)
        if len(client.outq) > MAX_QUEUED_FRAMES or client.queued_fds > MAX_QUEUED_FDS:
            self._drop(client.id, "stopped reading (send queue full)")
            return
        self._flush(client)

    def _flush(self, client: Client) -> None:
        while client.outq:
            data, fds = client.outq[0]
            try:
                send_with_fds(client.sock, data, [f.fileno() for f in fds], nonblocking=True)
            except BlockingIOError:
                break
            except (PeerGoneError, ProtocolError) as e:
                self._drop(client.id, f"send failed: {e}")
                return
            except OSError as e:
                if e.errno in _NO_ROOM and self._replace_with_error(client, e):
                    continue
                self._drop(client.id, f"send failed: {e}")
                return
            client.outq.popleft()
            client.queued_fds -= len(fds)
            close_all(fds)
        want = bool(client.outq)
        if not want:
            client.stalled_since = None
        elif client.stalled_since is None:
            client.stalled_since = time.monotonic()
        if want != client.writing:
            client.writing = want
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0)
            self._sel.modify(client.sock, events, client.id)

    def _replace_with_error(self, client: Client, e: OSError) -> bool:
        """The head frame could not be sent for lack of kernel room. A reply becomes an
        errno reply (its fds closed); anything else cannot be replaced: False."""
        data, fds = client.outq[0]
        header = wire.peek_header(data)
        if header is None or not header.flags & wire.FLAG_REPLY or not fds:
            return False
        error, _ = wire.encode(
            wire.Error(
                seq=header.seq,
                errno=e.errno or errno.ENOBUFS,
                text=f"reply not sendable: {e.strerror}",
            )
        )
        client.outq[0] = (error, [])
        client.queued_fds -= len(fds)
        close_all(fds)
        return True


def _open_spare() -> OwnedFd | None:
    try:
        return OwnedFd(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
    except OSError:
        return None


def _count_open_fds() -> int | None:
    """This process's open fds, or None when even that cannot be read (at the limit)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # minus the directory's own fd
    except OSError:
        return None


def _tell_and_close(sock: socket.socket, err: int, why: str) -> None:
    """Best effort: one errno frame to a connection we will not serve, then close it."""
    with contextlib.suppress(OSError):
        data, _ = wire.encode(wire.Error(seq=0, errno=err, text=why))
        sock.send(data, socket.MSG_DONTWAIT)
    sock.close()


def run_broker(
    path: str,
    policy: Policy,
    *,
    ready_fd: int = -1,
    ack_timeout: float = 2.0,
    quotas: Quotas | None = None,
    fd_reserve: int = DEFAULT_FD_RESERVE,
) -> int:
    """Process main for ``vbusemu broker``: listen, announce, serve until SIGINT/SIGTERM."""
    server = BrokerServer(
        path, policy, ack_timeout=ack_timeout, quotas=quotas, fd_reserve=fd_reserve
    )
    server.install_signal_handlers()
    try:
        server.listen()
    except (ConfigError, OSError) as e:
        log.error("cannot start: %s", e)
        server.close()
        return 2
    print(
        f"vbusemu broker: listening on {server.path} (policy={policy.name.lower()}, "
        f"pid={os.getpid()})",
        flush=True,
    )
    if ready_fd >= 0:
        with OwnedFd(ready_fd) as fd:
            os.write(fd.fd, b"ready\n")
    try:
        server.serve_forever()
    finally:
        server.close()
    log.info("stopped")
    return 0
