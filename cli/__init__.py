"""deltactl, the command line: thin commands over codec and registry.client (no logic here)."""
