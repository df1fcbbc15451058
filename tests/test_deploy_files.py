"""Fast checks of what a deployment is made of: certificates and node keys (:mod:`ops.deploy.pki`),
``feda2v deploy``'s errors, and the compose files (the overlays must not drift from the base file)."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key

from ops.cli import main
from ops.deploy.pki import make_node_key, make_tls
from common.errors import FedA2VError

DOCKER = Path(__file__).resolve().parents[1] / "docker"
SITES = 3


def test_tls_files_chain_to_the_ca_and_name_every_address(tmp_path: Path) -> None:
    tls = make_tls(tmp_path, ["superlink", "localhost", "127.0.0.1", "10.0.0.7"])
    ca = x509.load_pem_x509_certificate(tls.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(tls.cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"superlink", "localhost"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("10.0.0.7")}
    key = load_pem_private_key(tls.key.read_bytes(), password=None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()
    for secret in (tls.key, tls.ca_key):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    assert stat.S_IMODE(tls.ca_cert.stat().st_mode) & 0o044  # public: readable by others


def test_existing_files_are_never_overwritten_unless_asked(tmp_path: Path) -> None:
    tls = make_tls(tmp_path, ["superlink"])
    before = tls.ca_cert.read_bytes()
    with pytest.raises(FedA2VError, match="ca.key exists"):
        make_tls(tmp_path, ["superlink"])
    assert tls.ca_cert.read_bytes() == before
    assert make_tls(tmp_path, ["superlink"], overwrite=True).ca_cert.read_bytes() != before


def test_node_key_is_what_flower_loads(tmp_path: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key

    key = make_node_key(tmp_path, "site-a")
    private = load_ssh_private_key(key.private.read_bytes(), password=None)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert key.public.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert try_load_public_key(key.public)  # what `flwr supernode register` does with the file
    assert stat.S_IMODE(key.private.stat().st_mode) == 0o600


def test_secret_is_private_random_and_never_overwritten(tmp_path: Path) -> None:
    from ops.deploy.pki import make_secret

    path = make_secret(tmp_path, "site-0")
    assert path.name == "site-0.secret" and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(path.read_bytes()) == 64 and path.read_bytes() != make_secret(tmp_path, "site-1").read_bytes()
    with pytest.raises(FedA2VError, match="site-0.secret exists"):
        make_secret(tmp_path, "site-0")


def test_cli_makes_certs_and_names_the_file_it_will_not_overwrite(tmp_path: Path, capsys) -> None:
    assert main(["deploy", "certs", str(tmp_path), "--name", "superlink", "--name", "127.0.0.1"]) == 0
    assert main(["deploy", "node-key", str(tmp_path), "supernode-0"]) == 0
    assert {p.name for p in tmp_path.iterdir()} == {"ca.pem", "ca.key", "server.pem", "server.key", "supernode-0",
                                                    "supernode-0.pub"}
    capsys.readouterr()
    assert main(["deploy", "node-key", str(tmp_path), "supernode-0"]) == 2
    assert f"{tmp_path / 'supernode-0'} exists" in capsys.readouterr().err


# ------------------------------------------------------------------ compose files
def _services(name: str) -> dict:
    return yaml.safe_load((DOCKER / name).read_text())["services"]


def _without(command: list[str], prefixes: tuple[str, ...]) -> list[str]:
    return [arg for arg in command if not arg.startswith(prefixes)]


def test_compose_has_a_superlink_a_serverapp_and_three_sites_with_their_own_volumes() -> None:
    base = _services("compose.yml")
    assert {"superlink", "serverapp"} <= set(base)
    assert "--isolation=process" in base["superlink"]["command"]
    assert any(v.endswith(":/app/state") for v in base["superlink"]["volumes"])
    partitions = []
    for site in range(SITES):
        node = base[f"supernode-{site}"]["command"]
        config = node[node.index("--node-config") + 1]
        partitions.append(config.split()[0])
        assert f"num-partitions={SITES}" in config and "--isolation=process" in node
        app = base[f"clientapp-{site}"]
        assert app["command"][-1] == f"--runtime-api-address=site-{site}-supernode:9094"
        mounts = {v.split(":")[0] for v in app["volumes"]}
        assert mounts == {f"site-{site}-{kind}" for kind in ("data", "cache", "checkpoints", "images")}
    assert partitions == [f"partition-id={i}" for i in range(SITES)]


def test_overlays_only_change_security_flags() -> None:
    """with-tls.yml / with-auth.yml restate commands (compose replaces lists): apart from the security
    flags they must equal compose.yml's, and no private CA key may be mounted anywhere."""
    base, tls, auth = _services("compose.yml"), _services("with-tls.yml"), _services("with-auth.yml")
    security = ("--insecure", "--ssl-", "--root-certificates", "--enable-supernode-auth", "--auth-supernode-",
                "--superexec-auth-secret-file")
    for overlay in (tls, auth):
        for name, service in overlay.items():
            assert _without(service["command"], security) == _without(base[name]["command"], security), name
            assert not any("ca.key" in v for v in service.get("volumes", [])), name
            if not name.startswith("clientapp-"):  # a SuperNode's own Runtime API stays on its site network
                assert "--insecure" not in service["command"], name
    assert "--enable-supernode-auth" in auth["superlink"]["command"]
    for site in range(SITES):
        command = auth[f"supernode-{site}"]["command"]
        assert f"--auth-supernode-private-key=/app/keys/supernode-{site}" in command
        assert "--root-certificates=/app/certs/ca.pem" in command
    assert "--root-certificates=/app/certs/ca.pem" in tls["serverapp"]["command"]
    # every Runtime API demands its SuperExec's shared secret: the server's, and each site's own
    secret = "--superexec-auth-secret-file=/app/secrets/{}.secret"
    assert secret.format("superexec") in auth["superlink"]["command"] and secret.format("superexec") in auth["serverapp"]["command"]
    for site in range(SITES):
        assert secret.format(f"site-{site}") in auth[f"supernode-{site}"]["command"]
        assert secret.format(f"site-{site}") in auth[f"clientapp-{site}"]["command"]


