"""spacesync: keeps a Matrix Space's child rooms in step with the Space."""

__version__ = "0.1.0"
