"""End to end on Flower's deployment runtime, over loopback: one SuperLink, two SuperNodes, ``flwr run``.

The same commands a user types for a real federation (README, "Deployment"), with every port free
and every state file in the test's tmp dir:

    flower-superlink --insecure --port P --database state.db --disable-runtime-dependency-installation
    flower-supernode --insecure --superlink 127.0.0.1:P --port Q0 \\
        --node-config 'partition-id=0 num-partitions=2 data-root="<data>"'
    flower-supernode ... --port Q1 --node-config 'partition-id=1 num-partitions=2 data-root="<data>"'
    flwr run <app> deploy --stream --run-config '...'   # [superlink.deploy] in $FLWR_HOME/config.toml

In Flower 1.41 the SuperLink serves its Fleet, Control and Runtime APIs over HTTP on one port
(``--host``/``--port``; ``--control-api-address``/``--fleet-api-address`` are deprecated), and a
SuperNode's ``--port`` is its own Runtime API for the ClientApp processes it starts.

The nodes read a dataset written beforehand with ``feda2v data synth`` through their node-config
``data-root`` (the run config's ``data.root`` names the same directory): nothing is generated on
the fly, as on real sites. Each SuperNode gets its own FLWR_HOME, like separate machines. Rounds
take 13-40 s here because of Flower's 3-s polling loops and because each message starts a fresh
ClientApp process: keep it to 2 rounds.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from common.checkpoints import load_adapters
from common.data.synth import SYNTH_CLASSES
from e2e_utils import E2EEnv, e2e, e2e_cache, free_port, load_summary  # noqa: F401 - fixtures

pytestmark = pytest.mark.slow

NUM_NODES = 2
NUM_CLASSES = 4
CLIPS_PER_CLASS = 8
ROUNDS = 2
# Two SuperNodes share this machine's cores: one thread each avoids OpenMP oversubscription
# (measured: torch's default threading made local training ~20x slower with two nodes on 2 cores).
NODE_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
STARTUP_TIMEOUT_S = 60
RUN_TIMEOUT_S = 300


def test_loopback_deployment(e2e: E2EEnv, tmp_path: Path) -> None:
    data_root = tmp_path / "site-data"
    synth = e2e.run(
        "feda2v-data-synth",
        ["feda2v", "data", "synth", "--root", str(data_root), "--num-classes", str(NUM_CLASSES),
         "--clips-per-class", str(CLIPS_PER_CLASS)],
        timeout=120,
    )
    assert synth.returncode == 0, synth.describe()
    assert (data_root / "meta" / "esc50.csv").is_file(), synth.describe()

    port = free_port()
    superlink = e2e.start(
        "superlink",
        ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(port),
         "--database", str(tmp_path / "superlink-state.db"), "--disable-runtime-dependency-installation"],
    )
    e2e.wait_for(f"the SuperLink on port {port}", lambda: e2e.http_ok(f"http://127.0.0.1:{port}/health"),
                 STARTUP_TIMEOUT_S, watch=[superlink])

    nodes = []
    for pid in range(NUM_NODES):
        node_home = tmp_path / f"supernode{pid}-home"
        node_home.mkdir()
        nodes.append(e2e.start(
            f"supernode{pid}",
            ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}", "--port", str(free_port()),
             "--node-config", f'partition-id={pid} num-partitions={NUM_NODES} data-root="{data_root}" num-threads=1'],
            env={"FLWR_HOME": str(node_home), **NODE_ENV},
        ))
    superlink_log = e2e.logs / "superlink.log"
    e2e.wait_for(
        f"{NUM_NODES} SuperNodes to register",
        lambda: superlink_log.read_text(errors="replace").count("Activated node_id") >= NUM_NODES,
        STARTUP_TIMEOUT_S,
        watch=[superlink, *nodes],
    )

    e2e.write_flower_config({"deploy": {"address": f"127.0.0.1:{port}", "insecure": True}})
    run_config = " ".join([
        f'data.root="{data_root}"',
        f"data.num-classes={NUM_CLASSES}",
        f"data.clips-per-class={CLIPS_PER_CLASS}",
        f"num-rounds={ROUNDS}",
        "train.local-epochs=2",
        f"min-nodes={NUM_NODES}",
        f'output-dir="{e2e.out}"',
        'run-name="deploy"',
    ])
    result = e2e.flwr_run(run_config, superlink="deploy", timeout=RUN_TIMEOUT_S, watch=[superlink, *nodes])
    e2e.assert_run_completed(result, superlink="deploy")
    assert "global test retrieval acc" in result.output, result.describe()

    run_dir = e2e.out / "deploy"
    summary = load_summary(run_dir)
    classes = list(SYNTH_CLASSES[:NUM_CLASSES])
    assert summary["run"]["classes"] == classes
    assert [r["round"] for r in summary["rounds"]] == list(range(1, ROUNDS + 1))
    for entry in summary["rounds"]:
        for phase in ("train", "evaluate"):
            node_metrics = entry[phase]["nodes"]
            assert set(node_metrics) == {str(i) for i in range(NUM_NODES)}, f"round {entry['round']} {phase}: {sorted(node_metrics)}"
            for pid, metrics in node_metrics.items():
                assert metrics["partition_id"] == int(pid)
                assert metrics["num-examples"] > 0
        for key in ("test_retrieval_acc", "test_retrieval_acc_clip", "test_retrieval_acc_t5"):
            assert 0.0 <= entry["evaluate"]["global"][key] <= 1.0, f"round {entry['round']}: {key}"
    # Each node read the pre-generated directory named by its node-config (the ClientApp logs it).
    for pid in range(NUM_NODES):
        node_log = (e2e.logs / f"supernode{pid}.log").read_text(errors="replace")
        assert f"node {pid}/{NUM_NODES}:" in node_log and f"from {data_root}" in node_log, node_log[-3000:]
    _, meta = load_adapters(run_dir / "checkpoints" / "adapters.safetensors")
    assert meta["round"] == ROUNDS
    assert meta["class-names"] == classes


# ------------------------------------------------------------------ fault drills (common.drills)
FAULT_NODES = 3
DRILL_TIMEOUT_S = 600


def test_deployment_survives_node_death_server_crash_and_node_restart(tmp_path: Path) -> None:
    """Real flower-superlink + 3 flower-supernode processes on loopback:
    (a) kill -9 a SuperNode during round 2 of 4: the run completes on the others and the summary names
        the failed node, the round and Flower's error code (5, node unavailable);
    (b) kill -9 the ServerApp after round 2, then resume: round 3 runs, every round once in the summary
        (bench/faults.py runs it with 4 rounds and an uninterrupted reference);
    (c) restart a SuperNode after round 1 with aggregation 'none': it reloads its own adapters."""
    from common import drills
    from common.data.synth import synthesize_dataset
    from common.deployment import LocalFederation

    data = synthesize_dataset(tmp_path / "data", list(SYNTH_CLASSES[: drills.BASE_CONFIG["data.num-classes"]]),
                              clips_per_class=drills.BASE_CONFIG["data.clips-per-class"], seed=0)
    fed = LocalFederation(tmp_path / "fed", FAULT_NODES, data, cache_dir=tmp_path / "cache").start()
    try:
        out = tmp_path / "out"
        a = drills.kill_node_mid_run(fed, out, num_rounds=4, victim=2, timeout_s=DRILL_TIMEOUT_S)
        assert a["completed"] and a["rounds_in_summary"] == 4 and a["lost_rounds"] == 0, a
        assert list(a["failures"]) == ["2"] and "error code 5" in a["failures"]["2"][0], a
        fed.start_node(2)  # back to three nodes for the next drills

        b = drills.kill_serverapp_then_resume(fed, out, num_rounds=3, after_round=2, timeout_s=DRILL_TIMEOUT_S,
                                              reference=False)
        assert b["killed_serverapp_pids"] and b["rounds_before_kill"][:2] == [1, 2], b
        assert b["completed"] and b["rounds_in_summary"] == 3 and b["duplicate_rounds"] == 0, b
        summary = load_summary(out / "kill-server")
        assert summary["run"]["resumed"][0]["after_round"] in (2, 3) and summary["run"]["status"] == "completed"

        c = drills.restart_node_between_rounds(fed, out, num_rounds=3, node=1, timeout_s=DRILL_TIMEOUT_S)
        assert c["completed"] and c["lost_rounds"] == 0, c
        assert c["restored_in"] and not c["lost_in"], c  # reloaded its own adapters; never started over
        assert c["node_trained_in_rounds"][-1] == 3, c
    finally:
        leftovers = fed.close()
    assert not leftovers, leftovers
