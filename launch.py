"""Train or test TDS-CLIP.

    torchrun --nproc_per_node=8 launch.py --cfg configs/sthv2/vitb16.yaml [key.sub=value ...]
    python launch.py --cfg configs/demo.yaml --resume            # continue output_dir/last.pt
    python launch.py --cfg configs/demo.yaml --resume auto       # continue if last.pt exists, else start (requeued jobs)
    python launch.py --cfg configs/k400/vitb16.yaml --test --weights best.pt --test-crops 3 --test-clips 4

Exit status: 0 done; 1 an error (one line names its file, key or cause); 2 a bad command line or config;
130 / 143 / 138 stopped by Ctrl-C / SIGTERM / SIGUSR1 after writing last.pt (rerun with --resume).
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", required=True, help="YAML run config (configs/...)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4")
    parser.add_argument("--resume", nargs="?", const="yes", metavar="auto",
                        help="continue from output_dir/last.pt (an error if there is none); "
                             "'--resume auto': continue if it exists, else start")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in an output_dir that holds an earlier run's checkpoints (deletes them)")
    parser.add_argument("--test", action="store_true", help="evaluate --weights multi-view, no training")
    parser.add_argument("--weights", help="checkpoint to test (this project's or an official TDS-CLIP one)")
    parser.add_argument("--test-crops", type=int, help="spatial crops per video: 1, 3, 5 or 10 (sets eval.test_crops)")
    parser.add_argument("--test-clips", type=int, help="temporal clips per video (sets eval.test_clips)")
    args = parser.parse_intermixed_args(argv)  # overrides may come before and after the flags
    if args.resume not in (None, "yes", "auto"):
        if "=" not in args.resume:
            parser.error(f"--resume takes no value or 'auto', got {args.resume!r}; to resume from another "
                         "checkpoint, copy it to output_dir/last.pt")
        args.overrides.append(args.resume)  # `--resume key=value`: the value is an override
        args.resume = "yes"
    if args.test and not args.weights:
        parser.error("--test needs --weights PATH")
    if args.weights and not args.test:
        parser.error("--weights is for --test; to continue a training run use --resume")
    if args.resume and (args.overwrite or args.test):
        parser.error("--resume continues a training run: not with --overwrite or --test")
    for flag in ("test_crops", "test_clips"):  # the config validates them and records them with the results
        if getattr(args, flag) is not None:
            args.overrides.append(f"eval.{flag}={getattr(args, flag)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from tdsclip.config import ConfigError, load_config  # quick: a config error comes before torch is imported

    try:
        config = load_config(args.cfg, args.overrides)
    except ConfigError as error:
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:  # the ranks of a node read the same config: say it once
            print(f"config error: {error}", file=sys.stderr)
        return 2
    from tdsclip.run import run

    return run(config, args)


if __name__ == "__main__":
    sys.exit(main())
