"""One run per store: a lease record in the store, renewed by a heartbeat, taken over when stale.

A run (``sscflow run``, ``ingest``, ``demo``) holds the lease of its store while it writes. The
lease is a small JSON record, ``STORE/lease/holder.json`` (inside a zarr group ``lease``, so plain
zarr listings of the store stay clean), naming the holder::

    {"host": "node-3", "pid": 4242, "pid_started": 1764608523.1, "started": 1764608524.0,
     "heartbeat": 1764608584.0, "timeout_s": 120.0, "token": "<uuid4 hex>",
     "command": "sscflow run configs/cohort.yaml"}

- **Acquire**: create the record only if there is none (on a folder: under an exclusive
  ``flock`` of ``lease/.lock``, test that the record is absent, then write it to a temporary file
  renamed into place; on S3: a write with ``If-None-Match: *``). When one exists, the run stops
  at once with :class:`~sscflow.errors.LeaseHeldError` naming the holder and since when, having
  written nothing; with ``wait`` it polls until the lease is free.
- **Heartbeat**: a thread of the holder rewrites ``heartbeat`` every ``timeout_s / 4`` seconds,
  as a compare-and-swap (the same record it read: under the ``flock`` on a folder, ``If-Match``
  on the ETag on S3), so it never overwrites a run that took the lease over.
- **Stale**: a record whose heartbeat is older than its ``timeout_s`` (a killed client, a lost
  pod), or whose process is gone from this very host (SIGKILL, then a rerun at once), is taken
  over by the next run, which says so. The takeover is the same compare-and-swap: of two runs
  racing to take a stale lease over, one wins. "This host" is ``socket.gethostname()`` (with
  the process's start time, so a reused pid is not mistaken for the holder): containers that
  share a host name but not a process namespace need their own names (Kubernetes pods have).
- **Lost**: a heartbeat that finds the record taken over sets :attr:`Lease.lost`; a run
  (``sscflow.flow.pipeline.run``) then stops at the next task boundary and writes nothing more, and
  each of its tasks checks :func:`taken_by` before it writes, so a task that starts after the
  takeover writes nothing either.
- **Release**: the holder deletes its record on exit (not someone else's).

Read-only commands (``status``, ``report``, ``predict``, ``export``) take no lease.

Other fsspec URLs than ``s3://`` (``gs://``, ``memory://``) get the same record, but their
create and compare-and-swap are a read then a write, not atomic: two runs starting within the
same fraction of a second could both win.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from sscflow.core.store import is_url, storage_options
from sscflow.errors import LeaseHeldError

__all__ = ["Holder", "Lease", "hold", "read_holder", "taken_by", "TIMEOUT_S"]

log = logging.getLogger(__name__)

GROUP = "lease"
RECORD = "holder.json"
TIMEOUT_S = 120.0  # a lease whose heartbeat is older than this is stale
_GROUP_META = json.dumps({"zarr_format": 3, "node_type": "group",
                          "attributes": {"sscflow": {"kind": "lease", "record": RECORD}}})


@dataclass(frozen=True)
class Holder:
    """Who holds a store's lease (times are seconds since the epoch, UTC)."""

    host: str
    pid: int
    pid_started: float
    started: float
    heartbeat: float
    timeout_s: float
    token: str
    command: str = ""

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Holder:
        d = json.loads(data.decode())
        return cls(str(d["host"]), int(d["pid"]), float(d.get("pid_started", 0.0)),
                   float(d["started"]), float(d["heartbeat"]), float(d["timeout_s"]),
                   str(d["token"]), str(d.get("command", "")))  # fmt: skip

    def describe(self, now: float | None = None) -> str:
        """``'sscflow run x.yaml' on host h, process 12, since 2026-12-01 17:02:03 UTC (last
        heartbeat 4 s ago)'``"""
        age = (time.time() if now is None else now) - self.heartbeat
        what = f"{self.command!r}" if self.command else "a run"
        return (f"{what} on host {self.host}, process {self.pid}, since {_utc(self.started)} "
                f"(last heartbeat {max(age, 0.0):.0f} s ago)")  # fmt: skip

    def stale_reason(self, now: float | None = None) -> str | None:
        """Why this lease may be taken over, or None while its holder looks alive."""
        age = (time.time() if now is None else now) - self.heartbeat
        if age > self.timeout_s:
            return (f"its last heartbeat was {age:.0f} s ago, more than its "
                    f"{self.timeout_s:g} s timeout")  # fmt: skip
        if self.host == socket.gethostname() and not _alive(self.pid, self.pid_started):
            return f"its process {self.pid} on this host has exited"
        return None


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _alive(pid: int, started: float) -> bool:
    """Whether process ``pid`` of this host runs and is the one that started at ``started``."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return not started or abs(proc.create_time() - started) < 2.0
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


# --- where the record lives: a folder (flock, then a temporary file renamed into place) or an
# object store (conditional writes)


class _Folder:
    """The record in a local folder; every operation runs under an ``flock`` of ``.lock``."""

    def __init__(self, store: str):
        self.dir = Path(store) / GROUP
        self.path = self.dir / RECORD

    @contextlib.contextmanager
    def _locked(self):
        import fcntl

        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "zarr.json"
        if not meta.exists():
            meta.write_text(_GROUP_META, encoding="utf-8")
        with open(self.dir / ".lock", "a", encoding="utf-8") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def read(self) -> tuple[bytes | None, object]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None, None
        return data, data

    def _write(self, data: bytes) -> None:
        tmp = self.path.with_name(f".{RECORD}.{os.getpid()}.partial")
        tmp.write_bytes(data)
        os.replace(tmp, self.path)  # atomic: a reader sees the old record or the new one

    def create(self, data: bytes) -> bool:
        with self._locked():
            if self.path.exists():
                return False
            self._write(data)
            return True

    def replace(self, data: bytes, tag) -> bool:
        with self._locked():
            current, _ = self.read()
            if current != tag:
                return False
            self._write(data)
            return True

    def delete(self, tag) -> bool:
        with self._locked():
            current, _ = self.read()
            if current != tag:
                return False
            self.path.unlink()
            return True


class _Remote:
    """The record in an object store (any fsspec URL); atomic on S3 (conditional writes)."""

    def __init__(self, store: str):
        from fsspec.core import url_to_fs

        self.fs, root = url_to_fs(store, **storage_options(store))
        self.dir = f"{root.rstrip('/')}/{GROUP}"
        self.path = f"{self.dir}/{RECORD}"
        self.s3 = str(store).split("://", 1)[0] in ("s3", "s3a")

    def read(self) -> tuple[bytes | None, object]:
        try:
            if self.s3:
                info = self.fs.info(self.path)
                data = self.fs.cat_file(self.path)
                return data, info.get("ETag")  # an older ETag than data only fails the swap
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None, None
        return data, data

    def create(self, data: bytes) -> bool:
        meta = f"{self.dir}/zarr.json"
        if not self.fs.exists(meta):
            self.fs.pipe_file(meta, _GROUP_META.encode())
        if not self.s3:
            if self.fs.exists(self.path):
                return False
            self.fs.pipe_file(self.path, data)
            return True
        try:
            self.fs.pipe_file(self.path, data, mode="create")  # If-None-Match: *
        except (FileExistsError, OSError) as exc:
            if _precondition(exc):
                return False
            raise
        return True

    def replace(self, data: bytes, tag) -> bool:
        if not self.s3:
            current, _ = self.read()
            if current != tag:
                return False
            self.fs.pipe_file(self.path, data)
            return True
        try:
            self.fs.pipe_file(self.path, data, IfMatch=tag)
        except (FileNotFoundError, OSError) as exc:
            if isinstance(exc, FileNotFoundError) or _precondition(exc):
                return False
            raise
        return True

    def delete(self, tag) -> bool:
        current, now_tag = self.read()
        if current is None or now_tag != tag:
            return False
        self.fs.rm_file(self.path)
        return True


def _precondition(exc: BaseException) -> bool:
    """Whether an S3 error is a failed conditional write (412, or 409 for a racing write)."""
    if isinstance(exc, FileExistsError):
        return True
    text = f"{exc} {exc.__cause__ or ''}"
    return any(s in text for s in ("PreconditionFailed", "412", "ConditionalRequestConflict",
                                   "409"))  # fmt: skip


def _backend(store):
    return _Remote(str(store)) if is_url(store) else _Folder(str(store))


def read_holder(store) -> Holder | None:
    """The holder of ``store``'s lease, or None when it is free (for ``sscflow status``)."""
    try:
        data, _ = _backend(store).read()
    except OSError:
        return None
    if data is None:
        return None
    try:
        return Holder.from_bytes(data)
    except (ValueError, KeyError, TypeError):
        return None


