"""Pure decisions, no I/O: the state tables, the one backoff, every timeout, node-set
rules and placement. Imports nothing outside `freshpool.core`; what it needs of the
config it names as protocols, which the config's models satisfy."""
