"""The batch queue on Redis Streams: one stream of jobs, one consumer group of workers.

A job is one unit of a batch (``orchestrator.shards``), said in what a worker needs to
rebuild it from the same checkout: the flow paths and options the batch was submitted
with, the unit's key and the run id it is to record. redis-py's Streams API does the
rest: XADD submits, XREADGROUP hands a job to one worker, XACK retires it once its run's
events are stored, and a job whose worker stopped acknowledging it (killed) is claimed by
another with XAUTOCLAIM after the visibility timeout. A worker keeps the jobs it still
works on from looking idle by claiming them for itself (XCLAIM JUSTID, which leaves the
delivery count alone). A batch is cancelled with a key every worker reads before and
while it runs one of the batch's jobs; a run the service queued is a batch of one, its
batch id its run id. A service run's job is queued at most once: its XADD and a key
naming the run are one script (``submit_once``), so that any instance can see whether a
run it finds recorded was ever queued, and queue it if not, without doubling it.

This module is the one boundary where redis errors become QueueUnavailable.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from events.secrets import Cipher
from events.settings import mask_dsn, url_problem
from orchestrator.errors import InfrastructureError, UsageError
from orchestrator.execution import Options

STREAM = "baton:jobs"
GROUP = "baton-workers"
_CANCELLED = "baton:cancelled:"
_QUEUED = "baton:queued:"
BATCH_CANCELLED = "the batch was cancelled"
"""The reason of the RunCancelled of a run its batch's cancellation ended before it began."""
_CANCEL_TTL = 7 * 24 * 3600
"""How long a batch's cancellation (and a service run's queued key) is kept: longer than
any batch waits in the queue, as long as the service follows a queued run."""
_ONCE = """
if redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[2]) then
    return redis.call('XADD', KEYS[1], '*', 'job', ARGV[1])
end
return false
"""


class QueueUnavailable(InfrastructureError):
    """Redis did not answer, or answered with an error."""


