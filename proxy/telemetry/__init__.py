"""The bottom layer: logs, metrics and time stamps. Every other package may use it; it imports
nothing of authproxy's."""
