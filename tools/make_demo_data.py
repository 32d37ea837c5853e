"""Generate the built-in demo dataset in data/: synthetic, endoscopy-like pictures in three grades.

    python tools/make_demo_data.py                       # rewrite data/mild, data/moderate, data/severe
    python tools/make_demo_data.py --out /tmp/demo --per-class 10 --size 128

The pictures are made by ucgrade/demo.py; they are not real colonoscopy images.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ucgrade.demo import GRADES, get_args_parser, make_dataset  # noqa: E402

if __name__ == "__main__":
    args = get_args_parser().parse_args()
    out = make_dataset(args.out, args.per_class, args.size, args.seed)
    print(f"wrote {args.per_class * len(GRADES)} images to {out}")
