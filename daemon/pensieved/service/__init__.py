"""Role: the service: server start/stop, control socket, launchd plist and systemd unit, sd_notify.
Imports: every layer below it; only pensieved.cli (the top) imports it.
"""
