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
* After every request the loop closes whatever fds the table did not take.

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
import selectors
import signal
import socket
import stat
import struct
import time
from collections import deque
from dataclasses import dataclass, field
from types import FrameType

from hostemu.broker.table import Action, Disconnect, ObjectTable, OpenChannel, Send
from shared import wire
from shared.errors import ConfigError, PeerGoneError, ProtocolError
from shared.fds import OwnedFd, close_all, new_eventfd, recv_with_fds, send_with_fds
from shared.lifeline import catch_sigint
from shared.wire import Policy

log = logging.getLogger("vbusemu.broker")

MAX_QUEUED_FRAMES = 4096
SEND_STALL_LIMIT = 5.0  # seconds a client may leave replies unread before it is dropped
MAX_FRAMES_PER_PASS = 64  # fairness: one busy client cannot starve the others
_UCRED = struct.Struct("3i")


def default_socket_path() -> str:
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/vbusemu-{os.getuid()}"
    return os.path.join(base, "vbusemu", "broker.sock") if "XDG_RUNTIME_DIR" in os.environ \
        else os.path.join(base, "broker.sock")


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
        raise ConfigError(f"{directory} is accessible to others (mode {st.st_mode & 0o777:o}); "
                          "it must be 0700")
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
    writing: bool = False
    stalled_since: float | None = None  # when its socket buffer first refused a frame


class BrokerServer:
    """Owns the listening socket, client sockets and the stop eventfd."""

    def __init__(self, path: str, policy: Policy = Policy.HUP, *,
                 allowed_uids: frozenset[int] | None = None,
                 ack_timeout: float = 2.0) -> None:
        self.path = os.path.abspath(path)
        self.policy = policy
        self.allowed_uids = allowed_uids if allowed_uids is not None else frozenset({os.getuid()})
        self.table = ObjectTable(policy, ack_timeout=ack_timeout, process_info=self._info)
        self.stop_fd = new_eventfd()
        self._sel = selectors.DefaultSelector()
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
        stalls = [c.stalled_since + SEND_STALL_LIMIT for c in self._clients.values()
                  if c.stalled_since is not None]
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
            if client.stalled_since is not None and now - client.stalled_since > \
                    SEND_STALL_LIMIT:
                self._drop(client.id, f"stopped reading for {SEND_STALL_LIMIT:.0f} s")
        self._apply(self.table.expire())

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
        self.state = "stopped"

    def _info(self) -> dict[str, object]:
        return {"pid": os.getpid(), "open_fds": len(os.listdir("/proc/self/fd")),
                "socket": self.path, "clients": len(self._clients)}

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
            except OSError as e:  # EMFILE and friends: keep serving the others
                log.warning("accept failed: %s", e)
                return
            pid, uid, _gid = _UCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
            if uid not in self.allowed_uids:
                log.warning("refused pid %d: uid %d is not authorized", pid, uid)
                sock.close()
                continue
            client = self._register(sock, pid, uid)
            log.debug("client %d connected (pid %d, uid %d)", client.id, pid, uid)
            self._apply(self.table.connect(client.id, pid=pid, uid=uid))

    def _drop(self, cid: int, reason: str) -> None:
        client = self._clients.pop(cid, None)
        if client is None:
            return
        log.debug("client %d dropped: %s", cid, reason)
        self._sel.unregister(client.sock)
        client.sock.close()
        while client.outq:
            close_all(client.outq.popleft()[1])
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
            try:
                if msg.KIND is not wire.Kind.REQUEST:
                    self._reject(client, data, f"{type(msg).__name__} is not a request")
                    return
                too_long = wire.relay_overflow(msg)
                if too_long is not None:  # well-formed, but its notice could not be sent
                    self._queue(client, wire.Error(seq=msg.seq, errno=errno.EMSGSIZE,
                                                   text=too_long))
                else:
                    self._apply(self.table.handle(client.id, msg))
            finally:
                msg.close_fds()  # whatever the table did not take
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
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError as e:
            self._queue(requester, wire.Error(seq=action.seq, errno=e.errno or errno.EMFILE,
                                              text=f"socketpair: {e}"))
            return
        client = self._register(ours, os.getpid(), os.getuid())
        self._apply(self.table.channel_opened(action.requester, action.seq, client.id,
                                              client.pid, client.uid, action.scope,
                                              action.target))
        self._queue(requester, wire.FdReply(seq=action.seq, fds=(OwnedFd(theirs.detach()),)))

    def _queue(self, client: Client, msg: wire.Message) -> None:
        """Queue a frame; ``msg.fds`` now belong to the queue (closed once sent)."""
        data, _ = wire.encode(msg)
        client.outq.append((data, list(msg.fds)))
        if len(client.outq) > MAX_QUEUED_FRAMES:
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
            except (PeerGoneError, OSError) as e:
                self._drop(client.id, f"send failed: {e}")
                return
            client.outq.popleft()
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


def run_broker(path: str, policy: Policy, *, ready_fd: int = -1,
               ack_timeout: float = 2.0) -> int:
    """Process main for ``vbusemu broker``: listen, announce, serve until SIGINT/SIGTERM."""
    server = BrokerServer(path, policy, ack_timeout=ack_timeout)
    server.install_signal_handlers()
    try:
        server.listen()
    except (ConfigError, OSError) as e:
        log.error("cannot start: %s", e)
        server.close()
        return 2
    print(f"vbusemu broker: listening on {server.path} (policy={policy.name.lower()}, "
          f"pid={os.getpid()})", flush=True)
    if ready_fd >= 0:
        with OwnedFd(ready_fd) as fd:
            os.write(fd.fd, b"ready\n")
    try:
        server.serve_forever()
    finally:
        server.close()
    log.info("stopped")
    return 0