class QueuedJob(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """One unit of a batch, for a worker to rebuild and run. A field left at its default is
    not written: an older worker, which rejects fields it does not know, still reads the
    jobs that do not use a field it lacks (a batch's jobs carry no ``started``)."""

    batch_id: str
    run_id: str
    unit: str
    """The unit's key (``flows/shop.yaml::login[3]``): the same on the worker's checkout."""
    paths: list[str]
    """As the submitter named them, relative to its working directory where they were;
    a worker resolves them against its own (start it in the same checkout's root)."""
    environment: str | None = None
    variables: dict[str, str] = {}
    secrets_file: str | None = None
    data_file: str | None = None
    tags: list[str] = []
    concurrency: int = 10
    """Requests in flight at once in the run."""
    service: str = ""
    """A run the service started (orchestrator.service_runs.ServiceRun, sealed): its
    ``batch_id`` is its run id (its cancellation key), it has no paths and no unit."""
    started: str = ""
    """A service run's RunStarted (msgspec JSON: no secret in it, the log keeps it in
    clear): what a worker that cannot unseal the run begins its log with, so that the run
    is its organization's and shows why it ended."""

    @classmethod
    def for_service(
        cls, run_id: str, sealed: str, concurrency: int, started: str = ""
    ) -> QueuedJob:
        return cls(
            batch_id=run_id,
            run_id=run_id,
            unit="",
            paths=[],
            concurrency=concurrency,
            service=sealed,
            started=started,
        )

    @classmethod
    def of(cls, options: Options, batch_id: str, run_id: str, unit: str) -> QueuedJob:
        return cls(
            batch_id=batch_id,
            run_id=run_id,
            unit=unit,
            paths=[_portable(path) for path in options.paths],
            environment=options.environment,
            variables=dict(options.variables),
            secrets_file=_portable(options.secrets_file) if options.secrets_file else None,
            data_file=_portable(options.data_file) if options.data_file else None,
            tags=list(options.tags),
            concurrency=options.concurrency,
        )

    def encoded(self) -> str:
        """As the stream's entry holds it."""
        return _encoder.encode(self).decode()

    def sealed(self, cipher: Cipher) -> str:
        """This job's options (not its run or unit), encrypted: ShardStarted.queued."""
        return cipher.encrypt(msgspec.json.encode(self).decode())

    @classmethod
    def unsealed(cls, token: str, cipher: Cipher) -> QueuedJob:
        return msgspec.json.decode(cipher.decrypt(token), type=cls)

    def options(self) -> Options:
        return Options(
            paths=[Path(path) for path in self.paths],
            environment=self.environment,
            variables=self.variables,
            secrets_file=Path(self.secrets_file) if self.secrets_file else None,
            data_file=Path(self.data_file) if self.data_file else None,
            tags=tuple(self.tags),
            concurrency=self.concurrency,
        )


def _portable(path: Path) -> str:
    """``path`` relative to the working directory if it is under it: what another machine's
    checkout can resolve."""
    absolute = path.absolute()
    with contextlib.suppress(ValueError):
        return absolute.relative_to(Path.cwd()).as_posix()
    return str(absolute)


class _Addressed(msgspec.Struct):
    """What a job of any version names: its run (and a service run's RunStarted), so that a
    worker which cannot read the rest (a newer Baton queued it) can still end that run with
    the reason."""

    run_id: str = ""
    started: str = ""


@dataclass(frozen=True)
class Delivery:
    id: str
    """The job's entry id in the stream."""
    job: QueuedJob | None
    """None: the entry is not a job this version of Baton can read."""
    deliveries: int
    """How many times the job was handed to a worker, this time included."""
    run_id: str = ""
    """The run the entry names, even when ``job`` is None ("" if it names none)."""
    started: str = ""
    """The RunStarted a service run's entry carries (QueuedJob.started), even when ``job``
    is None."""


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(QueuedJob)
_addressed = msgspec.json.Decoder(_Addressed)


def started_of(job: str) -> str:
    """The RunStarted (JSON) a service run's encoded job carries; "" if none."""
    return _addressed.decode(job).started


def consumer_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class JobQueue:
    """The stream and group at ``url`` (redis://HOST:PORT/DB); ``aclose`` it."""

    def __init__(self, url: str, *, stream: str = STREAM, group: str = GROUP) -> None:
        problem = url_problem(url, "Redis")
        if problem:
            raise UsageError(f"--queue {mask_dsn(url)}: {problem}")
        try:
            self._redis = Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
        except ValueError as exc:
            raise UsageError(f"--queue {mask_dsn(url)}: {exc}") from None
        self._where = mask_dsn(url)
        self.stream = stream
        self.group = group
        self._once = self._redis.register_script(_ONCE)
        self._claim_from = "0-0"
        """Where the next XAUTOCLAIM goes on scanning the pending jobs."""

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise QueueUnavailable(
                f"the queue at {self._where} does not answer: start Redis there, or give"
                " --queue (BATON_QUEUE_URL) the address of one that runs"
            ) from exc
        except RedisError as exc:
            raise QueueUnavailable(f"the queue at {self._where}: {exc}") from exc

    async def ensure_group(self) -> None:
        """The stream and its group, created if missing (a new Redis, or one restarted
        without persistence)."""
        with self._errors():
            try:
                await self._redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def submit(self, jobs: Sequence[QueuedJob]) -> list[str]:
        await self.ensure_group()
        with self._errors():
            async with self._redis.pipeline(transaction=True) as pipe:
                for job in jobs:
                    pipe.xadd(self.stream, {"job": _encoder.encode(job)})
                ids = await pipe.execute()
        return [_text(entry) for entry in ids]

    async def submit_once(self, run_id: str, job: str) -> bool:
        """Queue a service run's job (``QueuedJob.encoded``) unless it was queued before, by
        this instance or any other; True if this call queued it."""
        await self.ensure_group()
        keys = [self.stream, _QUEUED + run_id]
        with self._errors():
            entry = await self._once(keys=keys, args=[job, _CANCEL_TTL])
        return entry is not None

    async def unqueued(self, run_ids: Sequence[str]) -> list[str]:
        """Those of ``run_ids`` whose job ``submit_once`` never queued (or Redis lost it)."""
        if not run_ids:
            return []
        with self._errors():
            async with self._redis.pipeline(transaction=False) as pipe:
                for run_id in run_ids:
                    pipe.exists(_QUEUED + run_id)
                found = await pipe.execute()
        return [run_id for run_id, there in zip(run_ids, found, strict=True) if not there]

    async def take(self, consumer: str, count: int, block: float) -> list[Delivery]:
        """Up to ``count`` new jobs for ``consumer``, waiting up to ``block`` seconds."""
        with self._errors():
            try:
                found: Any = await self._redis.xreadgroup(
                    self.group, consumer, {self.stream: ">"}, count=count, block=int(block * 1000)
                )
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await self.ensure_group()  # Redis restarted empty
                return []
        return [
            _delivery(entry, fields, 1) for _, entries in found or [] for entry, fields in entries
        ]

    async def claim_stale(self, consumer: str, idle: float, count: int) -> list[Delivery]:
        """Up to ``count`` jobs some worker took and has not touched for ``idle`` seconds
        (killed, or cut off), now ``consumer``'s, with how often each was handed out."""
        with self._errors():
            try:
                answer: Any = await self._redis.xautoclaim(
                    self.stream,
                    self.group,
                    consumer,
                    int(idle * 1000),
                    self._claim_from,
                    count=count,
                )
                self._claim_from, claimed = _text(answer[0]), answer[1]
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await self.ensure_group()
                return []
            deliveries = []
            for entry, fields in claimed:
                if fields is None:  # deleted meanwhile
                    continue
                pending = await self._redis.xpending_range(
                    self.stream, self.group, min=entry, max=entry, count=1
                )
                times = int(pending[0]["times_delivered"]) if pending else 1
                deliveries.append(_delivery(entry, fields, times))
        return deliveries

    async def touch(self, consumer: str, ids: Sequence[str]) -> None:
        """Reset the idle time of jobs ``consumer`` still works on, so no one claims them."""
        if not ids:
            return
        with self._errors():
            await self._redis.xclaim(self.stream, self.group, consumer, 0, list(ids), justid=True)

    async def ack(self, entry: str) -> None:
        with self._errors():
            await self._redis.xack(self.stream, self.group, entry)

    async def cancel(self, batch_id: str) -> None:
        with self._errors():
            await self._redis.set(_CANCELLED + batch_id, b"1", ex=_CANCEL_TTL)

    async def cancelled(self, batch_id: str) -> bool:
        with self._errors():
            return bool(await self._redis.exists(_CANCELLED + batch_id))

    async def server(self) -> str:
        """The id of the Redis server process: another one after a restart."""
        with self._errors():
            info: Any = await self._redis.info("server")
        return str(info["run_id"])

    async def holds(self, entry: str) -> bool:
        """Whether the stream still holds the job ``entry`` (acknowledged or not): after a
        restart, whether Redis kept the stream (persistence) or lost it."""
        with self._errors():
            return bool(await self._redis.xrange(self.stream, entry, entry))

    async def aclose(self) -> None:
        await self._redis.aclose()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _delivery(entry: bytes | str, fields: dict[bytes, bytes], deliveries: int) -> Delivery:
    raw = fields.get(b"job", b"")
    try:
        job = _decoder.decode(raw)
    except msgspec.DecodeError:
        try:
            addressed = _addressed.decode(raw)
        except msgspec.DecodeError:
            addressed = _Addressed()
        return Delivery(_text(entry), None, deliveries, addressed.run_id, addressed.started)
    return Delivery(_text(entry), job, deliveries, job.run_id, job.started)
