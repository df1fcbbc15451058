"""feda2v shared library: configuration, data, models and training code used by the server and client apps."""