def taken_by(store, token: str) -> str | None:
    """None while the lease of ``store`` is still the one with ``token``; otherwise who holds it
    now (a sentence), "no run" when nobody does. One read of the record."""
    try:
        data, _ = _backend(store).read()
    except OSError as exc:  # the record cannot be read: not a reason to think it lost
        log.warning("could not read the lease of store %s: %s", store, exc)
        return None
    if data is None:
        return "no run (the lease record was removed)"
    try:
        holder = Holder.from_bytes(data)
    except (ValueError, KeyError, TypeError):
        return "a run whose record is unreadable"
    return None if holder.token == token else holder.describe()


# --- the lease


class Lease:
    """The lease of one store, for one run. Use :func:`hold` (a context manager).

    Parameters
    ----------
    store : path or URL of the cohort store
    timeout_s : how long after its last heartbeat this lease counts as stale (recorded in it)
    command : what holds it, for the message another run prints (``sscflow run x.yaml``)
    heartbeat_s : seconds between heartbeats; ``timeout_s / 4`` when None
    """

    def __init__(self, store, *, timeout_s: float = TIMEOUT_S, command: str = "",
                 heartbeat_s: float | None = None):  # fmt: skip
        if timeout_s <= 0:
            raise ValueError(f"lease: timeout_s must be > 0, got {timeout_s}")
        self.store = str(store)
        self.timeout_s = float(timeout_s)
        self.heartbeat_s = float(heartbeat_s) if heartbeat_s else self.timeout_s / 4
        self.command = command
        self.token = uuid.uuid4().hex
        self.lost = False
        self._checked = 0.0
        self._backend = _backend(store)
        self._holder: Holder | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mutex = threading.Lock()

    def _record(self, started: float | None = None) -> Holder:
        import psutil

        now = time.time()
        return Holder(socket.gethostname(), os.getpid(), psutil.Process().create_time(),
                      started or now, now, self.timeout_s, self.token,
                      self.command)  # fmt: skip

    def acquire(self, *, wait: bool = False, poll_s: float = 2.0,
                on_message: Callable[[str], None] | None = None) -> Lease:  # fmt: skip
        """Take the lease (see the module docstring), then start the heartbeat.

        Raises LeaseHeldError naming the holder when another live run holds it and ``wait`` is
        False. ``on_message`` gets one line when waiting starts and when a stale lease is taken
        over (also logged).
        """
        say = on_message or log.warning
        waited = False
        while True:
            data, tag = self._backend.read()
            mine = self._record()
            if data is None:
                if self._backend.create(mine.to_bytes()):
                    break
                continue  # another run created it between the read and the create
            try:
                holder = Holder.from_bytes(data)
                stale = holder.stale_reason()
            except (ValueError, KeyError, TypeError):
                holder, stale = None, "its record is unreadable"
            if holder is not None and holder.token == self.token:
                break
            if stale is not None:
                if self._backend.replace(mine.to_bytes(), tag):
                    who = holder.describe() if holder else "a run whose record is unreadable"
                    say(f"took over the lease of store {self.store} from {who}: {stale}")
                    break
                continue
            if not wait:
                raise LeaseHeldError(
                    f"store {self.store} is in use by another run: {holder.describe()}; wait "
                    "for it with --wait, or rerun when it has finished (a run that died loses "
                    f"its lease {holder.timeout_s:g} s after its last heartbeat)"
                )
            if not waited:
                say(f"waiting for the lease of store {self.store}, held by {holder.describe()}")
                waited = True
            time.sleep(poll_s)
        self._holder = mine
        self._thread = threading.Thread(target=self._beat, name="sscflow-lease", daemon=True)
        self._thread.start()
        return self

    def renew(self) -> bool:
        """One heartbeat: rewrite the record with the time now, if it is still ours."""
        with self._mutex:
            if self._holder is None or self.lost:
                return False
            data, tag = self._backend.read()
            try:
                ours = data is not None and Holder.from_bytes(data).token == self.token
            except (ValueError, KeyError, TypeError):
                ours = False
            new = self._record(self._holder.started)
            if ours and self._backend.replace(new.to_bytes(), tag):
                self._holder = new
                return True
            self.lost = True
            log.error("lost the lease of store %s: another run took it over; this run stops "
                      "at its next task boundary", self.store)  # fmt: skip
            return False

    def new_holder(self) -> str | None:
        """Who took this lease over (a sentence), or None while it is still this run's."""
        return taken_by(self.store, self.token)

    def check(self, every_s: float = 1.0) -> bool:
        """Whether the lease is still this run's: :attr:`lost` as the heartbeat left it, and,
        at most once every ``every_s`` seconds, one read of the record (so a takeover is seen
        within about a second, not only at the next heartbeat). Sets :attr:`lost`."""
        now = time.monotonic()
        if not self.lost and now - self._checked >= every_s:
            self._checked = now
            if taken_by(self.store, self.token) is not None:
                self.lost = True
        return not self.lost

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if not self.renew():
                    return
            except OSError as exc:  # a transient storage error: try again at the next beat
                log.warning("lease heartbeat of store %s failed: %s", self.store, exc)

    def release(self) -> None:
        """Stop the heartbeat and delete the record if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._mutex:
            if self._holder is None:
                return
            try:
                data, tag = self._backend.read()
                if data is not None and Holder.from_bytes(data).token == self.token:
                    self._backend.delete(tag)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("could not release the lease of store %s: %s", self.store, exc)
            self._holder = None

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def hold(store, *, wait: bool = False, timeout_s: float = TIMEOUT_S, command: str = "",
         on_message: Callable[[str], None] | None = None, poll_s: float = 2.0):  # fmt: skip
    """``with hold(store): ...``: the lease of ``store`` for the block (see :class:`Lease`)."""
    lease = Lease(store, timeout_s=timeout_s, command=command)
    lease.acquire(wait=wait, poll_s=poll_s, on_message=on_message)
    try:
        yield lease
    finally:
        lease.release()
