"""The decision log's local spool: records that JetStream did not acknowledge, kept on disk.

Layout: ``<spool dir>/slot-<k>/seg-<n>.spool``, append-only segment files. Each orchestrator
process claims one slot (an exclusive ``flock`` on ``slot-<k>/lock``, the first free ``k``), so
several processes can share one spool dir; on start a process also adopts the segments of any
slot no live process holds (a process that died, or a deployment that now runs fewer), and so
replays what an earlier run left behind.

A segment is a sequence of frames, each ``<u32 body length><u32 crc32 of body>`` then the body
``<u16 subject length><subject><u16 msg-id length><msg id><record bytes>`` (little-endian). The
CRC finds a frame torn by a crash in the middle of a write: reading stops there, and what
follows in that segment is counted as lost (``corrupt``). Frames are written with one
``write`` per batch and not fsynced: they survive the process dying, not the machine losing
power.

Replay reads frames from the oldest segment on; :meth:`DecisionSpool.commit` deletes a segment
once every frame of it was acknowledged. A crash between publishing and deleting replays that
segment again: JetStream's deduplication by message id makes that harmless within its window.

The spool is bounded by ``max_bytes`` (all of this slot's segment files): a batch that would pass
it is refused and :meth:`DecisionSpool.append` returns how many records it could not keep, for
the caller to count as dropped.
"""

from __future__ import annotations

import fcntl
import logging
import re
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Final, NamedTuple

__all__ = [
    "DecisionSpool",
    "SpoolReadResult",
    "SpooledRecord",
    "encode_frame",
    "parse_frames",
]

logger = logging.getLogger(__name__)

_HEADER: Final = struct.Struct("<II")
_LEN16: Final = struct.Struct("<H")
_SEGMENT: Final = re.compile(r"seg-(\d{12})\.spool")
_SLOT: Final = re.compile(r"slot-(\d+)")
_MAX_SLOTS: Final = 1024


class SpooledRecord(NamedTuple):
    """One record waiting for JetStream: where it goes, its dedup id and its bytes."""

    subject: str
    msg_id: str | None
    payload: bytes


def encode_frame(record: SpooledRecord) -> bytes:
    """One frame of a segment file (see the module docstring)."""
    subject = record.subject.encode()
    msg_id = (record.msg_id or "").encode()
    body = b"".join(
        (_LEN16.pack(len(subject)), subject, _LEN16.pack(len(msg_id)), msg_id, record.payload)
    )
    return _HEADER.pack(len(body), zlib.crc32(body)) + body


@dataclass(frozen=True, slots=True)
class SpoolReadResult:
    """What :func:`parse_frames` found: whole records, the bytes they took, and whether a torn
    or corrupt frame stopped the reading (``incomplete`` alone: the data just ended mid-frame)."""

    records: list[SpooledRecord]
    consumed: int
    corrupt: bool
    incomplete: bool


def parse_frames(data: bytes | memoryview, limit: int | None = None) -> SpoolReadResult:
    """Parse up to ``limit`` whole frames from the start of ``data``."""
    view = memoryview(data)
    records: list[SpooledRecord] = []
    pos = 0
    while limit is None or len(records) < limit:
        if len(view) - pos < _HEADER.size:
            return SpoolReadResult(records, pos, False, pos != len(view))
        length, crc = _HEADER.unpack_from(view, pos)
        start = pos + _HEADER.size
        if len(view) - start < length:
            return SpoolReadResult(records, pos, False, True)
        body = view[start : start + length]
        if zlib.crc32(body) != crc:
            return SpoolReadResult(records, pos, True, False)
        try:
            (subject_len,) = _LEN16.unpack_from(body, 0)
            subject = bytes(body[2 : 2 + subject_len]).decode()
            at = 2 + subject_len
            (id_len,) = _LEN16.unpack_from(body, at)
            msg_id = bytes(body[at + 2 : at + 2 + id_len]).decode()
            payload = bytes(body[at + 2 + id_len :])
        except (struct.error, UnicodeDecodeError):
            return SpoolReadResult(records, pos, True, False)
        records.append(SpooledRecord(subject, msg_id or None, payload))
        pos = start + length
    return SpoolReadResult(records, pos, False, False)


