"""FedTreeLoRA Flower App: the ServerApp and ClientApp of `fedtreelora.flower`."""
