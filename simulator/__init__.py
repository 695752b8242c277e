"""Emulated terminals, brokers, fleets and the reference hub."""
