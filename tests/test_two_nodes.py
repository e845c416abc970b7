"""The loop on two Ray nodes with everything shared on object storage, and a node's worker dying.

One module fixture starts: a moto S3 server (its own process) with one bucket; an MLflow server
whose artifact store is in that bucket; a Ray head (with the Jobs API) and a second Ray node
(its own ``ray start``, temp dir and custom resource ``node2``), both with the AWS variables of
the S3 server, as every node of a real cluster would have them. The catalog (a small embedded
world) is built into ``s3://.../catalog`` and Ray Train keeps its checkpoints in
``s3://.../ray-results``: nothing one node needs is on another node's disk.

1. Base training as a Ray job, two DDP workers placed one per node (``--placement-strategy
   STRICT_SPREAD``). Once its first checkpoint is in the bucket, the Ray Train worker on the
   second node is SIGKILLed; the run resumes from that checkpoint (the step counter does not
   restart: the MLflow history of ``train/loss`` goes on from the checkpoint's step), finishes
   and registers version 1. The steps lost and the seconds from the kill to the first resumed
   training step are printed (``pytest -s``) as ``RECOVERY ...``.
2. The rest of the loop: Serve answers with version 1; add_classes (a Ray job) adds two classes;
   Serve's ``/v1/classes`` lists them.
3. An add_classes job SIGKILLed after its fine-tune leaves the aliases, the catalog's class sets
   and the served model as they were.

This one training run carries both the loop and the worker death: a second base training just
to kill it would double the test's time.
"""
from __future__ import annotations

import os
import shlex
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import pytest
import ray
import requests

from catalog import Catalog
from catalog.world import build_world
from fewshot.backends import registry
from services import ROOT, S3, RayNode, free_port, mlflow_server, ray_env, ray_head, ray_worker_node

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "two-node-detector"
STEPS, CHECKPOINT_EVERY = 36, 3
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
STATE: dict = {}  # what the loop test leaves for the tests after it


@dataclass
class TwoNodes:
    s3: S3
    mlflow_uri: str
    head: RayNode
    node2: RayNode
    node2_id: str
    catalog: Catalog
    prefix: str  # this module's folder in the bucket

    @property
    def storage(self) -> str:
        return self.s3.uri(self.prefix, "ray-results")

    def common(self) -> list[str]:
        return ["--catalog", self.catalog.uri, "--mlflow-uri", self.mlflow_uri, "--model-name", MODEL,
                "--storage-path", self.storage, "--max-test-images", "6", "--max-val-images", "6"]

    def class_set_keys(self) -> list[str]:
        return self.s3.keys(f"{self.prefix}/catalog/class_sets/")


class Job:
    """A job submitted through the Jobs API with the checkout as its working dir."""

    def __init__(self, head: RayNode, args: list[str], env: dict | None = None):
        from ray.job_submission import JobSubmissionClient

        self.client = JobSubmissionClient(head.dashboard_url)
        runtime_env = {"working_dir": str(ROOT), **({"env_vars": env} if env else {})}
        entrypoint = shlex.join([sys.executable, *args])
        deadline = time.time() + 180
        while True:
            try:
                self.id = self.client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
                break
            except RuntimeError as err:  # the Jobs API answers before its agent is ready
                if "No available agent" not in str(err) or time.time() > deadline:
                    raise
                time.sleep(3)

    def status(self) -> str:
        return str(self.client.get_job_status(self.id).value)

    def logs(self) -> str:
        return self.client.get_job_logs(self.id)

    def wait(self, timeout: float = 900) -> tuple[str, str]:
        deadline = time.time() + timeout
        while time.time() < deadline and self.status() not in TERMINAL:
            time.sleep(1)
        return self.status(), self.logs()


def run_job(head: RayNode, args: list[str], env: dict | None = None, expect: str = "SUCCEEDED") -> str:
    status, out = Job(head, args, env).wait()
    assert status == expect, f"{' '.join(args[:1])}: {status}, expected {expect}\n{out[-6000:]}"
    return out


@contextmanager
def _world(catalog: Catalog):
    """The small embedded world built into the catalog (on S3) when entered."""
    yield build_world(catalog, n_train=40, n_val=8, n_test=8, seed=0, progress=False, workers=1)


def _enter_together(stack: ExitStack, *managers) -> list:
    """Enter context managers in threads, side by side; each one entered is exited by ``stack``
    (also when another failed to start)."""
    with ThreadPoolExecutor(len(managers)) as pool:
        futures = [pool.submit(m.__enter__) for m in managers]
        wait(futures)
    for m, f in zip(managers, futures):
        if f.exception() is None:
            stack.push(m.__exit__)
    return [f.result() for f in futures]


