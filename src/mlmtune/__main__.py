"""`python -m mlmtune` runs the same CLI as the `mlmtune` console script."""

from mlmtune.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
