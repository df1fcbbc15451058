"""Docker deployment costs: image build times (cold and warm), image sizes, and a compose federation
with TLS and SuperNode authentication running 2 rounds (start, run and ``down -v`` times, the final status).

``--cold`` starts from an empty wheelhouse in the work folder (never the user's: that one is neither
used nor deleted) and first deletes the offline base, the feda2v images and docker's build cache, so
the build starts from nothing but the package registries (as on a fresh CI machine).
Prints one JSON object as its last line.

    python bench/deploy.py [--cold] [--tag bench] [--work DIR]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from record import add_record_argument, emit  # the sibling module (bench/ is sys.path[0])
from workspace import isolated_cache  # the sibling module (bench/ is this script's sys.path[0])

from common.config import default_cache_dir
from common.logs import setup_logging
from ops.deploy.compose import NUM_SITES, ComposeFederation
from ops.deploy.images import OFFLINE_BASE, ROLES, ROOTFS_IMAGE, build_images, docker_ready

log = logging.getLogger("bench.deploy")


def forget_images(tag: str, work: Path) -> None:
    """Everything a cold build would not have. The wheelhouse starts empty in the work folder (the cache
    goes there, :func:`workspace.isolated_cache`): the user's own wheelhouse is neither used nor deleted."""
    isolated_cache(folder=work / "cache")
    shutil.rmtree(default_cache_dir() / "wheelhouse", ignore_errors=True)
    names = [f"feda2v/{role}:{tag}" for role in ROLES] + [OFFLINE_BASE, ROOTFS_IMAGE]
    subprocess.run(["docker", "rmi", "-f", *names], capture_output=True, check=False, timeout=600)
    subprocess.run(["docker", "builder", "prune", "-af"], capture_output=True, check=False, timeout=600)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cold", action="store_true")
    parser.add_argument("--tag", default="bench")
    parser.add_argument("--work", default="")
    add_record_argument(parser)
    args = parser.parse_args()
    setup_logging()
    reason = docker_ready()
    if reason:
        raise SystemExit(f"needs a Docker engine: {reason}")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="feda2v-bench-deploy-"))
    if args.cold:
        forget_images(args.tag, work)
    t0 = time.monotonic()
    first = build_images(args.tag, offline=True)
    first_s = round(time.monotonic() - t0, 1)
    t0 = time.monotonic()
    build_images(args.tag, offline=True)
    warm_s = round(time.monotonic() - t0, 1)

    fed = ComposeFederation(work / "compose", args.tag, secure=True)
    t0 = time.monotonic()
    try:
        fed.start()
        start_s = round(time.monotonic() - t0, 1)
        run_config = " ".join([f"num-rounds=2 min-nodes={NUM_SITES} data.num-classes=4 data.clips-per-class=8",
                               'train.local-epochs=2 run-name="bench"'])
        result = fed.run([run_config], timeout=900)
        ps = fed.status()
    finally:
        t0 = time.monotonic()
        down = fed.down()
        down_s = round(time.monotonic() - t0, 1)
    log.info("compose ps before down:\n%s", ps)
    report = {
        "build_cold" if args.cold else "build_first": {"total_s": first_s, **first.seconds},
        "build_warm_s": warm_s,
        "image_size_mb": first.sizes_mb(),
        "compose": {"start_s": start_s, "run_s": round(result.seconds, 1), "down_s": down_s,
                    "status": (result.status or {}).get("status"), "problem": result.problem,
                    "run_id": result.run_id, "volumes_left": len(fed.volumes())},
        "final_status": result.status,  # `flwr ls --run-id ID --format json` on the compose SuperLink
        "compose_ps": ps.strip().splitlines(),
        "down_transcript": down.strip().splitlines()[-3:],
    }
    emit(report, record=args.record)
    return 0 if result.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
