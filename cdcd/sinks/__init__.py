"""Where planned writes go: Redis (versioned compare-and-set) and the dead-letter destinations."""
