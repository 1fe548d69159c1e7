"""cdcd: CDC-driven cache invalidation (daemon) and its companion cache client (cdcd.client)."""

__version__ = "0.1.0"
