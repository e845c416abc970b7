"""Test scaffolding for multi-node work: a head and a second node (``ray start``) on
127.0.0.1, each with its own temp dir; a task asked for the second node's custom resource
runs there. (The node-failure test builds on these fixtures.)"""
from __future__ import annotations

import subprocess
import sys

import pytest

from services import ray_env, ray_head, ray_worker_node

pytestmark = pytest.mark.integration

PROBE = r"""
import os, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
head = ray.get_runtime_context().get_node_id()

@ray.remote(num_cpus=1, resources={"second_node": 1})
def where():
    import catalog
    return ray.get_runtime_context().get_node_id(), os.getpid(), catalog.__file__

node, pid, catalog_file = ray.get(where.remote(), timeout=180)
alive = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
print("RESULT", head, node, pid, catalog_file, int(alive[node].get("second_node", 0)),
      int("second_node" in alive[head]))
"""


def test_a_task_lands_on_the_second_node(tmp_path):
    with ray_head(tmp_path / "head", num_cpus=1) as head:
        with ray_worker_node(head, tmp_path / "worker", num_cpus=1,
                             resources={"second_node": 1}) as worker:
            assert worker.processes(), "the second node has processes of its own"
            r = subprocess.run([sys.executable, "-c", PROBE, head.address], env=ray_env(),
                               capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
            line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")][-1].split()
            driver_node, task_node, pid, catalog_file, has_res, head_has_res = line[1:]
            assert task_node != driver_node  # ran on the second node, not on the head
            assert has_res == "1" and head_has_res == "0"
            assert catalog_file.startswith(str(__import__("services").ROOT))
        # the second node's processes are gone when its fixture ends; the head is still up
        assert not worker.processes()
        assert head.processes()
    assert not head.processes()
