"""`make bench`: the pipeline against the classic recipe, and where the time goes. Nothing outside bench/ imports it."""
