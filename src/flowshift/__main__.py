"""`python -m flowshift`: the same command line as `flowshift`."""

from flowshift.cli import main

if __name__ == "__main__":
    main(prog_name="flowshift")
