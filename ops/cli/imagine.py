"""``feda2v imagine``: pictures from your own audio files, through a run's or an exported pipeline.

Any length, rate or channel count.

Parses the arguments and calls :func:`common.imagine.job.imagine_files`, which documents the output
folder; :mod:`common.imagine.inputs` says how a file becomes a clip, :mod:`common.imagine.pipeline`
what "nearest class" means and where the image seeds come from.
"""

from __future__ import annotations

import argparse

from ops.cli.options import add_pipeline_options, pipeline_from_args

SHOWN = 20  # clips whose nearest class is printed


def cmd_imagine(args: argparse.Namespace) -> int:
    from common.imagine.job import imagine_files

    pipe = pipeline_from_args(args)
    if args.max_file_mb:
        from dataclasses import replace

        pipe.audio = replace(pipe.audio, max_file_mb=args.max_file_mb)
    report = imagine_files(pipe, args.audio, args.out, n=args.n or None, progress=not args.no_progress)
    print(f"{report.images} image(s) from {report.clips} clip(s) under {args.out} ({report.clips_per_s:.2f} clips/s); "
          f"{len(report.failed)} file(s) skipped")
    firsts = [e for e in report.entries if e["index"] == 1]
    for entry in firsts[:SHOWN]:
        print(f"  {entry['source']}: {entry['nearest']} ({entry['similarity']:.3f})")
    if len(firsts) > SHOWN:
        print(f"  ... and {len(firsts) - SHOWN} more: {args.out}/manifest.jsonl, {args.out}/contact_sheet.png")
    return 0 if report.clips or not report.failed else 1


def add_parser(sub) -> None:
    p = sub.add_parser("imagine", help="images from your own audio files (a run's or an exported pipeline)",
                       description=__doc__.splitlines()[0])
    p.add_argument("audio", nargs="+", metavar="AUDIO", help="audio files or folders (searched recursively)")
    add_pipeline_options(p)
    p.add_argument("--out", default="imagined", help="output folder (default ./imagined)")
    p.add_argument("-n", type=int, default=0, help="images per clip (default: the run's render.images-per-class, 2)")
    p.add_argument("--max-file-mb", type=float, default=0.0,
                   help="refuse files larger than this many MiB (default: the run's data.max-file-mb)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_imagine)
