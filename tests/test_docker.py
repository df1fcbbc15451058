"""The compose federation of ``docker/``: images built here, TLS + SuperNode authentication, 2 rounds.

What the docker guide (docs/deployment.md) tells a user to do, driven by :class:`ops.deploy.compose.ComposeFederation`:
build the images (``feda2v deploy images --offline-base``: this machine cannot pull Flower's official
bases), make the CA, the server certificate and the nodes' keys, start the SuperLink, register the
three SuperNodes' keys from the host, start the rest (ServerApp SuperExec, 3 SuperNodes, 3 ClientApp
SuperExecs, each site with its own volumes), ``flwr run`` from the host, ``down -v``.

A missing or stopped Docker engine fails this test with the reason (``.ci/run`` installs and starts
one); it is never skipped.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ops.deploy.compose import NUM_SITES, ComposeFederation
from ops.deploy.images import build_images, docker_ready

pytestmark = pytest.mark.slow

TAG = "test"
ROUNDS = 2
NUM_CLASSES = 4
RUN_TIMEOUT_S = 600


def documented_run_config() -> str:
    """The ``--run-config`` of the ``flwr run`` line in the docker guide's example (docs/deployment.md)."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "deployment.md").read_text()
    found = re.findall(r"^flwr run \. feda2v-docker .*--run-config '([^']*)'", text, re.M)
    assert len(found) == 1, f"docs/deployment.md should hold one `flwr run . feda2v-docker` line, found {found}"
    assert f"num-rounds={ROUNDS}" in found[0] and f"data.num-classes={NUM_CLASSES}" in found[0], found[0]
    return found[0]


def test_compose_federation_with_tls_and_auth(tmp_path: Path) -> None:
    reason = docker_ready()
    assert not reason, f"the compose test needs a Docker engine: {reason}"
    built = build_images(TAG, offline=True)
    assert set(built.images) == {"superlink", "supernode", "superexec"}

    fed = ComposeFederation(tmp_path / "compose", TAG, secure=True)
    transcript = ""
    try:
        fed.start()
        # the run config the docker guide gives, plus what keeps the test short: the untrained render preset
        # (no preset training in the containers) and fewer local epochs
        run_config = documented_run_config() + ' train.local-epochs=2 render.model="tiny"'
        result = fed.run([run_config], timeout=RUN_TIMEOUT_S)
        assert result.ok, f"{result.problem}\n{result.output[-3000:]}\n{fed.logs('serverapp')[-3000:]}"
        assert result.status["status"] == "finished:completed"

        # the ServerApp wrote its summary on the server's volume; every site trained in every round
        summary = json.loads(fed.compose("exec", "-T", "serverapp", "cat", "/app/outputs/compose/summary.json").stdout)
        assert [r["round"] for r in summary["rounds"]] == list(range(1, ROUNDS + 1))
        for entry in summary["rounds"]:
            assert set(entry["train"]["nodes"]) == {str(i) for i in range(NUM_SITES)}, entry["train"]["nodes"]
            # the documented data leaves every site classes above privacy.min-class-count: class means flow
            counts = entry.get("node_class_counts", {})
            assert set(counts) == {str(i) for i in range(NUM_SITES)} and all(counts.values()), (entry["round"], counts)
            # the sites' feda2v-superexec forked every ClientApp from its preloaded process
            starts = [m.get("warm_start") for ph in ("train", "evaluate") for m in entry[ph]["nodes"].values()]
            assert set(starts) == {1}, (entry["round"], starts)
        checkpoints = fed.compose("exec", "-T", "serverapp", "ls", "/app/outputs/compose/checkpoints").stdout
        assert "adapters.safetensors" in checkpoints, checkpoints
        # each site generated its dataset on its own data volume and cached its embeddings on its own cache volume
        for site in range(NUM_SITES):
            listing = fed.compose("exec", "-T", f"clientapp-{site}", "ls", "/var/lib/feda2v/data/esc50",
                                  "/var/lib/feda2v/cache").stdout
            assert "meta" in listing and "embeddings" in listing, f"site {site}: {listing}"
        assert fed.logs("superlink").count("Activated node_id") == NUM_SITES
        assert "--enable-supernode-auth" in fed.compose("config").stdout
    finally:
        transcript = fed.down()
    assert not fed.volumes(), f"down -v left volumes: {fed.volumes()}\n{transcript}"
