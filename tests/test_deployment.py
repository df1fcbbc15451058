"""End to end on Flower's deployment runtime: real ``flower-superlink`` / ``flower-supernode`` processes.

The same commands the deployment guide (docs/deployment.md) gives a site, with every port free and every file in the
test's tmp dir (:class:`ops.deploy.local.LocalFederation`):

    feda2v deploy certs pki --name 127.0.0.1 --name localhost [--name <LAN address>]
    flower-superlink --ssl-ca-certfile pki/ca.pem --ssl-certfile pki/server.pem --ssl-keyfile pki/server.key \
        --enable-supernode-auth --host H --port P --database state.db --disable-runtime-dependency-installation
    feda2v deploy node-key pki/nodes supernode0
    flwr supernode register pki/nodes/supernode0.pub local-deploy   # [superlink.local-deploy] in config.toml
    flower-supernode --root-certificates pki/ca.pem --auth-supernode-private-key pki/nodes/supernode0 \
        --superlink H:P --port Q0 --node-config 'partition-id=0 num-partitions=2 data-root="<data>" num-threads=1'
    flwr run <app> local-deploy --stream --run-config '...'

In Flower 1.41 the SuperLink serves its Fleet, Control and Runtime APIs on one port; with the TLS
flags that port speaks HTTPS only. Rounds take 13-40 s here because of Flower's 3-s polling loops and
because each message starts a fresh ClientApp process: keep runs to 2 rounds.
"""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from common.checkpoints import load_adapters
from common.data.synth import SYNTH_CLASSES, synthesize_dataset
from ops.deploy.local import LocalFederation, free_port, write_flower_config
from ops.deploy.netns import NetnsLan
from ops.deploy.pki import make_node_key
from e2e_utils import load_summary

pytestmark = pytest.mark.slow

NUM_NODES = 2
NUM_CLASSES = 4
CLIPS_PER_CLASS = 8
ROUNDS = 2
RUN_TIMEOUT_S = 420
REFUSAL_TIMEOUT_S = 60


def _data(tmp_path: Path) -> Path:
    return synthesize_dataset(tmp_path / "site-data", list(SYNTH_CLASSES[:NUM_CLASSES]), clips_per_class=CLIPS_PER_CLASS,
                              seed=0)


def _run_config(out: Path, run_name: str) -> list[str]:
    return [" ".join([f"data.num-classes={NUM_CLASSES}", f"data.clips-per-class={CLIPS_PER_CLASS}",
                      f"num-rounds={ROUNDS}", "train.local-epochs=2", f"min-nodes={NUM_NODES}",
                      f'output-dir="{out}"', f'run-name="{run_name}"', 'render.model="tiny"'])]


def _assert_trained(fed: LocalFederation, run_dir: Path, data_root: Path) -> dict:
    """Every registered node trained and evaluated in every round; the checkpoint is the last round's."""
    summary = load_summary(run_dir)
    classes = list(SYNTH_CLASSES[:NUM_CLASSES])
    assert summary["run"]["classes"] == classes and summary["run"]["status"] == "completed"
    assert [r["round"] for r in summary["rounds"]] == list(range(1, ROUNDS + 1))
    for entry in summary["rounds"]:
        for phase in ("train", "evaluate"):
            node_metrics = entry[phase]["nodes"]
            assert set(node_metrics) == {str(i) for i in range(NUM_NODES)}, f"round {entry['round']} {phase}: {sorted(node_metrics)}"
            for pid, metrics in node_metrics.items():
                assert metrics["partition_id"] == int(pid) and metrics["num-examples"] > 0
        for key in ("test_retrieval_acc", "test_retrieval_acc_clip", "test_retrieval_acc_t5"):
            assert 0.0 <= entry["evaluate"]["global"][key] <= 1.0, f"round {entry['round']}: {key}"
    for pid in range(NUM_NODES):  # each node read the directory named by its node-config
        node_log = fed.log(f"supernode{pid}")
        assert f"node {pid}/{NUM_NODES}:" in node_log and f"from {data_root}" in node_log, node_log[-3000:]
    _, meta = load_adapters(run_dir / "checkpoints" / "adapters.safetensors")
    assert meta["round"] == ROUNDS and meta["class-names"] == classes
    return summary


