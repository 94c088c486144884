"""Datasets: ``prepare`` turns sources into the HDF5 layout, ``shard`` reads one rank's part of it."""
