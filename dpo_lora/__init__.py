"""dpo-lora: DPO training of LoRA adapters on quantized base models under DeepSpeed."""

__version__ = "0.1.0"