def _networks(service: dict) -> dict[str, dict]:
    """A service's networks as ``{name: settings}`` (compose accepts a list or a mapping)."""
    nets = service.get("networks", [])
    return {name: {} for name in nets} if isinstance(nets, list) else {k: v or {} for k, v in nets.items()}


def _option(command: list[str], flag: str) -> str | None:
    return next((arg.split("=", 1)[1] for arg in command if arg.startswith(flag + "=")), None)


def test_sites_cannot_reach_each_others_supernodes() -> None:
    """A SuperNode's Runtime API (9094: whoever reaches it can take the site's tasks) listens only on its own
    site network, under a name that exists there alone; that network holds the SuperNode and the site's
    ClientApp SuperExec only and has no route out; nothing publishes 9094."""
    compose = yaml.safe_load((DOCKER / "compose.yml").read_text())
    base = compose["services"]
    assert base["superlink"]["networks"] == ["federation"] and base["serverapp"]["networks"] == ["federation"]
    for site in range(SITES):
        name, alias = f"site-{site}", f"site-{site}-supernode"
        node, app = base[f"supernode-{site}"], base[f"clientapp-{site}"]
        nets = _networks(node)
        assert set(nets) == {"federation", name}
        assert nets[name].get("aliases") == [alias] and not nets["federation"].get("aliases")
        assert _networks(app) == {name: {}}
        assert compose["networks"][name] == {"internal": True}
        members = [s for s, service in base.items() if name in _networks(service)]
        assert sorted(members) == [f"clientapp-{site}", f"supernode-{site}"]
        for file in ("compose.yml", "with-tls.yml", "with-auth.yml"):  # the overlays restate the command
            command = _services(file)[f"supernode-{site}"]["command"]
            assert _option(command, "--host") == alias and _option(command, "--port") == "9094", file
            assert _option(_services(file).get(f"clientapp-{site}", app)["command"], "--runtime-api-address") \
                == f"{alias}:9094", file
        assert "ports" not in node and "ports" not in app
    aliases = [a for service in base.values() for settings in _networks(service).values()
               for a in settings.get("aliases", [])]
    assert len(aliases) == len(set(aliases)) == SITES


# ------------------------------------------------------------------ the drills' faulty SuperNode
def test_the_faulty_supernode_sends_withheld_replies_without_their_objects() -> None:
    """ops.deploy.faulty_supernode, as Flower's SuperNode loop calls it: a train reply is registered
    (sent with its object tree) and none of its objects is pushed; an evaluate reply travels whole."""
    from types import SimpleNamespace

    from ops.deploy import faulty_supernode

    withheld, rest = faulty_supernode.split_args(["--insecure", "--withhold-replies=train", "--port", "9"])
    assert withheld == {"train"} and rest == ["--insecure", "--port", "9"]
    sent, pushed = [], []

    def flower_push_messages(*, state, object_store, send, push_object):  # the shape of Flower's _push_messages
        for kind in state:
            message = SimpleNamespace(metadata=SimpleNamespace(message_type=kind, message_id=f"r-{kind}"))
            to_push, session = send(message, f"tree-{kind}", 0.1)
            for object_id in sorted(to_push):
                push_object(1, session, object_id, b"x")

    def send(message, tree, runtime):
        sent.append(tree)
        return {f"{message.metadata.message_type}-a", f"{message.metadata.message_type}-b"}, f"s-{tree}"

    faulty = faulty_supernode.withholding(flower_push_messages, withheld)
    faulty(state=["train", "evaluate"], object_store=None, send=send,
           push_object=lambda run, session, object_id, content: pushed.append(object_id))
    assert sent == ["tree-train", "tree-evaluate"]
    assert pushed == ["evaluate-a", "evaluate-b"]
