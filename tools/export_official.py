#!/usr/bin/env python
"""Export a TDS-CLIP checkpoint to the official training script's layout (BBYL9413/TDS-CLIP).

The output is ``{"epoch", "model_state_dict", "optimizer_state_dict": {}}`` with official key names,
loadable by the official test_vision.py (``--weights``) or as ``pretrain`` in train_vision.py.

  python tools/export_official.py runs/k400/best.pt tdsclip_k400_official.pt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tdsclip.checkpoint_file import CheckpointError
from tdsclip.weights import export_official, load_model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="a tdsclip checkpoint (or an official one, to re-save it)")
    p.add_argument("output", type=Path, help="where to write the official-layout file")
    p.add_argument("--epoch", type=int, default=0, help="the 'epoch' entry of the official file (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        model = load_model(args.checkpoint)
        export_official(model, args.output, epoch=args.epoch)
    except (FileNotFoundError, CheckpointError, ValueError) as e:  # ValueError: a model the official code cannot express
        print(f"error: {e}", file=sys.stderr)
        return 1
    c = model.config
    print(f"wrote {args.output}: {c.arch or 'custom'} width {c.width}, {c.layers} layers, side_dim {c.side_dim}, "
          f"{c.num_classes} classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
