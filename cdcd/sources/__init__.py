"""Change sources: each turns an external stream into committed :class:`~cdcd.change.Transaction` objects."""
