"""The fleet: inventory, OpenSSH transport, per-host facts, doctor checks, ssh-setup."""
