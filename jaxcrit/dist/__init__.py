"""Several devices and processes: the mesh and its axis rules, process start-up, the coordinator."""
