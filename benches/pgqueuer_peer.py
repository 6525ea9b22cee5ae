"""pgqueuer, the peer of Cairn's task queue benchmark (reconciler/benches/queue.rs, run by benches/queue.sh).

Same work as the Cairn run it sits beside: TASKS jobs enqueued before the clock starts (its rate printed
separately), then WORKERS workers lease and complete them in batches of BATCH until none is left, against
the same PostgreSQL (a fresh database the Rust benchmark made, with the same settings). Each worker is a
process of its own with its own connection (pgqueuer's way of scaling past one Python core), running a
`QueueManager` in drain mode with `batch_size=BATCH` and an entrypoint that does nothing; a job is done
when pgqueuer has logged it complete and removed it from its queue table, which the end checks. Before
the clock starts the queue table is vacuumed and a checkpoint taken, as on the Cairn side; every table is
checked to be WAL-logged (pgqueuer's default durability), as Cairn's are.

Prints one line, `pgqueuer: N tasks in S s = R tasks/s (enqueue: E tasks/s)`, for the Rust side to read.
"""

import argparse
import asyncio
import multiprocessing as mp
import time
from datetime import timedelta

import asyncpg
from pgqueuer.db import AsyncpgDriver
from pgqueuer.models import Job
from pgqueuer.qm import QueueManager
from pgqueuer.queries import Queries
from pgqueuer.types import QueueExecutionMode

ENTRYPOINT = "bench"


async def prepare(dsn: str, tasks: int) -> float:
    conn = await asyncpg.connect(dsn)
    try:
        queries = Queries(AsyncpgDriver(conn))
        await queries.install()
        # pgqueuer's default durability ("durable"): every table logged, as Cairn's are.
        unlogged = await conn.fetchval(
            "SELECT count(*) FROM pg_class WHERE relname LIKE 'pgqueuer%' AND relpersistence <> 'p'"
        )
        assert unlogged == 0, f"{unlogged} of pgqueuer's relations are not WAL-logged"
        started = time.perf_counter()
        for first in range(0, tasks, 5_000):
            n = min(5_000, tasks - first)
            await queries.enqueue([ENTRYPOINT] * n, [None] * n, [0] * n)
        elapsed = time.perf_counter() - started
        # The same settling as the Cairn side (`settle` in reconciler/benches/queue.rs): the queue
        # table vacuumed and analysed, then a checkpoint, before the clock starts.
        await conn.execute("VACUUM (ANALYZE) pgqueuer")
        await conn.execute("CHECKPOINT")
        return elapsed
    finally:
        await conn.close()


def worker(dsn: str, batch: int, ready, go, counts) -> None:
    async def main() -> None:
        conn = await asyncpg.connect(dsn)
        done = 0
        qm = QueueManager(queries=Queries(AsyncpgDriver(conn)))

        @qm.entrypoint(ENTRYPOINT)
        async def bench(job: Job) -> None:
            nonlocal done
            done += 1

        ready.release()
        await asyncio.get_running_loop().run_in_executor(None, go.wait)
        await qm.run(
            batch_size=batch,
            mode=QueueExecutionMode.drain,
            dequeue_timeout=timedelta(seconds=1),
            log_aggregation_interval=timedelta(0),
        )
        await conn.close()
        counts.put(done)

    asyncio.run(main())


async def left(dsn: str) -> tuple[int, int]:
    conn = await asyncpg.connect(dsn)
    try:
        queued = await conn.fetchval("SELECT count(*) FROM pgqueuer")
        logged = await conn.fetchval(
            "SELECT count(*) FROM pgqueuer_log WHERE status = 'successful'"
        )
        return queued, logged
    finally:
        await conn.close()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dsn", required=True)
    p.add_argument("--tasks", type=int, required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--workers", type=int, default=8)
    a = p.parse_args()

    enqueue_s = asyncio.run(prepare(a.dsn, a.tasks))
    ctx = mp.get_context("spawn")
    ready, go, counts = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=worker, args=(a.dsn, a.batch, ready, go, counts))
        for _ in range(a.workers)
    ]
    for proc in procs:
        proc.start()
    # Every worker connected, its entrypoint registered: then the clock starts.
    for _ in procs:
        ready.acquire()
    started = time.perf_counter()
    go.set()
    load = " ".join(open("/proc/loadavg").read().split()[:3])
    done = sum(counts.get() for _ in procs)
    elapsed = time.perf_counter() - started
    for proc in procs:
        proc.join()
    queued, logged = asyncio.run(left(a.dsn))
    assert done == a.tasks, f"{done} of {a.tasks} jobs ran"
    assert queued == 0, f"{queued} jobs left in the queue"
    assert logged == a.tasks, f"{logged} of {a.tasks} jobs logged as done"
    print(
        f"pgqueuer: {done} tasks in {elapsed:.2f} s = {done / elapsed:.0f} tasks/s "
        f"(enqueue: {a.tasks / enqueue_s:.0f} tasks/s; load {load})",
        flush=True,
    )


if __name__ == "__main__":
    main()
