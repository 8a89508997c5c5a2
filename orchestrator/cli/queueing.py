"""Commands of the worker queue's side: ``baton worker`` and ``baton batch requeue``
(``baton run --queue`` submits, in running.py)."""

from __future__ import annotations

import sys

import click

from orchestrator.cli.app import cli
from orchestrator.cli.signals import _run, _until_stopped


@cli.command()
@click.option(
    "--queue",
    "queue_url",
    required=True,
    envvar="BATON_QUEUE_URL",
    metavar="URL",
    help="The queue baton run --queue and the service (BATON_QUEUE_URL) submit to:"
    " redis://HOST:PORT/DB.",
)
@click.option(
    "-c",
    "--concurrency",
    default=4,
    show_default=True,
    type=click.IntRange(1, 1000),
    help="Jobs (runs) at once.",
)
@click.option(
    "--drain-timeout",
    default=30.0,
    show_default=True,
    type=click.FloatRange(0),
    help="Seconds a stopped worker gives its jobs to finish before handing them back.",
)
@click.option(
    "--claim-after",
    default=30.0,
    show_default=True,
    type=click.FloatRange(0.1),
    help="Seconds after which a job its worker stopped touching is claimed by another.",
)
@click.option(
    "--max-deliveries",
    default=3,
    show_default=True,
    type=click.IntRange(1),
    help="Handed out more often than this, a job ends its run as failed.",
)
def worker(
    queue_url: str,
    concurrency: int,
    drain_timeout: float,
    claim_after: float,
    max_deliveries: int,
) -> None:
    """Run the jobs of baton run --queue and of the service's runs (BATON_QUEUE_URL), each
    run's events in the one event store (BATON_DATABASE_URL). Start it in the root of the
    same checkout. SIGTERM or SIGINT: no new jobs, those in flight finish (up to
    --drain-timeout), then it exits."""
    import logging

    from events.secrets import RedactingFormatter
    from events.settings import Settings
    from orchestrator.worker import WorkerOptions, work

    # every line, a traceback's too, through the redaction of the runs' own events
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter("%(asctime)s %(name)s: %(message)s"))
    logging.basicConfig(handlers=[handler])
    logging.getLogger("baton").setLevel(logging.INFO)
    options = WorkerOptions(concurrency, drain_timeout, claim_after, max_deliveries)
    settings = Settings.from_env()
    _run(_until_stopped(lambda stop: work(queue_url, settings, options, stop)))


@cli.group()
def batch() -> None:
    """Batches on a queue (baton run --queue)."""


@batch.command("requeue")
@click.argument("batch_id")
@click.option(
    "--queue", "queue_url", required=True, metavar="URL", help="The queue: redis://HOST:PORT/DB."
)
def requeue_batch(batch_id: str, queue_url: str) -> None:
    """Queue the runs of BATCH_ID that have not ended again, from the event log alone:
    after Redis lost the jobs and the submitter is gone. Workers resume each run from its
    events; follow it with baton report --batch BATCH_ID."""
    from events import open_store
    from events.secrets import Cipher, load_key
    from events.settings import Settings, mask_dsn
    from orchestrator.queue import JobQueue
    from orchestrator.submit import requeue

    async def go() -> tuple[int, int]:
        settings = Settings.from_env()
        cipher = Cipher(load_key(settings.secret_key, settings.home))
        queue = JobQueue(queue_url)
        store = await open_store(settings)
        try:
            return await requeue(store, queue, cipher, batch_id)
        finally:
            await store.aclose()
            await queue.aclose()

    queued, ended = _run(go())
    click.echo(
        f"batch {batch_id}: {queued} runs queued again on {mask_dsn(queue_url)} ({ended} had ended)"
    )
