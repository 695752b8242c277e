"""Device profiles and serial-sensor drivers."""
