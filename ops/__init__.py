"""Operations: everything that runs, deploys or drives feda2v, and that the apps never import.

- :mod:`ops.cli`: the ``feda2v`` command line.
- :mod:`ops.launcher`: ``flwr run`` with a SuperLink of its own per launch.
- :mod:`ops.local_run`: the ServerApp's and ClientApps' handlers driven in one process (benches, tests).
- :mod:`ops.deploy`: PKI, SuperLink and SuperNode processes, network namespaces, docker images and
  compose, fault drills, and the SuperNode's prompt polling and warm SuperExec.

Why a package of its own: the ServerApp and ClientApp must not depend on deployment tooling, and a
SuperNode host (Flower and the standard library) must be able to start ``feda2v-supernode`` without
torch or the apps. This top level therefore imports nothing; each submodule imports what it needs.
"""
