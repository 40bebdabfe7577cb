"""What every part shares: the config tree, errors, ranks and collectives, DeepSpeed JSON, the run folder's layout."""
