"""Generate the built-in demo dataset in data/: synthetic, endoscopy-like pictures in three grades.

    python tools/make_demo_data.py                       # rewrite data/mild, data/moderate, data/severe
    python tools/make_demo_data.py --out /tmp/demo --per-class 10 --size 128
    python tools/make_demo_data.py --out /tmp/mayo --mayo 400   # Mayo 0-3, overlapping, imbalanced, patients.csv

The pictures are made by ucgrade/demo.py; they are not real colonoscopy images.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ucgrade.demo import GRADES, get_args_parser, make_dataset, make_mayo_dataset  # noqa: E402

if __name__ == "__main__":
    args = get_args_parser().parse_args()
    if args.mayo:
        out = make_mayo_dataset(args.out, args.mayo, args.size, args.seed)
        print(f"wrote {args.mayo} images in mayo0..mayo3 and patients.csv to {out}")
    else:
        out = make_dataset(args.out, args.per_class, args.size, args.seed)
        print(f"wrote {args.per_class * len(GRADES)} images to {out}")
