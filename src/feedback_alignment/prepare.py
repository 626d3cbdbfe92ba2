"""Prepare a dataset once: into a uint8 tensor cache (.pt), or for imagenet checked in place (its
official tarballs unpacked there, once) and described by a manifest (.json). Its options are
those of its kind (sources.py); the study's prepare step passes them from the config.

    python -m feedback_alignment prepare --name digits --out resources/data/digits.pt
    python -m feedback_alignment prepare --name fmnist --kind fashion_mnist --image-size 32 --out resources/data/fmnist.pt
    python -m feedback_alignment prepare --name pets --kind imagefolder --path /data/pets --out resources/data/pets.pt
    python -m feedback_alignment prepare --name imagenet --path /data/imagenet --out resources/data/imagenet.json
"""
from __future__ import annotations

import argparse
import sys

from .data import DataError
from .sources import KINDS, prepare

# Every kind's options by name (a name shared by kinds parses the same way in each).
OPTIONS = {option.name: option for kind in KINDS.values() for option in kind.options}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m feedback_alignment prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="the dataset's name in the study (recorded in the cache)")
    parser.add_argument("--kind", default=None, choices=KINDS, help="default: the name, when it is a kind")
    parser.add_argument("--out", required=True, help="cache file (.pt) or, for imagenet, manifest (.json)")
    for name, option in OPTIONS.items():
        users = ", ".join(kind.name for kind in KINDS.values() if name in {o.name for o in kind.options})
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None,
                            nargs="+" if name == "md5" else None, help=f"{users}: {option.help}")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    given = {key: value for key, value in vars(args).items()
             if key not in ("name", "kind", "out") and value is not None}
    config = dict(given, **({"kind": args.kind} if args.kind else {}))
    try:
        for key, value in given.items():
            try:
                config[key] = OPTIONS[key].parse(value)
            except ValueError:
                raise DataError(f"--{key.replace('_', '-')} {value!r}: not a valid value") from None
        prepare(args.out, args.name, config)
    except DataError as error:
        sys.exit(f"prepare: {error}")


if __name__ == "__main__":
    main()
