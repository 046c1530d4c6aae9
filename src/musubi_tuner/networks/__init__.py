"""Network modules for `--network_module` (e.g. `networks.lora`)."""