@pytest.fixture(scope="module")
def two_nodes(s3_service, tmp_path_factory):
    state = tmp_path_factory.mktemp("two-nodes")
    s3, prefix = s3_service, f"two-nodes-{os.getpid()}"
    # Ray's memory monitor reads the whole machine's memory: on a shared test box other people's
    # processes made it kill this test's Train workers (a kill the test did not ask for)
    node_env = {**ray_env(), **s3.env, "RAY_memory_monitor_refresh_ms": "0"}
    with pytest.MonkeyPatch.context() as mp, ExitStack() as stack:
        for k, v in s3.env.items():  # this process reads and writes the catalog on S3 too
            mp.setenv(k, v)
        for k in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION"):
            mp.delenv(k, raising=False)
        catalog = Catalog(s3.uri(prefix, "catalog"))
        # the services start side by side (each mostly waits for its own readiness)
        uri, head, _ = _enter_together(
            stack, mlflow_server(state / "mlflow", artifacts=s3.uri(prefix, "mlflow"), env=s3.env),
            ray_head(state / "head", num_cpus=2, dashboard=True, env=node_env),
            _world(catalog))
        node2 = stack.enter_context(ray_worker_node(head, state / "node2", num_cpus=2,
                                                    resources={"node2": 1}, env=node_env))
        ray.init(address=head.address, log_to_driver=False)
        stack.callback(ray.shutdown)
        node2_id = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("node2"))

        def stop_serve():
            from ray import serve

            serve.shutdown()

        stack.callback(stop_serve)  # runs before ray.shutdown and before the nodes stop
        yield TwoNodes(s3=s3, mlflow_uri=uri, head=head, node2=node2, node2_id=node2_id,
                       catalog=catalog, prefix=prefix)


def _train_workers(head: RayNode) -> list:
    """The live Ray Train workers, from this cluster's state API (other clusters share the machine)."""
    from ray.util.state import list_actors

    return list_actors(address=head.dashboard_url, raise_on_missing_output=False,
                       filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])


def _base_run(uri: str):
    client = registry.client(uri)
    exp = client.get_experiment_by_name("fewshot-base")
    runs = client.search_runs([exp.experiment_id], "attributes.run_name = 'base-synthworld'") if exp else []
    return runs[0] if runs else None


