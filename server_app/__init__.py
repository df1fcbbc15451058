"""Server side of feda2v: the ServerApp, its Strategy and the run summary."""
