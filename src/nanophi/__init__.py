"""nanophi: build, train, debug and serve small GPTs, and make the textbook-quality data they learn from.

Importing this package does no work: every submodule is imported on demand.
"""

__version__ = "0.1.0"
