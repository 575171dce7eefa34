"""The user-space WAN link emulator: `wanps linkem` (delay, bandwidth traces, faults).

`trace` (link traces and their CSV format), `faults` (fault schedules), `shaper` (one
direction of the link: serializer, queue, delay), `proxy` (the TCP proxy, `LinkEmulator`),
`cli` (the `wanps linkem` command).
"""
