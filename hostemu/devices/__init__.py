"""Host device models, each run as its own process by :mod:`hostemu.devices.__main__`."""
