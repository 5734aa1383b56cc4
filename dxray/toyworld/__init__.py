"""The planted-bias toy world: a tiny synthetic benchmark with a known answer."""
