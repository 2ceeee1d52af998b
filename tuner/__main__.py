"""`python -m tuner` is the `tuner` console script."""

from tuner.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
