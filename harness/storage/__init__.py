"""What is written to disk: run records, atomic checksummed writes, integrity, locks."""
