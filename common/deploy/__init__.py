"""Deploying feda2v the way Flower users do: processes on one host, hosts in network namespaces,
containers in docker compose, with TLS and SuperNode authentication.

- :mod:`common.deploy.pki`: the CA, the SuperLink's certificate and the SuperNodes' key pairs.
- :mod:`common.deploy.local`: a real SuperLink and SuperNodes as processes (loopback or namespaces).
- :mod:`common.deploy.netns`: separate "hosts" made of Linux network namespaces.
- :mod:`common.deploy.images`: the docker images (with an offline base for machines without Docker Hub).
- :mod:`common.deploy.compose`: the compose federation in ``docker/``.
- :mod:`common.deploy.drills`: fault drills on a running federation.
"""
