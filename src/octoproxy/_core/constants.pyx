# cython: language_level=3
"""The protocol's and the data path's numbers as Python enums (constants.pxd)."""
