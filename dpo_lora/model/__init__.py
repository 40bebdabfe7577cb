"""The quantized base and its adapter: loading, precision, ZeRO-3 loading, checkpointing, log-prob kernels, memory plan."""
