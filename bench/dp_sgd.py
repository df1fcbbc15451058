"""What DP-SGD costs one site, in isolation: plain adapter training against each clipping mode.

One site's round as the default federation schedules it (93 training clips, batch 32, ``train.local-epochs``
epochs: the same number of steps in every mode), on random embeddings of the default shape (tiny AST,
``audio-encoder.tokens`` tokens) toward random class targets in FLUX.1's spaces, for each ``--hidden``
width of the adapters. Timed: :func:`common.training.train_adapters` (plain) and
:func:`common.privacy.dp_sgd.train_adapters_dp` in each of ``--modes``; each timing is the best of
``--repeats`` (the machine's other work only ever adds time). Threads: ``--threads`` (1 = a site sharing the
host with others, as in the federation bench).

Usage:  python bench/dp_sgd.py [--hidden 64,512] [--modes book-keeping,per-sample,ghost] [--repeats 2]
Last line of output: one JSON object: per width, the adapters' weight count, seconds per round per mode and
each mode's ratio to plain training.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
from record import add_record_argument, emit  # the sibling module (bench/ is sys.path[0])

from common.config import load_config
from common.logs import setup_logging
from common.models.adapters import AdapterConfig, Adapters
from common.privacy.dp_sgd import MODES, DPSGDSettings, train_adapters_dp
from common.training import TrainSettings, train_adapters

log = logging.getLogger("bench.dp_sgd")
ROWS, CLASSES = 93, 10  # one site's training clips and classes in the default federation


def time_width(hidden: int, modes: list[str], repeats: int) -> dict:
    """Seconds per round, plain and per mode, for adapters ``hidden`` wide."""
    cfg = load_config({"adapter.hidden-dim": hidden})
    acfg = AdapterConfig.from_sections(cfg.adapter, cfg.audio_encoder, cfg.text_encoder)
    settings = TrainSettings.from_config(cfg.train, cfg.seed)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(ROWS, acfg.in_tokens, acfg.in_dim, generator=g)
    y = torch.randint(0, CLASSES, (ROWS,), generator=g)
    tc = torch.randn(CLASSES, acfg.clip_dim, generator=g)
    tt = torch.randn(CLASSES, acfg.t5_tokens, acfg.t5_dim, generator=g)
    dp = DPSGDSettings.schedule(ROWS, settings.batch_size, settings.epochs, 1.0, cfg.privacy.max_grad_norm)
    runs = {"plain": lambda a: train_adapters(a, x, y, tc, tt, settings)}
    for mode in modes:
        runs[mode] = lambda a, mode=mode: train_adapters_dp(a, x, y, tc, tt, settings, dp, mode=mode)
    seconds = {}
    for name, run in runs.items():
        best = float("inf")
        for _ in range(repeats):
            adapters = Adapters.seeded(acfg, cfg.seed)
            start = time.perf_counter()
            run(adapters)
            best = min(best, time.perf_counter() - start)
        seconds[name] = round(best, 3)
        log.info("hidden %d, %s: %.2f s", hidden, name, best)
    weights = sum(p.numel() for p in Adapters(acfg).parameters())
    return {"weights": weights, "steps": dp.steps, "expected_batch": round(dp.sample_rate * ROWS),
            "seconds": seconds, "ratio_to_plain": {m: round(seconds[m] / seconds["plain"], 2) for m in modes}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", default="64,512", help="adapter.hidden-dim values, comma-separated")
    parser.add_argument("--modes", default=",".join(MODES), help=f"DP-SGD modes to time, from {', '.join(MODES)}")
    parser.add_argument("--repeats", type=int, default=2, help="timings per case; the best is kept")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    add_record_argument(parser)
    args = parser.parse_args()
    setup_logging()
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"--modes: unknown mode(s) {', '.join(unknown)}; known: {', '.join(MODES)}")
    torch.set_num_threads(args.threads)
    result = {"threads": args.threads, "rows": ROWS,
              "widths": {str(h): time_width(int(h), modes, args.repeats) for h in args.hidden.split(",")}}
    emit(result, record=args.record)


if __name__ == "__main__":
    main()
