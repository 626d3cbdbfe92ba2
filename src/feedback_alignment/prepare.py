"""Prepare a dataset once: digits and cifar10 into a uint8 tensor cache; imagenet checked in place
(its official tarballs unpacked there, once) and described by a manifest.

    python -m feedback_alignment prepare --dataset cifar10 --out resources/data/cifar10.pt
    python -m feedback_alignment prepare --dataset imagenet --path /data/imagenet --out resources/data/imagenet.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import data
from .provenance import write_json


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m feedback_alignment prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, choices=data.DATASETS)
    parser.add_argument("--out", required=True, help="cache file (.pt) or, for imagenet, manifest (.json)")
    parser.add_argument("--url", default=data.CIFAR10_URL, help="cifar10: archive address (a mirror)")
    parser.add_argument("--md5", default=data.CIFAR10_MD5, help="cifar10: expected md5 of the archive")
    parser.add_argument("--val-size", type=int, default=None, help="images held out for validation")
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--path", help="imagenet: folder with train/ and val/, or the official tarballs")
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        if args.dataset == "digits":
            data.prepare_digits(out, val_size=args.val_size or 180, split_seed=args.split_seed)
        elif args.dataset == "cifar10":
            data.prepare_cifar10(out, url=args.url, md5=args.md5 or None,
                                 val_size=args.val_size or 5000, split_seed=args.split_seed)
        else:
            if not args.path:
                raise data.DataError("imagenet needs --path (datasets.imagenet.path in the config)")
            write_json(out, data.prepare_imagenet(args.path, val_size=args.val_size or 10000,
                                                  split_seed=args.split_seed))
    except data.DataError as error:
        sys.exit(f"prepare: {error}")


if __name__ == "__main__":
    main()
