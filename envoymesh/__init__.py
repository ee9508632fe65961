"""Pieces shared by the envoymesh commands (logging, local process helpers)."""
