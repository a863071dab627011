"""`mambakit data NAME`: build and cache a data set that no package ships (today: spoken-digits, with espeak-ng)."""

from __future__ import annotations

from .errors import Parser, UsageError, positive_int

SUMMARY = "build a data set locally: spoken-digits (SC09-like '0'..'9' clips, synthesised with espeak-ng)"

EXAMPLES = """\
examples:
  mambakit data spoken-digits
      all 280 speakers (7 English accents x 40 voice variants) x 10 digits x 2 takes, 16 kHz 1 s WAVs,
      into ~/.cache/mambakit/spoken-digits ($MAMBAKIT_DATA/spoken-digits when set); a few minutes
  mambakit data spoken-digits --speakers 40 --out data/spoken-digits
      a smaller set where you choose

needs espeak-ng (sudo apt-get install espeak-ng, or brew install espeak-ng); the split into train / validation /
test is by speaker and fixed. `mambakit reproduce spoken-digits` reads the set from the default place."""


def build_parser(prog: str = "mambakit data") -> Parser:
    p = Parser(prog=prog, description=SUMMARY, epilog=EXAMPLES)
    p.add_argument("name", choices=["spoken-digits"], metavar="NAME", help="spoken-digits")
    p.add_argument("--out", metavar="DIR", help="where to write it (default: ~/.cache/mambakit/spoken-digits)")
    p.add_argument("--speakers", type=positive_int, metavar="N", help="use N of the 280 speakers (default all)")
    p.add_argument("--takes", type=positive_int, default=2, metavar="K", help="clips per speaker and digit (default 2)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the speakers' rates and pitches")
    p.add_argument("--jobs", type=positive_int, metavar="N",
                   help="espeak-ng processes at once (default: the CPU count; the set does not depend on it)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def main(name: str, out: str | None = None, speakers: int | None = None, takes: int = 2, seed: int = 0,
         progress: bool = True, jobs: int | None = None) -> int:
    """Build data set `name`; returns 0 (2 with a one-line error when espeak-ng is missing).

    Examples:
        mambakit data spoken-digits
        mambakit data spoken-digits --speakers 40 --out data/spoken-digits
    """
    import json

    from ..data import DataError
    from ..data.spoken_digits import build_spoken_digits

    try:
        root = build_spoken_digits(out, speakers=speakers, takes=takes, seed=seed, progress=progress, jobs=jobs)
    except DataError as err:
        raise UsageError(str(err)) from None
    clips = json.loads((root / "manifest.json").read_text())["clips"]
    counts = {split: sum(c["split"] == split for c in clips) for split in ("train", "validation", "test")}
    print(f"wrote {len(clips)} clips to {root} ({', '.join(f'{k} {v}' for k, v in counts.items())})")
    return 0
