"""What both services use: the shard contract (SPEC §6), storage and configuration."""
