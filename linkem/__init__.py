"""The user-space WAN link emulator: `wanps linkem` (delay, bandwidth traces, faults)."""
