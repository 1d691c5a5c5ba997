"""What the drivers whose nodes run on this host (local, qemu) share."""
