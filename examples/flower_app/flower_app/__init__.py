"""FedTreeLoRA in a FlowerTune-style PEFT app (MiniLM on BBC News)."""
