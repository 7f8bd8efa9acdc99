"""`python -m pipeline.sample_data [DIR]`: the public command that writes the sample data set.

The generator lives in pipeline/data/sample_data.py; this shim keeps the command where users type it.
"""

import sys

from pipeline.data.sample_data import main

if __name__ == "__main__":
    sys.exit(main())
