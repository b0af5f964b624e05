"""The jobs' actor-pool runtime on an embedded Ray: results in item order with progress, an item
that raises is that item's ``stage_error`` row, an actor whose process dies gives its item a
``worker_lost`` row and is replaced, and an actor that cannot be built stops the job at start."""
import json
import os
import sys
import textwrap
from pathlib import Path

import pytest
from processes import run_group

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent('''
    import json, os, sys
    from pipelines.actor_pool import ActorPool, ActorResources
    from pipelines.preprocess.config import RayConfig
    from pipelines.preprocess.job import init_ray

    FLAG = sys.argv[1]

    class Squarer:
        def __init__(self, offset):
            self.offset = offset

        def ready(self):
            return self.offset

        def run(self, x):
            if x == 3:
                raise ValueError("three")
            if x == 5 and not os.path.exists(FLAG):     # this actor's process dies, once
                open(FLAG, "w").close()
                os._exit(1)
            return {"x": x, "y": x * x + self.offset}

    class Broken:
        def __init__(self):
            raise RuntimeError("cannot load")

        def ready(self):
            return None

    import ray
    init_ray(RayConfig(num_cpus=2))
    try:
        pool = ActorPool(Squarer, (100,), ActorResources(num_cpus=1, max_restarts=0))
        ready = pool.start(2)
        seen = []
        rows = pool.map("run", list(range(8)), lambda x: (x,),
                        lambda f: {"x": f.item, "status": f.status, "cause": type(f.cause).__name__},
                        progress=seen.append)
        pool.shutdown()                                  # frees the CPUs for the next pool
        try:
            ActorPool(Broken, (), ActorResources(num_cpus=1)).start(1)
            setup = "started"
        except Exception as exc:
            setup = type(exc).__name__
        print(json.dumps({"ready": ready, "rows": rows, "replaced": pool.replaced, "progress": len(seen),
                          "setup": setup}))
    finally:
        ray.shutdown()
''')


def test_pool_keeps_order_and_turns_failures_into_rows(tmp_path):
    script = tmp_path / "pool_job.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(ROOT))
    proc = run_group([sys.executable, str(script), str(tmp_path / "died")], cwd=ROOT, env=env, timeout=300)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[-1])
    assert out["ready"] == [100, 100] and out["progress"] == 8 and out["replaced"] == 1
    rows = out["rows"]
    assert rows[3] == {"x": 3, "status": "stage_error", "cause": "ValueError"}
    assert rows[5] == {"x": 5, "status": "worker_lost", "cause": "ActorDiedError"}
    assert [r["y"] for i, r in enumerate(rows) if i not in (3, 5)] == [x * x + 100 for x in (0, 1, 2, 4, 6, 7)]
    assert out["setup"] == "ActorDiedError"                 # the constructor raised: no item ran
