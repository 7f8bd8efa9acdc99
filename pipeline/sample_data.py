"""`python -m pipeline.sample_data [DIR]`: the public command that writes the sample data set (pipeline/data/sample_data.py)."""

import sys

from pipeline.data.sample_data import main

if __name__ == "__main__":
    sys.exit(main())