def _segment_seq(path: Path) -> int | None:
    match = _SEGMENT.fullmatch(path.name)
    return int(match[1]) if match else None


class DecisionSpool:
    """This process's slot of the spool: append batches, read them back in order, delete what
    was replayed. Not thread-safe; one owner (the decision log's background task)."""

    def __init__(self, root: Path, *, max_bytes: int, segment_bytes: int) -> None:
        self.root = root
        self._max_bytes = max_bytes
        self._segment_bytes = segment_bytes
        self.slot_dir: Path | None = None
        self._lock: IO[bytes] | None = None
        self._segments: list[Path] = []  # oldest first; the last one may be open for appends
        self._sizes: dict[Path, int] = {}
        self._active: IO[bytes] | None = None
        self._next_seq = 0
        self._read_segment = 0  # index into _segments of the segment being replayed
        self._read_offset = 0
        self.corrupt_records = 0
        """Frames found torn or corrupt (whole rest of their segment): lost, count them."""

    # --- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> DecisionSpool:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def open(self) -> None:
        """Claim a slot, adopt orphaned slots' segments, index what is on disk."""
        self.root.mkdir(parents=True, exist_ok=True)
        for k in range(_MAX_SLOTS):
            slot = self.root / f"slot-{k}"
            lock = self._try_lock(slot)
            if lock is not None:
                self.slot_dir, self._lock = slot, lock
                break
        else:
            raise OSError(f"no free spool slot under {self.root} (all {_MAX_SLOTS} are locked)")
        own = sorted(
            (p for p in self.slot_dir.iterdir() if _segment_seq(p) is not None),
            key=lambda p: _segment_seq(p) or 0,
        )
        self._next_seq = (_segment_seq(own[-1]) or 0) + 1 if own else 0
        self._segments = own
        for other in sorted(self.root.iterdir()):
            if other != self.slot_dir and _SLOT.fullmatch(other.name) and other.is_dir():
                self._adopt(other)
        self._sizes = {p: p.stat().st_size for p in self._segments}
        if self._segments:
            logger.warning(
                "decision spool %s holds %d bytes in %d segments from an earlier run: replaying",
                self.slot_dir,
                self.size_bytes,
                len(self._segments),
            )

    def close(self) -> None:
        """Close the active segment and release the slot (segments stay for the next run)."""
        if self._active is not None:
            self._active.close()
            self._active = None
        if self._lock is not None:
            self._lock.close()  # closing the descriptor releases the flock
            self._lock = None

    @staticmethod
    def _try_lock(slot: Path) -> IO[bytes] | None:
        slot.mkdir(exist_ok=True)
        fh = (slot / "lock").open("ab")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            return None
        return fh

    def _adopt(self, other: Path) -> None:
        lock = self._try_lock(other)
        if lock is None:
            return  # a live process owns it
        assert self.slot_dir is not None
        try:
            orphans = sorted(
                (p for p in other.iterdir() if _segment_seq(p) is not None),
                key=lambda p: _segment_seq(p) or 0,
            )
            for path in orphans:
                target = self.slot_dir / f"seg-{self._next_seq:012d}.spool"
                self._next_seq += 1
                path.rename(target)
                self._segments.append(target)
            if orphans:
                logger.warning("adopted %d spool segments of %s", len(orphans), other.name)
        finally:
            lock.close()

    # --- state ----------------------------------------------------------------------------------

    @property
    def size_bytes(self) -> int:
        """Bytes of this slot's segment files (replayed frames count until their segment goes)."""
        return sum(self._sizes.values())

    @property
    def empty(self) -> bool:
        """True when nothing is left to replay."""
        if not self._segments:
            return True
        last = len(self._segments) - 1
        return self._read_segment == last and self._read_offset >= self._sizes[self._segments[last]]

    # --- writing --------------------------------------------------------------------------------

    def append(self, records: Sequence[SpooledRecord]) -> int:
        """Append ``records`` (one write); returns how many did not fit under ``max_bytes``.

        Records are kept in order up to the bound and the rest refused: the spool keeps the
        oldest records rather than the newest (the stream then has no hole in the middle)."""
        frames: list[bytes] = []
        room = self._max_bytes - self.size_bytes
        for record in records:
            frame = encode_frame(record)
            if len(frame) > room:
                break
            frames.append(frame)
            room -= len(frame)
        if frames:
            data = b"".join(frames)
            active = self._active_segment()
            active.write(data)
            active.flush()  # to the OS now: a process that dies keeps what it spooled
            path = self._segments[-1]
            self._sizes[path] += len(data)
            if self._sizes[path] >= self._segment_bytes:
                self._rotate()
        return len(records) - len(frames)

    def _active_segment(self) -> IO[bytes]:
        if self._active is None:
            assert self.slot_dir is not None
            path = self.slot_dir / f"seg-{self._next_seq:012d}.spool"
            self._next_seq += 1
            self._active = path.open("ab")
            self._segments.append(path)
            self._sizes[path] = 0
        return self._active

    def _rotate(self) -> None:
        if self._active is not None:
            self._active.close()
            self._active = None

    # --- replaying ------------------------------------------------------------------------------

    def read(self, limit: int) -> tuple[list[SpooledRecord], tuple[int, int]]:
        """Up to ``limit`` records from the replay position on (within one segment), and the
        position after them, to pass to :meth:`commit` once they are all acknowledged."""
        while self._read_segment < len(self._segments):
            path = self._segments[self._read_segment]
            size = self._sizes[path]
            if self._read_offset < size:
                with path.open("rb") as fh:
                    fh.seek(self._read_offset)
                    data = fh.read(size - self._read_offset)
                result = parse_frames(data, limit)
                if result.records:
                    return result.records, (self._read_segment, self._read_offset + result.consumed)
                if result.corrupt or (result.incomplete and path is not self._active_path()):
                    # Frame boundaries past a bad frame are unknown: at least one record is lost.
                    self.corrupt_records += 1
                    logger.error(
                        "decision spool segment %s is corrupt at byte %d: its last %d bytes "
                        "(one record or more) are lost",
                        path.name,
                        self._read_offset,
                        size - self._read_offset,
                    )
                    self._read_offset = size
                    continue
                return [], (self._read_segment, self._read_offset)
            if self._read_segment == len(self._segments) - 1:
                break
            self._read_segment += 1
            self._read_offset = 0
            self._drop_replayed()
        return [], (self._read_segment, self._read_offset)

    def commit(self, position: tuple[int, int]) -> None:
        """Everything before ``position`` (from :meth:`read`) is acknowledged: move past it and
        delete the segments it finished."""
        self._read_segment, self._read_offset = position
        path = self._segments[self._read_segment]
        if self._read_offset >= self._sizes[path] and path is not self._active_path():
            self._read_segment += 1
            self._read_offset = 0
        self._drop_replayed()
        if self.empty and self._segments:
            # All replayed, the active one included: start afresh so its bytes stop counting.
            self._rotate()
            self._delete(self._segments[-1])
            self._segments = []
            self._read_segment = self._read_offset = 0

    def _active_path(self) -> Path | None:
        return self._segments[-1] if self._active is not None and self._segments else None

    def _drop_replayed(self) -> None:
        while self._read_segment > 0:
            self._delete(self._segments.pop(0))
            self._read_segment -= 1

    def _delete(self, path: Path) -> None:
        self._sizes.pop(path, None)
        path.unlink(missing_ok=True)