def _plain_http_error(url: str) -> str:
    """What a plain-HTTP request to the SuperLink gets: the error text, or '' if it was answered."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - the test's own SuperLink
            return "" if response.status else "no status"
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError) as err:
        return repr(err)


def _refused(fed: LocalFederation, name: str, cmd: list[str]) -> tuple[int, str]:
    """Start a SuperNode variant and wait (bounded) for it to give up; its exit code and log."""
    proc = fed.start_node(0, wait=False, name=name, cmd=cmd)
    try:
        code = proc.wait(timeout=REFUSAL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{name} was neither admitted nor refused within {REFUSAL_TIMEOUT_S}s:\n{fed.log(name)[-3000:]}")
    return code, fed.log(name)


def test_secure_loopback_deployment(tmp_path: Path) -> None:
    """TLS + SuperNode authentication on loopback: registered nodes train to `finished:completed`; an
    unregistered node, a node without the CA and a plain-HTTP request are all refused."""
    data_root = _data(tmp_path)
    out = tmp_path / "out"
    with LocalFederation(tmp_path / "fed", NUM_NODES, data_root, cache_dir=tmp_path / "cache", secure=True) as fed:
        assert fed.address.startswith("127.0.0.1:")
        # the port speaks HTTPS only: plain HTTP gets no answer at all
        error = _plain_http_error(f"http://{fed.address}/health")
        assert error and ("RemoteDisconnected" in error or "Connection" in error), error

        rogue = make_node_key(tmp_path / "rogue", "rogue")  # a valid key pair nobody registered
        code, log = _refused(fed, "unregistered", fed.node_command(0, auth_key=rogue.private))
        assert code != 0 and "Exit Code: 305" in log and "Failed to activate SuperNode" in log, log[-3000:]
        assert "No SuperNode found with the given public key" in fed.superlink_log()

        cmd = fed.node_command(1)
        i = cmd.index("--root-certificates")
        del cmd[i:i + 2]  # the registered key, but no CA: the system trust store does not know ours
        code, log = _refused(fed, "no-ca", cmd)
        assert code != 0 and "CERTIFICATE_VERIFY_FAILED" in log, log[-3000:]

        # the operator's `flwr` without the CA cannot talk to the SuperLink either
        write_flower_config(fed.flwr_home, {fed.CONNECTION: {"address": fed.address,
                                                             "root-certificates": str(fed.tls.ca_cert)},
                                            "no-ca": {"address": fed.address}})
        ls = subprocess.run(["flwr", "ls", "no-ca", "--format", "json"], env=fed.env, capture_output=True, text=True,
                            timeout=120, check=False)
        reply = json.loads(ls.stdout[ls.stdout.index("{"):]) if "{" in ls.stdout else {}
        assert reply.get("success") is False and "unavailable" in str(reply).lower(), ls.stdout + ls.stderr

        # node authentication without TLS is refused by the SuperLink itself (Flower exit code 104)
        insecure = subprocess.run(
            ["flower-superlink", "--insecure", "--enable-supernode-auth", "--host", "127.0.0.1", "--port", str(free_port()),
             "--database", ":memory:"], env=fed.env, capture_output=True, text=True, timeout=120, check=False)
        said = insecure.stdout + insecure.stderr
        assert insecure.returncode != 0 and "ref-exit-codes/104" in said and "enable-supernode-auth" in said, said

        # partition squatting: a registered site (its own key) claims partition 0; the operator pinned the
        # partitions to the keys that own them (robust.partition-owners), so its replies are rejected and named
        squatter = make_node_key(tmp_path / "squatter", "squatter")
        squatter_id = fed.register(squatter)
        fed.start_node(0, name="squatter", cmd=fed.node_command(0, auth_key=squatter.private))
        owners = tmp_path / "owners.toml"
        owners.write_text("[robust.partition-owners]\n" + "".join(f'"{p}" = {n}\n' for p, n in fed.node_ids.items()))
        result = fed.run([_run_config(out, "secure")[0] + f' config-file="{owners}"'], timeout=RUN_TIMEOUT_S)
        assert result.ok, f"{result.problem}\n{result.output[-3000:]}\n{fed.superlink_log()[-3000:]}"
        assert result.status["status"] == "finished:completed"
        assert "global test retrieval acc" in result.output
        summary = _assert_trained(fed, out / "secure", data_root)
        for entry in summary["rounds"]:
            said = entry["train"].get("rejected", []) + entry["evaluate"].get("failures", [])
            assert any(f"node {squatter_id} (partition 0)" in r and f"pinned to Flower node {fed.node_ids[0]}" in r for r in said), said
        activated = fed.superlink_log().count("Activated node_id")
        assert activated == NUM_NODES + 1, f"{activated} nodes activated; only the {NUM_NODES + 1} registered ones may be"
    assert not fed.close()


def test_multi_host_deployment_over_tls(tmp_path: Path) -> None:
    """SuperLink and SuperNodes on separate hosts (network namespaces this test makes), TLS and node
    authentication by LAN address, `flwr run` from this machine: 2 rounds to `finished:completed`.
    The sites run ``feda2v-supernode``: every ClientApp process is forked warm by ``feda2v-superexec``.
    Site 1 demands differential privacy in its own node-config; the run config asks for none, and cannot
    turn it off: site 1's replies are DP releases within its budget, site 0's are not."""
    data_root = _data(tmp_path)
    out = tmp_path / "out"
    with NetnsLan(["superlink", "site0", "site1"]) as lan:
        superlink = lan.hosts["superlink"]
        fed = LocalFederation(tmp_path / "fed", NUM_NODES, data_root, cache_dir=tmp_path / "cache", secure=True,
                              superlink_host=superlink, node_hosts=[lan.hosts["site0"], lan.hosts["site1"]],
                              prompt_supernodes=True, node_configs={1: "privacy-dp=true privacy-epsilon=20"})
        with fed:
            assert fed.address.startswith(f"{superlink.address}:")
            result = fed.run(_run_config(out, "lan"), timeout=RUN_TIMEOUT_S)
            assert result.ok, f"{result.problem}\n{result.output[-3000:]}\n{fed.superlink_log()[-3000:]}"
            assert result.status["status"] == "finished:completed"
            _assert_trained(fed, out / "lan", data_root)
            rounds = load_summary(out / "lan")["rounds"]
            starts = [m.get("warm_start") for e in rounds for ph in ("train", "evaluate") for m in e[ph]["nodes"].values()]
            assert len(starts) == ROUNDS * 2 * NUM_NODES and set(starts) == {1}, starts  # no cold ClientApp start
            for entry in rounds:  # the site's own DP: the server's run config did not ask for it
                private, plain = entry["train"]["nodes"]["1"], entry["train"]["nodes"]["0"]
                assert private["dp"] == 1 and 0 < private["dp_epsilon_run"] <= 8.0 and private["dp_epsilon"] <= 20.0
                assert "dp" not in plain and "train_loss" in plain and "train_loss" not in private
            assert list((tmp_path / "cache" / "privacy").glob("ledger_*_p1.json"))  # the site's ledger, on the site
            # the sites reached the SuperLink from their own addresses, over the LAN
            peers = set(re.findall(r"(\d+\.\d+\.\d+\.\d+):\d+ - \"POST /v1/fleet/", fed.superlink_log()))
            assert {lan.hosts["site0"].address, lan.hosts["site1"].address} <= peers, peers
        assert not fed.close()


# ------------------------------------------------------------------ fault drills (ops.deploy.drills)
FAULT_NODES = 3
DRILL_TIMEOUT_S = 600


def test_deployment_survives_node_death_server_crash_and_node_restart(tmp_path: Path) -> None:
    """Real flower-superlink + 3 flower-supernode processes on loopback:
    (a) kill -9 a SuperNode during round 2 of 4: the run completes on the others and the summary names
        the failed node, the round and Flower's error code (5, node unavailable);
    (b) kill -9 the ServerApp after round 2, then resume: round 3 runs, every round once in the summary
        (bench/faults.py runs it with 4 rounds and an uninterrupted reference);
    (c) restart a SuperNode after round 1 with aggregation 'none': it reloads its own adapters."""
    from ops.deploy import drills

    data = synthesize_dataset(tmp_path / "data", list(SYNTH_CLASSES[: drills.BASE_CONFIG["data.num-classes"]]),
                              clips_per_class=drills.BASE_CONFIG["data.clips-per-class"], seed=0)
    fed = LocalFederation(tmp_path / "fed", FAULT_NODES, data, cache_dir=tmp_path / "cache")
    try:
        fed.start()
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


WITHHELD_ROUND_TIMEOUT_S = 60  # generous: the honest nodes' train replies must arrive within it


def test_a_node_that_registers_its_reply_and_never_uploads_it_cannot_stall_the_round(tmp_path: Path) -> None:
    """Node 2 (ops.deploy.faulty_supernode) registers its train reply at the SuperLink and never uploads the
    weights: the train phase ends at round-timeout without it (logged with its node id), the round goes on,
    and its evaluate reply, which it does upload, is counted. bench/faults.py reports by how much the phase
    overran its deadline."""
    from ops.deploy import drills, faulty_supernode

    data = synthesize_dataset(tmp_path / "data", list(SYNTH_CLASSES[: drills.BASE_CONFIG["data.num-classes"]]),
                              clips_per_class=drills.BASE_CONFIG["data.clips-per-class"], seed=0)
    victim = FAULT_NODES - 1
    fed = LocalFederation(tmp_path / "fed", FAULT_NODES, data, cache_dir=tmp_path / "cache",
                          node_programs={victim: faulty_supernode.command(["train"])})
    try:
        fed.start()
        result = drills.withheld_reply_objects(fed, tmp_path / "out", victim, num_rounds=1,
                                               round_timeout=WITHHELD_ROUND_TIMEOUT_S, timeout_s=DRILL_TIMEOUT_S)
        victim_log = fed.log(f"supernode{victim}")
    finally:
        leftovers = fed.close()
    assert not leftovers, leftovers
    assert result["completed"], result
    assert result["train_nodes"] == {"1": ["0", "1"]}, result
    assert result["evaluate_nodes"] == {"1": ["0", "1", str(victim)]}, result
    assert "will never be uploaded" in victim_log, victim_log[-3000:]
    assert result["left_out_logged"] >= 1 and result["overruns"], result
    assert all(len(o["missing_nodes"]) == 1 for o in result["overruns"]), result
