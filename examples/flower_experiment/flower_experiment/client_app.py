"""ClientApp: one FedTreeLoRA client; its data split is node config "partition-id" (fedtreelora.flower.client_app)."""
from fedtreelora.flower.client_app import app

__all__ = ["app"]
