"""A run of the pipeline: config validation, the stage table, the runner and the memory plan."""
