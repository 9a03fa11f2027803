"""Model surgery: model names to weights on disk (:mod:`.models`), client and server
segments of one model (:mod:`.split`), LoRA adapters with per-weight ranks (:mod:`.lora`)."""
