"""The API process's side of hand-outs: the scheduler (one way to run a pass), the
planner it runs inside the store's transaction, and the long-polls' waiters. The
direct path a CLI takes when no `serve` runs is here too."""
