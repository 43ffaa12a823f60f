"""feeder: republish a folder of article files as RSS, Atom and JSON feeds."""

__version__ = "0.1.0"
