"""Conformance: vbusemu's broker next to the real KVM, scenario by scenario.

:mod:`~hostemu.conform.scenarios` (the library, as data), :mod:`~hostemu.conform.backends`
(how each side runs a step and what it observes), :mod:`~hostemu.conform.deviations`
(what differs on purpose or is known and open), :mod:`~hostemu.conform.run` (compare,
tabulate; ``vbusemu conform``).
"""
