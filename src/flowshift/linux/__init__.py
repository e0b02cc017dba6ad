"""The real Linux kernel beside flowshift: a router in namespaces and the differential check."""
