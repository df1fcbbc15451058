"""Deploying feda2v the way Flower users do: processes on one host, hosts in network namespaces,
containers in docker compose, with TLS and SuperNode authentication.

- :mod:`ops.deploy.pki`: the CA, the SuperLink's certificate and the SuperNodes' key pairs.
- :mod:`ops.deploy.local`: a real SuperLink and SuperNodes as processes (loopback or namespaces).
- :mod:`ops.deploy.netns`: separate "hosts" made of Linux network namespaces.
- :mod:`ops.deploy.images`: the docker images (with an offline base for machines without Docker Hub).
- :mod:`ops.deploy.compose`: the compose federation in ``docker/``.
- :mod:`ops.deploy.drills`: fault drills on a running federation.
"""
