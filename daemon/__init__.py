"""background-sync: keeps every user of an application freshly synced with its backend."""

__version__ = "0.1.0"
