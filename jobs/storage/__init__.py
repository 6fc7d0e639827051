"""The Delta tables of a run: native and embedded backends, every table's schema and key, write owners."""
