"""The Cython core: frame codec, route table, load balancers, per-connection data path."""
