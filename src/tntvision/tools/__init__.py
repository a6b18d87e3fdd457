"""Small modules behind the CLI's sub-commands (info, bench, predict, visualize, export, ...)."""
