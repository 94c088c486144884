"""Federated mode: rank 0 aggregates, ranks 1… host clients whose data never leaves them."""
