"""`python -m nanophi ...` is `nanophi ...`; torchrun needs it: `torchrun --nproc_per_node 2 -m nanophi train ...`."""

import sys

from nanophi.cli import main

if __name__ == "__main__":
    sys.exit(main())
