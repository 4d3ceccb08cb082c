"""drafter: keep speculative-decoding drafters matched to the traffic a target serves."""

from drafter.state import configure_environment

__version__ = "0.1.0"

# Embedded, offline, telemetry-free defaults before any library reads its settings.
STATE = configure_environment()
