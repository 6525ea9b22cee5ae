#!/usr/bin/env bash
# The task queue benchmark beside its peer (BENCHMARKS.md "Task queue"): Cairn's queue
# (`cargo bench -p cairn-reconciler --bench queue`) and pgqueuer from the Python package index, in the same
# run against the same PostgreSQL, the same task count, batch sizes and number of workers.
#
#   benches/queue.sh            # 200,000 tasks batched by 200, 10,000 one at a time
#   benches/queue.sh --quick    # a tenth of that
#
# pgqueuer and its driver (asyncpg) are installed into a virtual environment under target/.
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
need python3 cargo

venv=target/pgqueuer-venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check pgqueuer asyncpg
"$venv/bin/python" -c 'import importlib.metadata as m; print("pgqueuer", m.version("pgqueuer"), "asyncpg", m.version("asyncpg"))'
echo "load: $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) cores, $(date -u +%FT%TZ)"
CAIRN_BENCH_PGQUEUER="$PWD/$venv/bin/python" cargo bench --locked -p cairn-reconciler --bench queue -- "$@"
