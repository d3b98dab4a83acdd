"""raysparse."""
