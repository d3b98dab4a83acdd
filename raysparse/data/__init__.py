"""Data: readers and validation, converters, synthetic data, vocabularies, splits and item text."""
