"""One module per CLI verb: train, config, eval, generate, export, plan, fetch, plot."""
