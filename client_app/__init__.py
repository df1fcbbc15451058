"""Client side of feda2v: the ClientApp and a node's data pipeline."""
