"""FedTreeLoRA in a FlowerTune-style PEFT app: MiniLM on BBC News, or a causal LM (SmolLM2) on ACLSum."""
