"""What cloud drivers share: blocking SDK calls kept off the launcher's loop, calls
batched across nodes, and each node's SSH keys and first-boot user data."""
