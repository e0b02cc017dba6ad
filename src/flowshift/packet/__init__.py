"""The packet layer: parsing, building, checksums, rewriting and trace I/O."""
