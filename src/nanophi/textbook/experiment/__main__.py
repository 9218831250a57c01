"""`python -m nanophi.textbook.experiment`: the same as `nanophi textbook experiment`."""

from nanophi.textbook.experiment.runner import main

if __name__ == "__main__":
    raise SystemExit(main())
