"""``python -m certood``: the same command line as ``certood``."""
from certood.cli import main

if __name__ == "__main__":
    main(prog_name="certood")
