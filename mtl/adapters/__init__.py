"""Parameter-efficient adapters injected into backbones: LoRA and MTLoRA."""
