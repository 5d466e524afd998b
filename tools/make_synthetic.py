"""Write a synthetic labelled video dataset: textured shapes moving in the class's direction over a
drifting background, so the label is in the motion, not in any single frame.

    python tools/make_synthetic.py OUT [--num-classes 4] [--videos-per-class 80] [--val-per-class 20]
        [--frames 32] [--size 96] [--seed 0] [--layout video|frames] [--image-tmpl img_{:05d}.jpg]

Layout video writes OUT/videos/{train,val}/*.mp4 (H.264) and lists `<relpath> <label>`; layout frames
writes OUT/frames/{train,val}/<name>/img_00001.jpg... and lists `<folder> <num frames> <label>`. Both
write OUT/train.txt, OUT/val.txt and OUT/labels.csv, ready for tools/make_shards.py --root OUT.
"""

import argparse
import sys
import time
from pathlib import Path

from shards.sources import IMAGE_TMPL, check_image_tmpl
from shards.synthetic import MotionSpec, make_motion_dataset


def main(argv: list[str] | None = None) -> int:
    defaults = MotionSpec()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="output directory")
    p.add_argument("--num-classes", type=int, default=defaults.num_classes, help="directions of motion, 2-8 (default: %(default)s)")
    p.add_argument("--videos-per-class", type=int, default=80, help="training videos per class (default: %(default)s)")
    p.add_argument("--val-per-class", type=int, default=20, help="validation videos per class (default: %(default)s)")
    p.add_argument("--frames", type=int, default=defaults.num_frames, help="frames per video (default: %(default)s)")
    p.add_argument("--size", type=int, default=defaults.size, help="frame height and width, even (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--layout", choices=["video", "frames"], default="video",
                   help="raw .mp4 videos or frame folders of JPEGs (default: %(default)s)")
    p.add_argument("--image-tmpl", default=IMAGE_TMPL, help="frame file names, layout frames (default: %(default)s)")
    args = p.parse_args(argv)
    if args.videos_per_class < 1 or args.val_per_class < 1:
        p.error("--videos-per-class and --val-per-class must be >= 1")
    try:
        spec = MotionSpec(num_classes=args.num_classes, num_frames=args.frames, size=args.size)
        check_image_tmpl(args.image_tmpl)
    except ValueError as error:
        p.error(str(error))
    start = time.perf_counter()
    counts = make_motion_dataset(args.out, spec, train_per_class=args.videos_per_class,
                                 val_per_class=args.val_per_class, seed=args.seed, layout=args.layout,
                                 image_tmpl=args.image_tmpl)
    print(f"{args.out}: {counts['train']} train + {counts['val']} val {args.layout} samples, "
          f"{spec.num_classes} classes, {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