def test_base_training_on_two_nodes_survives_a_worker_death(two_nodes):
    c = two_nodes
    job = Job(c.head, ["jobs/base_train.py", "--steps", str(STEPS), "--batch-size", "2", "--log-every", "1",
                       "--checkpoint-every", str(CHECKPOINT_EVERY), "--num-workers", "2",
                       "--cpus-per-worker", "1", "--placement-strategy", "STRICT_SPREAD", *c.common()])

    # the two workers, one on each node (looked up while the run starts, so that the kill
    # below comes right after the first checkpoint)
    client = registry.client(c.mlflow_uri)
    deadline = time.time() + 900
    workers, reached = [], 0
    while time.time() < deadline:
        assert job.status() not in TERMINAL, f"the job ended before the kill\n{job.logs()[-6000:]}"
        if len(workers) < 2:
            workers = _train_workers(c.head)
        elif [k for k in c.s3.keys(f"{c.prefix}/ray-results/") if k.endswith("/train_state.pt")]:
            # the first checkpoint is in the bucket (Ray Train's storage on S3); two steps after
            # it rank 0 has long returned from reporting it, so Ray Train has registered it
            run = _base_run(c.mlflow_uri)
            reached = max((m.step for m in client.get_metric_history(run.info.run_id, "train/loss")),
                          default=0) if run else 0
            if reached >= CHECKPOINT_EVERY + 2:
                break
        time.sleep(0.3)
    else:
        pytest.fail(f"no checkpoint and two steps after it within 900 s\n{job.logs()[-6000:]}")
    assert len(workers) == 2, workers
    assert {w.node_id for w in workers} == {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    victim = next(w for w in workers if w.node_id == c.node2_id)
    assert victim.pid in c.node2.processes()  # a process of the second node's own `ray start`
    # the Ray Train worker on the second node dies the way an OOM kill would
    os.kill(victim.pid, signal.SIGKILL)
    t_kill = time.time()
    print(f"\nkilled Ray Train worker pid {victim.pid} on node 2 after step {reached} of {STEPS}", flush=True)

    status, out = job.wait()
    assert status == "SUCCEEDED", out[-6000:]
    assert f"registered {MODEL} version 1 (champion)" in out
    v1 = registry.get_alias(c.mlflow_uri, MODEL, registry.CHAMPION)
    assert v1 is not None and v1.version == 1

    # the run went on from the checkpoint: MLflow's history of train/loss (one point a step)
    run = _base_run(c.mlflow_uri)
    loss = client.get_metric_history(run.info.run_id, "train/loss")
    resumed = client.get_metric_history(run.info.run_id, "train/resumed_at_step")
    assert len(resumed) == 1, f"expected one restart, got {[(m.step, m.timestamp) for m in resumed]}\n{out[-4000:]}"
    resumed_at, t_resumed = int(resumed[0].value), resumed[0].timestamp / 1000
    assert f"resumed at step {resumed_at} from checkpoint" in out
    before = [m.step for m in loss if m.timestamp / 1000 <= t_kill]
    after = sorted((m.step, m.timestamp / 1000) for m in loss if m.timestamp / 1000 >= t_resumed)
    assert before and after
    reached = max(before)  # the last step done before the kill
    assert resumed_at >= CHECKPOINT_EVERY and resumed_at % CHECKPOINT_EVERY == 0
    assert resumed_at <= reached  # not from step 0, and not from a step never reached
    assert after[0][0] == resumed_at + 1  # the step counter goes on where the checkpoint was
    assert [s for s, _ in after] == list(range(resumed_at + 1, STEPS + 1))
    steps_lost = reached - resumed_at
    print(f"\nRECOVERY steps_lost={steps_lost} (killed after step {reached}, resumed at step {resumed_at}, "
          f"checkpoint every {CHECKPOINT_EVERY}); seconds kill->restored={t_resumed - t_kill:.1f}, "
          f"kill->first resumed step done={after[0][1] - t_kill:.1f}", flush=True)

    # everything the run kept is in the bucket: checkpoints and the registered model's artifacts
    assert [k for k in c.s3.keys(f"{c.prefix}/mlflow/") if k.endswith("/detector.pt")]
    STATE["v1"] = v1


def test_the_loop_goes_on_across_the_two_nodes(two_nodes):
    """Serve answers with version 1; add_classes on the cluster; Serve answers with the new classes."""
    from ray import serve

    from serving.app import DetectorService

    c = two_nodes
    if "v1" not in STATE:
        pytest.skip("base training failed")
    v1 = STATE["v1"]
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(DetectorService.options(user_config={
        "model_name": MODEL, "tracking_uri": c.mlflow_uri, "poll_interval_s": 1.0,
        "score_threshold": 0.0}).bind(), name="two-nodes", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    assert requests.get(f"{url}/v1/classes", timeout=30).json()["classes"] == v1.classes

    split = c.catalog.manifest("synthworld").class_split("split1")
    novel = list(split.novel[:2])
    sets_before = c.class_set_keys()
    out = run_job(c.head, ["jobs/add_classes.py", "--classes", ",".join(novel), "--shots", "2", "--steps", "4",
                           "--batch-size", "2", "--cpus-per-worker", "1", "--max-base-drop", "1.0",
                           "--max-detector-drop", "1.0", *c.common()])
    assert "as 'champion'" in out
    v2 = registry.get_alias(c.mlflow_uri, MODEL, registry.CHAMPION)
    assert v2.version == 2 and v2.parent_version == 1 and v2.classes == v1.classes + novel
    deadline = time.time() + 120
    while time.time() < deadline:
        body = requests.get(f"{url}/v1/classes", timeout=30).json()
        if body["model"]["version"] == 2:
            break
        time.sleep(0.5)
    assert body["model"]["version"] == 2 and body["classes"] == list(split.base) + novel
    # the child's class set was written to the catalog on S3, last
    assert len(c.class_set_keys()) == len(sets_before) + 1
    STATE.update(url=url, novel=list(split.novel))


def test_a_job_killed_half_way_on_two_nodes_changes_nothing(two_nodes):
    c = two_nodes
    if "url" not in STATE:
        pytest.skip("the loop did not run")
    url = STATE["url"]
    champion = registry.get_alias(c.mlflow_uri, MODEL, registry.CHAMPION)
    candidate = registry.get_alias(c.mlflow_uri, MODEL, registry.CANDIDATE)
    served = requests.get(f"{url}/v1/classes", timeout=30).json()
    versions = {v.version for v in registry.list_versions(c.mlflow_uri, MODEL)}
    sets_before = c.class_set_keys()
    new = next(n for n in STATE["novel"] if n not in champion.classes)
    out = run_job(c.head, ["jobs/add_classes.py", "--classes", new, "--shots", "2", "--steps", "2",
                           "--batch-size", "2", "--cpus-per-worker", "1", "--max-base-drop", "1.0",
                           "--max-detector-drop", "1.0", *c.common()],
                  env={"FEWSHOT_KILL_AT": "after_finetune"}, expect="FAILED")
    assert "FEWSHOT_KILL_AT=after_finetune: killing this job now" in out
    assert registry.get_alias(c.mlflow_uri, MODEL, registry.CHAMPION).version == champion.version
    after = registry.get_alias(c.mlflow_uri, MODEL, registry.CANDIDATE)
    assert (after.version if after else None) == (candidate.version if candidate else None)
    assert {v.version for v in registry.list_versions(c.mlflow_uri, MODEL)} == versions
    assert c.class_set_keys() == sets_before
    time.sleep(2)  # more than the replica's poll interval
    assert requests.get(f"{url}/v1/classes", timeout=30).json() == served
