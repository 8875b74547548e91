"""Training machinery shared by the three methods: mesh and sharding, optimizer, checkpoints, metrics, loop."""
